#!/usr/bin/env bash
# The peers' own environment: torch CPU + Hugging Face transformers / PEFT / TRL, pinned, in
# benchmarks/peers/.venv (git-ignored), and the embedded SmolLM2-135M exported once as a Hugging
# Face model dir for the peer scripts. Idempotent: a venv whose imports work is kept as it is.
# Usage: bash benchmarks/peers/setup.sh        (~1 min the first time; ~5 s after)
set -euo pipefail
start=$SECONDS
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(cd "$here/../.." && pwd)"
venv="$here/.venv"
model_dir="$venv/smollm2-135m-hf"
# Only a CPU torch: the local wheel, installed first, then pinned so nothing can swap in a CUDA build.
torch_whl=/opt/wheels/torch-2.13.0+cpu-cp311-cp311-manylinux_2_28_x86_64.whl
pins=(transformers==5.24.0 peft==0.21.2 trl==1.16.0 accelerate==1.15.0 datasets==5.2.0 safetensors==0.8.0)

check() {
  "$venv/bin/python" - <<'PY'
import accelerate, datasets, peft, safetensors, torch, transformers, trl
assert torch.version.cuda is None, f"CUDA torch {torch.__version__} in the peers venv"
print(f"peers venv: torch {torch.__version__} (cuda {torch.version.cuda}), transformers {transformers.__version__}, "
      f"peft {peft.__version__}, trl {trl.__version__}, accelerate {accelerate.__version__}, "
      f"datasets {datasets.__version__}, safetensors {safetensors.__version__}")
PY
}

if [[ -x "$venv/bin/python" ]] && check 2>/dev/null; then
  echo "peers venv ok, kept: $venv"
else
  py="$(command -v python3.11 || true)"
  [[ -x /root/.pyenv/versions/3.11.7/bin/python3 ]] && py=/root/.pyenv/versions/3.11.7/bin/python3
  [[ -n "$py" ]] || { echo "error: python3.11 not found"; exit 1; }
  [[ -f "$torch_whl" ]] || { echo "error: missing $torch_whl (the CPU torch wheel)"; exit 1; }
  rm -rf "$venv"
  "$py" -m venv "$venv"
  pip_q() {  # quiet, minus the warnings about this machine's absent local index folders
    "$venv/bin/pip" install -q "$@" 2> >(grep -v "is ignored: it is neither a file nor a directory" >&2)
  }
  pip_q --upgrade pip
  pip_q "$torch_whl"
  # the constraint keeps the installed CPU build: pip may not replace torch to satisfy a dependency
  echo "torch==2.13.0" > "$venv/constraints.txt"
  pip_q -c "$venv/constraints.txt" "${pins[@]}"
  check
fi

if [[ -f "$model_dir/model.safetensors" && -f "$model_dir/config.json" ]]; then
  echo "model dir ok, kept: $model_dir"
else
  (cd "$repo" && "$repo/.venv/bin/python" -m tpu_reason.export --checkpoint smollm2-135m --out "$model_dir")
fi
echo "setup took $((SECONDS - start)) s"

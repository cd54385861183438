#!/usr/bin/env bash
# Does `tpu_reason[tpu]` resolve on Python 3.12 (Kaggle's TPU image) from binary wheels? pip resolves the whole
# dependency tree for CPython 3.12 on this Linux x86-64 host's platform tags (a dry run: it reads the packages'
# metadata, installs nothing) and prints the wheels it picked for jax, jaxlib and libtpu. A dependency published only
# as a source archive (pip builds it on install) is built here first: pure Python ones with this interpreter, those
# with C code with BUILD_PYTHON (default: python3.12 if it runs), which proves they compile for that Python.
# Usage: bash scripts/check_tpu_extra.sh [WHEEL] [PYTHON_VERSION]   (default: a wheel built from this checkout, 3.12)
# Needs the package index; exits 0 when everything resolves.
set -euo pipefail
cd "$(dirname "$0")/.."
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
wheel="${1:-}"
version="${2:-3.12}"
if [[ -z "$wheel" ]]; then
  wheel="$(bash scripts/build_wheel.sh "$tmp/dist")"
fi
wheel="$(realpath "$wheel")"
build_python="${BUILD_PYTHON:-python$version}"
mkdir -p "$tmp/built" "$tmp/try"
for attempt in 1 2 3 4 5; do
  if python -m pip install --dry-run --ignore-installed --quiet --target "$tmp/target" --report "$tmp/report.json" \
      --python-version "$version" --only-binary=:all: --find-links "$tmp/built" \
      "tpu_reason[tpu] @ file://$wheel" 2> "$tmp/err"; then
    python - "$tmp/report.json" "$version" "$tmp/built" <<'EOF'
import json, sys

report, version, here = json.load(open(sys.argv[1])), sys.argv[2], sys.argv[3]
picked = {i["metadata"]["name"].lower(): i for i in report["install"]}
for name in ("jax", "jaxlib", "libtpu"):
  item = picked[name]
  print(f"{name}=={item['metadata']['version']}: {item['download_info']['url'].rsplit('/', 1)[-1]}")
built = sorted(n for n, i in picked.items() if here in i["download_info"]["url"])
print(f"tpu_reason[tpu] resolves on Python {version}: {len(picked)} packages, all from published wheels"
      + (f" but {', '.join(built)} (source only: built above)" if built else ""))
EOF
    exit 0
  fi
  # "No matching distribution found for NAME==VERSION": no wheel for this Python; try the source archive
  missing="$(sed -n 's/.*No matching distribution found for \([^ ]*\).*/\1/p' "$tmp/err" | head -1)"
  if [[ -z "$missing" ]]; then
    cat "$tmp/err" >&2
    exit 1
  fi
  rm -rf "$tmp/try"/*
  python -m pip wheel -q --no-deps --no-binary=:all: -w "$tmp/try" "$missing"
  if ! ls "$tmp/try" | grep -q -- '-py3-none-any\.whl$'; then  # C code: build it for the target Python
    if ! "$build_python" -c "import sys; assert sys.version.startswith('$version')" 2> /dev/null; then
      echo "$missing has no wheel for Python $version and compiles C code: set BUILD_PYTHON to a python$version" >&2
      exit 1
    fi
    rm -rf "$tmp/try"/*
    "$build_python" -m pip wheel -q --no-deps --no-binary=:all: -w "$tmp/try" "$missing"
  fi
  echo "built from source: $(ls "$tmp/try")"
  mv "$tmp/try"/*.whl "$tmp/built"/
done
echo "gave up after 5 source-only dependencies" >&2
exit 1

"""The Kaggle notebook, executed top to bottom (papermill) on CPU with the embedded SmolLM2 and a few steps per stage."""

import json
from pathlib import Path

import nbformat
import papermill

NOTEBOOK = Path(__file__).resolve().parents[1] / "kaggle" / "tpu_reason.ipynb"

CPU_PARAMETERS = {
    "RECIPE": "smollm2-135m-cpu",
    "OVERRIDES": ["data.size=16", "data.eval_size=4", "train.eval_generate=2", "train.eval_max_new_tokens=16"],
    "SFT_OVERRIDES": ["train.max_steps=2", "train.eval_every=2", "train.save_every=2"],
    "GRPO_OVERRIDES": ["grpo.steps=1", "grpo.prompts=1", "grpo.max_new_tokens=16"],
    "EVAL_OVERRIDES": ["sampling.max_new_tokens=16"],
    "INSTALL": False,
}


def _outputs(nb) -> str:
  """Every text and markdown output of the executed notebook, joined."""
  parts = []
  for cell in nb.cells:
    for out in cell.get("outputs", []):
      parts.append(out.get("text", ""))
      parts += [str(v) for k, v in out.get("data", {}).items() if k in ("text/plain", "text/markdown")]
  return "\n".join(parts)


def test_parameters_cell_is_tagged_for_papermill():
  nb = nbformat.read(NOTEBOOK, as_version=4)
  tagged = [c for c in nb.cells if "parameters" in c.metadata.get("tags", [])]
  assert len(tagged) == 1
  assert all(f"{name} =" in tagged[0].source for name in CPU_PARAMETERS)
  assert not any(c.get("outputs") for c in nb.cells if c.cell_type == "code")  # committed without outputs


def test_notebook_runs_sft_grpo_eval_export_on_cpu(tmp_path, monkeypatch):
  monkeypatch.delenv("XLA_FLAGS", raising=False)  # the kernel gets one CPU device, as a user's would
  work = tmp_path / "work"
  out = tmp_path / "executed.ipynb"
  papermill.execute_notebook(str(NOTEBOOK), str(out), parameters={**CPU_PARAMETERS, "WORK_DIR": str(work)},
                             kernel_name="python3", cwd=str(tmp_path), progress_bar=False)
  text = _outputs(nbformat.read(out, as_version=4))

  table = (work / "results.md").read_text()
  assert table.splitlines()[0].split("|")[2:5] == [" base ", " sft ", " grpo "]
  assert "### Results" in text and table.strip() in text  # the table is shown, not only written
  assert "image/png" in out.read_text()  # loss and reward curves inline
  sft_summary = json.loads((work / "sft" / "summary.json").read_text())
  grpo_summary = json.loads((work / "grpo" / "summary.json").read_text())
  assert sft_summary["last_step"] == 2 and grpo_summary["last_step"] == 1
  assert grpo_summary["init"] == str(work / "sft")  # GRPO continued from the notebook's SFT run
  for name in ("smollm2-135m", "sft", "grpo"):  # eval's labels: the spec, then the run directories
    assert json.loads((work / "eval" / name / "eval.json").read_text())["n"] == 4  # data.eval_size
  exported = work / "export"
  assert (exported / "config.json").exists() and list(exported.glob("*.safetensors"))

"""The Kaggle notebook as a new user meets it: a wheel built from this checkout (scripts/build_wheel.sh), installed
by the notebook's own install cell into an empty target dir, the notebook executed top to bottom (papermill) on CPU
from a directory outside the repo with the embedded SmolLM2's recipe and tokenizer, a tiny random model and a few
steps per stage (the stages' plumbing is under test here; the real weights' numbers are the trainers' tests'); and
the CLIs from that wheel."""

import json
import subprocess
import sys
import zipfile
from pathlib import Path

import nbformat
import papermill
import pytest
import yaml

from tests.conftest import QUICK_XLA, one_device_env
from tpu_reason.config import MULTI_STEP_TASK

pytestmark = pytest.mark.slow  # builds and installs the wheel, runs the notebook

REPO = Path(__file__).resolve().parents[1]
NOTEBOOK = REPO / "kaggle" / "tpu_reason.ipynb"
RECIPES = sorted(p.stem for p in (REPO / "recipes").glob("*.yaml"))

CPU_PARAMETERS = {
    "RECIPE": "smollm2-135m-cpu",
    "OVERRIDES": ["model.spec=tiny-llama", "data.size=16", "data.eval_size=4", "train.eval_generate=2",
                  "train.eval_max_new_tokens=16"],
    "SFT_OVERRIDES": ["train.max_steps=2", "train.eval_every=2", "train.save_every=2"],
    "GRPO_OVERRIDES": ["grpo.steps=1", "grpo.prompts=1", "grpo.sampling.max_new_tokens=16"],
    "EVAL_OVERRIDES": ["sampling.max_new_tokens=16"],
    "MAX_MINUTES": 60,  # a budget the stages pass on but never reach
}


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
  """The wheel of this checkout, built as the README tells users to."""
  out = tmp_path_factory.mktemp("dist")
  subprocess.run(["bash", str(REPO / "scripts" / "build_wheel.sh"), str(out)], check=True, capture_output=True)
  (built,) = out.glob("tpu_reason-*.whl")
  return built


def _env(site: Path) -> dict:
  """A child's environment: tpu_reason from `site` (the venv only supplies the dependencies), one CPU device."""
  return one_device_env(PYTHONPATH=str(site))  # a tiny random model: compiled without LLVM passes


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
  names = {*CPU_PARAMETERS, "SOURCE", "PIP_OPTIONS", "WORK_DIR", "TPU", "RESUME_FROM", "SFT_SHARE"}
  assert names <= set(papermill.inspect_notebook(str(NOTEBOOK)))  # papermill reads every one of them
  assert 'SOURCE = "auto"' in tagged[0].source and "INSTALL" not in tagged[0].source
  assert not any(c.get("outputs") for c in nb.cells if c.cell_type == "code")  # committed without outputs


def test_wheel_ships_every_recipe(wheel):
  names = zipfile.ZipFile(wheel).namelist()
  assert sorted(n.removeprefix("tpu_reason/recipes/").removesuffix(".yaml")
                for n in names if n.startswith("tpu_reason/recipes/") and n.endswith(".yaml")) == RECIPES


def test_cli_runs_a_packaged_recipe_from_the_installed_wheel(wheel, tmp_path):
  site, elsewhere = tmp_path / "site", tmp_path / "elsewhere"
  elsewhere.mkdir()
  subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(site), str(wheel)],
                 check=True)

  def run(*args):
    return subprocess.run([sys.executable, *args], cwd=elsewhere, env=_env(site), capture_output=True, text=True)

  where = run("-c", "import tpu_reason, tpu_reason.config_io as c; print(tpu_reason.__file__); print(c.RECIPES)")
  assert where.stdout.split() == [str(site / "tpu_reason" / "__init__.py"), str(site / "tpu_reason" / "recipes")]
  listed = run("-m", "tpu_reason.sft", "--list-recipes")
  assert listed.returncode == 0 and [line.split()[0] for line in listed.stdout.splitlines()] == RECIPES
  # the packaged CPU recipe by name, with a tiny random model so the one step is quick
  sft = run("-m", "tpu_reason.sft", "--config", "smollm2-135m-cpu", "train.max_steps=1", "model.spec=tiny-llama",
            "data.size=4", "data.eval_size=1", "data.completion_buckets=[]", "train.eval_generate=1",
            "train.eval_max_new_tokens=2", "output_dir=run")
  assert sft.returncode == 0, sft.stderr[-2000:]
  assert json.loads((elsewhere / "run" / "summary.json").read_text())["last_step"] == 1
  assert yaml.safe_load((elsewhere / "run" / "config.yaml").read_text())["name"] == "smollm2-135m-cpu"
  missing = run("-m", "tpu_reason.sft", "--config", "no-such-recipe")
  assert missing.returncode == 2 and missing.stderr.count("\n") == 1
  assert missing.stderr.startswith("error: recipe not found: no-such-recipe") and "smollm2-135m-cpu" in missing.stderr


def test_notebook_installs_the_wheel_and_runs_sft_grpo_eval_export(wheel, tmp_path, monkeypatch):
  site, work, out = tmp_path / "site", tmp_path / "work", tmp_path / "executed.ipynb"
  site.mkdir()  # empty and on the kernel's path: the install cell puts tpu_reason there
  monkeypatch.setenv("PYTHONPATH", str(site))
  monkeypatch.setenv("JAX_PLATFORMS", "cpu")  # no probing for a TPU (the test extra installs libtpu)
  monkeypatch.setenv("XLA_FLAGS", QUICK_XLA)  # the kernel gets one CPU device, as a user's would (a tiny model)
  parameters = {**CPU_PARAMETERS, "SOURCE": str(wheel), "PIP_OPTIONS": ["--no-deps", "--target", str(site)],
                "WORK_DIR": str(work)}
  papermill.execute_notebook(str(NOTEBOOK), str(out), parameters=parameters, kernel_name="python3",
                             cwd=str(tmp_path), progress_bar=False)
  text = _outputs(nbformat.read(out, as_version=4))

  assert f"tpu_reason 0.1.0 from {site / 'tpu_reason'}\n" in text  # imported from what the install cell wrote
  assert "jax 0.10.2" in text and "RAM" in text
  table = (work / "results.md").read_text()
  assert table.splitlines()[0].split("|")[2:5] == [" base ", " sft ", " grpo "]
  assert "### Results" in text and table.strip() in text  # the table is shown, not only written
  assert "image/png" in out.read_text()  # loss and reward curves inline
  sft_summary = json.loads((work / "sft" / "summary.json").read_text())
  grpo_summary = json.loads((work / "grpo" / "summary.json").read_text())
  assert sft_summary["last_step"] == 2 and grpo_summary["last_step"] == 1
  assert grpo_summary["init"] == str(work / "sft")  # GRPO continued from the notebook's SFT run
  # ... and scored the SFT run's held-out prompts (gsm_symbolic) and a multi-step task beside its own
  assert grpo_summary["after"]["gsm_symbolic/rows"] == grpo_summary["after"][f"{MULTI_STEP_TASK}/rows"] == 2
  # its "before" there is the SFT run's "after" (scored alike: same rows, adapters and settings), not generated again
  assert "gsm_symbolic: before = the SFT run's after on the same 2 rows" in text
  assert [grpo_summary["before"][f"gsm_symbolic/{k}"] for k in ("format_accuracy", "unclosed_rate", "accuracy")] == [
      sft_summary["after"][k] for k in ("format_accuracy", "unclosed_rate", "answer_accuracy")]
  for stage in ("sft", "grpo"):  # the session budget reached both trainers
    assert 0 < yaml.safe_load((work / stage / "config.yaml").read_text())["train"]["max_minutes"] <= 60
  for name in ("tiny-llama", "sft", "grpo"):  # eval's labels: the spec, then the run directories
    assert json.loads((work / "eval" / name / "eval.json").read_text())["n"] == 4  # data.eval_size
  exported = work / "export"
  assert (exported / "config.json").exists() and list(exported.glob("*.safetensors"))

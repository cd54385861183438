"""Nothing saved is damaged: every command checks before it writes, and each bad input is one line.

Each case is a refused command run as a user would (a subprocess): exit 2, one `error:` line naming
what is wrong, no traceback, every file it was pointed at unchanged byte for byte, and no directory
where none was. The runs are written once per module (`write_run`: tiny-llama, no training), and the
cases run one after another in one process, each on its own copy of the run it may damage.
"""

import hashlib
import json
import pathlib
import shutil
import subprocess
import sys

import pytest
import yaml

from tests.conftest import one_device_env, write_run
from tests.test_reliability import TINY_SFT, one_error

pytestmark = pytest.mark.slow  # the CLIs as subprocesses

RUN_SETTINGS = ["lora.rank=4", "lora.alpha=8", "data.system_prompt="]  # those of `write_run`
SFT = [*TINY_SFT, *RUN_SETTINGS]
GRPO = ["model.spec=tiny-llama", *RUN_SETTINGS, "data.eval_size=0", "train.eval_generate=0", "grpo.steps=1",
        "grpo.prompts=2", "grpo.sampling.max_new_tokens=4"]


def digest(path: pathlib.Path) -> dict:
  """{relative path: sha256} of every file under `path` (or of the file itself)."""
  files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
  return {str(p.relative_to(path)): hashlib.sha256(p.read_bytes()).hexdigest() for p in files}


def old_style(run: pathlib.Path):
  """Rewrite a run as one saved before the config sections moved (train.lr, train.clip_norm)."""
  def move(tree: dict):
    optim = tree["train"].pop("optim")
    tree["train"].update(lr=optim["lr"], clip_norm=optim["clip_norm"])
    return tree

  (run / "config.yaml").write_text(yaml.safe_dump(move(yaml.safe_load((run / "config.yaml").read_text()))))
  for meta in run.glob("checkpoints/*/*/meta/metadata"):
    saved = json.loads(meta.read_text())
    meta.write_text(json.dumps({**saved, "config": move(saved["config"])}))


@pytest.fixture(scope="module")
def world(tmp_path_factory):
  """The runs and files the cases point at."""
  root = tmp_path_factory.mktemp("safety")
  # the settings of the cases' commands: a command that is not refused finds nothing left to train
  sft, _ = write_run(root / "sft", "tiny-llama", *SFT)
  write_run(root / "grpo", "tiny-llama", *GRPO, "grpo.init=" + str(sft), trainer="grpo", init=str(sft))
  write_run(root / "old", "tiny-llama", "train.optim.lr=5e-4")
  old_style(root / "old")
  (root / "gone").mkdir()  # a run whose checkpoints were deleted
  for name in ("run.json", "config.yaml"):
    shutil.copy(sft / name, root / "gone" / name)
  shutil.copytree(sft, root / "emptied")  # a finished run whose checkpoints were deleted
  shutil.rmtree(root / "emptied" / "checkpoints")
  (root / "emptied" / "checkpoints").mkdir()
  (root / "emptied" / "summary.json").write_text("{}")
  shutil.copytree(sft, root / "corrupt")  # a run whose checkpoint files were overwritten
  for p in (root / "corrupt" / "checkpoints").rglob("*"):
    if p.is_file():
      p.write_bytes(b"xx")
  files = {
      "binary.yaml": bytes(range(256)),
      "dup.yaml": b"train:\n  max_steps: 3\n  max_steps: 4\n",
      "both.yaml": b"train:\n  lr: 0.001\n  optim:\n    lr: 0.0005\n",
      "broken.yaml": b"train:\n  max_steps: [3\n",
      "unknown.yaml": b"train:\n  lrr: 0.001\n",
      "rows.jsonl": b'{"question": "What is 1 + 1?", "answer": "1 + 1 = 2 #### 2"}\n',
      "a.yaml": b"train:\n  max_steps: 3\n",
      "export.bin": b"not a directory\n",
      "bad.csv": b'question,answer\n"What is 1 + 1?,2\n',
      "notes.txt": b"What is 1 + 1? 2\n",
      "plain.txt": b"notes without a final newline",
      "empty.jsonl": b"",
  }
  for name, data in files.items():
    (root / name).write_bytes(data)
  (root / "nodata").mkdir()  # a folder of no data file
  (root / "nodata" / "readme.md").write_text("notes\n")
  return root


# name: (CLI, args, paths that must stay byte-identical, paths that must not appear, needles of the error line);
# "{w}" is the world, "{c}" the case's own copy of a run (copied from the run named after the colon).
CASES = {
    "sft into an SFT run of another LoRA rank": (
        "sft", [*SFT, "lora.rank=8", "output_dir={c:sft}"], ["{c}"], [], ["lora.rank=4", "lora.rank=8"]),
    "sft into an SFT run of another model": (
        "sft", [*SFT, "model.spec=tiny-gemma3", "output_dir={c:sft}"], ["{c}"], [], ["tiny-llama", "tiny-gemma3"]),
    "grpo into an SFT run": ("grpo", [*GRPO, "output_dir={c:sft}"], ["{c}"], [], ["is an SFT run"]),
    "sft into a GRPO run": ("sft", [*SFT, "output_dir={c:grpo}"], ["{c}"], [], ["is a GRPO run"]),
    "resume with a changed learning rate": (
        "sft", ["--config", "{c:sft}/config.yaml", "train.optim.lr=5e-4", "output_dir={c}"], ["{c}"], [],
        ["train.optim.lr=0.001", "train.optim.lr=0.0005"]),
    "eval --out a run": (
        "eval", ["--model", "tiny-llama", "--data", "{w}/rows.jsonl", "--max-new-tokens", "2", "--out", "{c:sft}"],
        ["{c}"], [], ["is a training run directory"]),
    "export --out a file": (
        "export", ["--checkpoint", "{w}/sft", "--out", "{w}/export.bin"], ["{w}/export.bin"], [], ["is a file"]),
    "export --adapter-only of a base model": (
        "export", ["--checkpoint", "tiny-llama", "--adapter-only", "--out", "{w}/adapter-only"], [],
        ["{w}/adapter-only"], ["has no LoRA"]),
    "eval --compare with a bad model last": (
        "eval", ["--compare", "{w}/sft", "{w}/gone", "--data", "{w}/rows.jsonl", "--max-new-tokens", "2", "--out",
                 "{w}/compared"], [], ["{w}/compared"], ["{w}/gone", "no completed checkpoint"]),
    "eval of a run whose checkpoints were deleted": (
        "eval", ["--model", "{w}/gone", "--data", "{w}/rows.jsonl", "--out", "{w}/gone-eval"], ["{w}/gone"],
        ["{w}/gone-eval"], ["no completed checkpoint"]),
    "grpo.init a run of another model": (
        "grpo", [*GRPO, "model.spec=tiny-gemma3", "grpo.init={w}/sft", "output_dir={w}/grpo-other"], [],
        ["{w}/grpo-other"], ["model.spec=tiny-llama", "not tiny-gemma3"]),
    "sampling.top_k beyond the vocabulary": (
        "eval", ["--model", "tiny-llama", "--data", "{w}/rows.jsonl", "sampling.top_k=1000000", "--out",
                 "{w}/topk"], [], ["{w}/topk"], ["sampling.top_k=1000000", "vocabulary"]),
    "a binary file as --config": ("sft", ["--config", "{w}/binary.yaml"], [], [], ["binary.yaml", "not a text file"]),
    "a key twice in a YAML file": ("sft", ["--config", "{w}/dup.yaml"], [], [], ["dup.yaml", "line 3", "max_steps"]),
    "an old key and its new key in one file": (
        "sft", ["--config", "{w}/both.yaml"], [], [], ["both.yaml", "train.lr", "train.optim.lr"]),
    "a YAML error": ("sft", ["--config", "{w}/broken.yaml"], [], [], ["broken.yaml", "line 3"]),
    "an unknown key in a recipe": ("sft", ["--config", "{w}/unknown.yaml"], [], [], ["unknown.yaml", "train.lrr"]),
    "two --config flags": ("sft", ["--config", "{w}/a.yaml", "--config", "{w}/dup.yaml"], [], [],
                           ["--config given twice"]),
    "a reward named twice": ("grpo", ["grpo.rewards=[format,outcome,outcome]"], [], [], ["outcome more than once"]),
    "no reward at all": ("grpo", ["grpo.rewards=[]", "grpo.reward_weights=[]"], [], [], ["grpo.rewards is empty"]),
    "a negative seed": ("sft", [*SFT, "train.seed=-1", "output_dir={w}/seed"], [], ["{w}/seed"], ["train.seed"]),
    "no held-out tokens": ("sft", ["train.eval_max_new_tokens=0"], [], [], ["train.eval_max_new_tokens"]),
    "plan --hbm-gib inf": ("plan", ["--hbm-gib", "inf"], [], [], ["--hbm-gib"]),
    "plan --hbm-gib nan": ("plan", ["--hbm-gib", "nan"], [], [], ["--hbm-gib"]),
    "plan --hbm-gib 1e-12": ("plan", ["--hbm-gib", "1e-12"], [], [], ["--hbm-gib"]),
    "plan with a mesh that does not divide the batch": (
        "plan", ["mesh.fsdp=3"], [], [], ["mesh error on 3 device(s)", "multiple of the fsdp mesh size 3"]),
    "a CSV file that does not parse": (
        "sft", [*SFT, "data.source=gsm8k", "data.path={w}/bad.csv", "output_dir={w}/bad-csv"], [], ["{w}/bad-csv"],
        ["{w}/bad.csv", "cannot read"]),
    "a data file of no known format": (
        "sft", [*SFT, "data.source=gsm8k", "data.path={w}/notes.txt", "output_dir={w}/notes"], [], ["{w}/notes"],
        ["{w}/notes.txt", "cannot read a .txt file"]),
    "an unknown grpo.task": (
        "grpo", [*GRPO, "grpo.task=nosuch", "output_dir={w}/bad-task"], [], ["{w}/bad-task"], ["grpo.task=nosuch"]),
    "an unknown grpo.curriculum task": (
        "grpo", [*GRPO, "grpo.curriculum=[nosuch]", "grpo.curriculum_steps=1", "output_dir={w}/bad-curriculum"], [],
        ["{w}/bad-curriculum"], ["grpo.curriculum=nosuch"]),
    "an unknown grpo.eval_tasks task": (
        "grpo", [*GRPO, "grpo.eval_tasks=[init,nosuch]", "output_dir={w}/bad-eval-task"], [], ["{w}/bad-eval-task"],
        ["grpo.eval_tasks=nosuch"]),
    "an unknown curate.tasks task": (
        "curate.__main__", ["curate.tasks=[nosuch]", "output_dir={w}/bad-curate"], [], ["{w}/bad-curate"],
        ["curate.tasks=nosuch"]),
    "curate into a run": ("curate.__main__", ["output_dir={c:sft}"], ["{c}"], [], ["is a training run directory"]),
    "grpo.init a run whose checkpoints were deleted": (
        "grpo", [*GRPO, "grpo.init={w}/gone", "output_dir={w}/grpo-gone"], ["{w}/gone"], ["{w}/grpo-gone"],
        ["{w}/gone", "no completed checkpoint"]),
    "grpo.init a run whose checkpoint is damaged": (
        "grpo", [*GRPO, "grpo.init={w}/corrupt", "output_dir={w}/grpo-corrupt"], ["{w}/corrupt"],
        ["{w}/grpo-corrupt"], ["{w}/corrupt", "checkpoint unreadable"]),
    "a data folder of no data file": (
        "sft", [*SFT, "data.source=gsm8k", "data.path={w}/nodata", "output_dir={w}/nodata-run"], ["{w}/nodata"],
        ["{w}/nodata-run"], ["{w}/nodata", "no .csv/.json/.jsonl/.parquet file"]),
    "distill --out a folder": (
        "distill", ["--teacher", "t", "--out", "{w}/nodata"], ["{w}/nodata"], [], ["distill.output", "is a directory"]),
    "distill --out a file of something else": (
        "distill", ["--teacher", "t", "--out", "{w}/plain.txt", "distill.retries=0"], ["{w}/plain.txt"], [],
        ["{w}/plain.txt:1", "not a teacher row"]),
    "distill --base-url not a URL": (
        "distill", ["--teacher", "t", "--base-url", "notaurl", "--out", "{w}/distilled/t.jsonl"], [],
        ["{w}/distilled"], ["distill.base_url", "notaurl"]),
    "budget.extend with an empty budget.wait": (
        "chat", ["--model", "tiny-llama", "--extend", "2", "--wait", ""], [], [], ["budget.wait", "empty"]),
    "eval --compare one model twice": (
        "eval", ["--compare", "tiny-llama", "tiny-llama", "--data", "{w}/rows.jsonl", "--max-new-tokens", "2", "--out",
                 "{w}/twice"], [], ["{w}/twice"], ["tiny-llama more than once"]),
    "an output_dir that cannot be made": (
        "sft", [*SFT, "output_dir={w}/a.yaml/run"], ["{w}/a.yaml"], [], ["output_dir={w}/a.yaml/run", "is a file"]),
    "an empty model.spec": ("sft", ["model.spec="], [], [], ["model.spec is empty"]),
    "an unknown key on the command line": ("sft", ["train.nope=1"], [], [], ["train.nope"]),
    "a negative learning rate": ("sft", ["train.optim.lr=-1"], [], [], ["train.optim.lr"]),
    "train.max_nonfinite=0": ("sft", ["train.max_nonfinite=0"], [], [], ["train.max_nonfinite must be > 0"]),
    "model.vocab_chunk=0": ("sft", ["model.vocab_chunk=0"], [], [], ["model.vocab_chunk must be > 0"]),
    "grpo.std_ddof=2": ("grpo", ["grpo.std_ddof=2"], [], [], ["grpo.std_ddof must be 0"]),
    "a folder as --config": ("sft", ["--config", "."], [], [], ["recipe not found: ."]),
    "an empty data file": (
        "sft", [*SFT, "data.source=gsm8k", "data.path={w}/empty.jsonl", "output_dir={w}/empty-run"],
        ["{w}/empty.jsonl"], ["{w}/empty-run"], ["data.path={w}/empty.jsonl has no rows"]),
    "data: an unknown key": ("data.__main__", ["data.nope=1"], [], [], ["data.nope"]),
    "data: a data file that does not exist": (
        "data.__main__", ["data.source=teacher", "data.path=does/not/exist.jsonl"], [], [],
        ["data.path not found: does/not/exist.jsonl"]),
    "data --generate not a number": ("data.__main__", ["--generate", "many"], [], [], ["--generate", "'many'"]),
    "lora.targets not a regular expression": ("sft", ["lora.targets=("], [], [], ["lora.targets='('"]),
    "resume a finished run whose checkpoints were deleted": (
        "sft", [*SFT, "output_dir={c:emptied}"], ["{c}"], [], ["no completed checkpoint left", "train.resume=none"]),
}


def prepare(name: str, world: pathlib.Path) -> tuple[str, list[str], list[pathlib.Path], list[pathlib.Path], list]:
  """A case with its paths filled in (its run copied first)."""
  module, args, same, absent, needles = CASES[name]
  copy = world / "cases" / name.replace(" ", "_").replace("/", "_")
  text = json.dumps([args, same, absent, needles])
  for source in ("sft", "grpo", "emptied"):
    if "{c:" + source + "}" in text:
      shutil.copytree(world / source, copy)
      text = text.replace("{c:" + source + "}", str(copy))
  args, same, absent, needles = json.loads(text.replace("{c}", str(copy)).replace("{w}", str(world)))
  return module, args, [pathlib.Path(p) for p in same], [pathlib.Path(p) for p in absent], needles


# One process runs the cases in turn through each CLI's `main`, as `python -m` would (its `cli` wrapper turns
# a UserError into exit 2): one jax start-up instead of one per case. An escaping exception is a traceback.
RUNNER = """
import contextlib, importlib, io, json, sys, traceback
out = []
for module, args in json.load(sys.stdin):
  err, std, rc = io.StringIO(), io.StringIO(), 0
  with contextlib.redirect_stderr(err), contextlib.redirect_stdout(std):
    try:
      importlib.import_module("tpu_reason." + module).main(args)
    except SystemExit as e:
      rc = e.code if isinstance(e.code, int) else 1
    except BaseException:
      traceback.print_exc()
      rc = 1
  out.append({"returncode": rc, "stderr": err.getvalue(), "stdout": std.getvalue()})
print(json.dumps(out))
"""


@pytest.fixture(scope="module")
def refused(world):
  """{case: (process, files before, files after, case)}, every case run in one process."""
  cases = {name: prepare(name, world) for name in CASES}
  before = {name: [digest(p) for p in c[2]] for name, c in cases.items()}
  cwd = world / "cwd"
  cwd.mkdir()
  proc = subprocess.run([sys.executable, "-c", RUNNER], input=json.dumps([c[:2] for c in cases.values()]), cwd=cwd,
                        text=True, capture_output=True, timeout=600, env=one_device_env())
  assert proc.returncode == 0, proc.stderr[-3000:]
  results = [subprocess.CompletedProcess(c[1], **r) for c, r in zip(cases.values(), json.loads(proc.stdout.splitlines()[-1]))]
  return {name: (r, before[name], [digest(p) for p in c[2]], c) for r, (name, c) in zip(results, cases.items())}


@pytest.mark.parametrize("name", sorted(CASES))
def test_refused_command_is_one_line_and_changes_nothing(refused, name):
  proc, before, after, (_, _, _, absent, needles) = refused[name]
  one_error(proc, *needles)
  assert after == before  # every file it was pointed at, byte for byte
  assert not [p for p in absent if p.exists()]


def test_refused_commands_write_nothing_where_they_run(refused, world):
  assert not list((world / "cwd").iterdir())  # e.g. no default output_dir made before the refusal


def test_runs_saved_before_the_config_sections_moved_still_load(world, tmp_path):
  """Every reader of a saved config applies the moved-key map: policy (eval, chat, export), GRPO init, resume."""
  from tpu_reason import config_io, export, policy, runs
  from tpu_reason.config import Config

  old = world / "old"
  assert policy.load(str(old)).run_config.train.optim.lr == 5e-4
  assert runs.read_config(old).train.optim.clip_norm == 1.0
  policy.check(str(old))
  same = config_io.load(Config, None, [f"output_dir={old}", "model.spec=tiny-llama", *RUN_SETTINGS,
                                       "train.optim.lr=5e-4", "train.max_minutes=5"])
  runs.check_output_dir(old, same, "sft")  # a resume with a setting that may change
  export.run(str(old), str(tmp_path / "adapter"), adapter_only=True)
  assert json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())["r"] == 4


def test_a_csv_file_loads_as_data(tmp_path):
  """A local CSV is data (it once went to the hub as an id: "Couldn't find any data file")."""
  from tpu_reason.config import DataCfg
  from tpu_reason.data.prepare import load_records

  path = tmp_path / "rows.csv"
  path.write_text('question,answer\n"What is 1 + 1?","1 + 1 = 2 #### 2"\n"What is 2 + 2?","2 + 2 = 4 #### 4"\n')
  records, report = load_records(DataCfg(source="gsm8k", path=str(path)), seed=0, size=2)
  assert [r.answer for r in records] == ["2", "4"] and report.kept == 2


def test_a_resume_may_change_only_where_and_how_long_it_runs(world):
  from tpu_reason import config_io, runs
  from tpu_reason.config import Config
  from tpu_reason.errors import UserError

  sft = world / "sft"
  base = [f"output_dir={sft}", *SFT]
  for free in ("train.max_minutes=3", "train.keep_last=5", "mesh.fsdp=1", "sampling.temperature=0.5", "grpo.beta=0"):
    runs.check_output_dir(sft, config_io.load(Config, None, [*base, free]), "sft")
  for fixed in ("train.max_steps=41", "data.task=chain_sum", "train.seed=3"):
    with pytest.raises(UserError, match=fixed.split("=")[0]):
      runs.check_output_dir(sft, config_io.load(Config, None, [*base, fixed]), "sft")
  runs.check_output_dir(sft, config_io.load(Config, None, [*base, "train.resume=none", "train.seed=3"]), "sft")

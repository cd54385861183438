"""Bad input through the real CLIs: exit status 2, one `error:` line naming what is at fault, no traceback.

Each case is a user mistake or a damaged file that once ended in a traceback (or a silent
success); every call is a subprocess, as a user would run it.
"""

import pathlib
import signal
import subprocess
import sys

import pytest

from tests.conftest import one_device_env
from tpu_reason import models

pytestmark = pytest.mark.slow  # the CLIs as subprocesses

TINY_SFT = ["model.spec=tiny-llama", "data.size=16", "data.eval_size=0", "train.batch_size=2",
            "train.max_steps=1", "train.eval_generate=0"]


def run_cli(module: str, *args: str, cwd: pathlib.Path, **env: str) -> subprocess.CompletedProcess:
  return subprocess.run([sys.executable, "-m", f"tpu_reason.{module}", *args], cwd=cwd, text=True,
                        capture_output=True, timeout=600, env=one_device_env(**env))


def one_error(proc: subprocess.CompletedProcess, *needles: str) -> str:
  """The single `error:` line of a refused command, checked to hold every needle."""
  lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("error:")]
  assert proc.returncode == 2, proc.stderr[-3000:]
  assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
  assert all(n in lines[0] for n in needles), lines[0]
  return lines[0]


def real_gguf() -> pathlib.Path:
  return models._embedded_gguf("smollm2-135m")


GGUF_DAMAGE = {
    "empty": lambda b: b"",
    "garbage": lambda b: bytes(range(256)) * 20,
    "header_only": lambda b: b[:100],
    "truncated": lambda b: b[: len(b) // 2],
}


@pytest.mark.parametrize("damage", sorted(GGUF_DAMAGE))
def test_damaged_gguf_is_one_line_and_leaves_no_eval_dir(tmp_path, damage):
  path = tmp_path / "model.gguf"
  path.write_bytes(GGUF_DAMAGE[damage](real_gguf().read_bytes()))
  proc = run_cli("eval", "--model", str(path), "--limit", "1", cwd=tmp_path)
  one_error(proc, str(path), "not a readable GGUF file")
  assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir())  # a failed eval leaves nothing


GOOD = '{"question": "What is 1 + %d?", "answer": "1 + %d = %d #### %d"}\n'


def gsm_lines(n: int) -> bytes:
  return b"".join((GOOD % (i, i, i + 1, i + 1)).encode() for i in range(n))


def test_invalid_utf8_names_the_line_and_lenient_keeps_the_rest(tmp_path):
  path = tmp_path / "rows.jsonl"
  path.write_bytes(gsm_lines(1) + b'{"question": "\xff bad"}\n' + gsm_lines(8))
  strict = run_cli("sft", *TINY_SFT, "data.source=gsm8k", f"data.path={path}", cwd=tmp_path)
  one_error(strict, f"{path}:2: invalid UTF-8")
  assert "task=" not in strict.stderr
  lenient = run_cli("sft", *TINY_SFT, "data.source=gsm8k", f"data.path={path}", "data.strict=false",
                    f"output_dir={tmp_path / 'run'}", cwd=tmp_path)
  assert lenient.returncode == 0, lenient.stderr[-3000:]
  assert "kept 9/10 (dropped: bad_encoding=1)" in lenient.stdout


def test_directory_of_files_reads_each_file_with_line_numbers(tmp_path):
  data = tmp_path / "data"
  data.mkdir()
  (data / "a.jsonl").write_bytes(gsm_lines(6))
  (data / "b.jsonl").write_bytes(gsm_lines(3) + b"{not json\n")
  one_error(run_cli("sft", *TINY_SFT, "data.source=gsm8k", f"data.path={data}", cwd=tmp_path),
            f"{data / 'b.jsonl'}:4: malformed JSON")
  lenient = run_cli("sft", *TINY_SFT, "data.source=gsm8k", f"data.path={data}", "data.strict=false",
                    f"output_dir={tmp_path / 'run'}", cwd=tmp_path)
  assert lenient.returncode == 0, lenient.stderr[-3000:]
  assert "kept 9/10 (dropped: malformed_json=1)" in lenient.stdout


def test_offline_hub_dataset_is_one_line(tmp_path):
  proc = run_cli("sft", *TINY_SFT, "data.source=gsm8k", "data.path=no-such-org/no-such-dataset", cwd=tmp_path,
                 HF_DATASETS_OFFLINE="1", HF_HUB_OFFLINE="1")
  one_error(proc, "no-such-org/no-such-dataset", "cannot load")


def test_refused_run_leaves_no_half_run_directory(tmp_path):
  out = tmp_path / "run"
  proc = run_cli("sft", *TINY_SFT, "train.batch_size=64", f"output_dir={out}", cwd=tmp_path)
  one_error(proc, "training rows survived filtering")
  assert not out.exists()


def test_corrupt_checkpoint_is_one_line_that_says_how_to_go_on(tmp_path):
  out = tmp_path / "run"
  first = run_cli("sft", *TINY_SFT, f"output_dir={out}", cwd=tmp_path)
  assert first.returncode == 0, first.stderr[-3000:]
  chunks = [p for p in (out / "checkpoints" / "last" / "1" / "state").rglob("*") if p.is_file() and p.parent.name == "d"]
  assert chunks
  for p in chunks:
    p.write_bytes(b"\0" * 16)
  proc = run_cli("sft", *TINY_SFT, f"output_dir={out}", cwd=tmp_path)  # the same command resumes step 1
  one_error(proc, str(out / "checkpoints" / "last" / "1"), "checkpoint unreadable", "train.resume=none")
  assert "Event loop is closed" not in proc.stderr
  missing = run_cli("sft", *TINY_SFT, "train.resume=7", f"output_dir={out}", cwd=tmp_path)
  one_error(missing, "no checkpoint at step 7", "saved steps: [1]")


def test_ctrl_c_dropped_by_a_gc_callback_stops_the_run_at_the_next_step():
  """A signal that lands in a GC callback raises there and Python drops it ('Exception ignored');
  the run must still stop, at the next step boundary."""
  from tpu_reason import errors, loop

  class Collected:
    def __del__(self):
      errors._on_interrupt(signal.SIGINT, None)  # as the CLI's handler would, inside a finaliser

  saved = list(errors._pending)
  try:
    Collected()  # finalised at once: the KeyboardInterrupt is printed and lost
    with pytest.raises(KeyboardInterrupt):
      with loop.interrupt_after_step():
        pytest.fail("a step ran after a Ctrl-C")
  finally:
    errors._pending[:] = saved

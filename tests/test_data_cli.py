"""Tests for `python -m tpu_reason.data`: prints the report, one-line errors."""

import pathlib
import subprocess
import sys

import pytest

from tests.conftest import one_device_env

ROOT = pathlib.Path(__file__).resolve().parent.parent


def _run(*args):
  env = one_device_env(HF_DATASETS_OFFLINE="1")  # a user's one device, tiny-model compiles
  return subprocess.run([sys.executable, "-m", "tpu_reason.data", *args], cwd=ROOT, env=env,
                        capture_output=True, text=True, timeout=120)


@pytest.mark.slow
def test_cli_prints_report_and_marked_examples():
  out = _run("data.size=16", "data.eval_size=4", "data.max_prompt_tokens=256", "data.max_completion_tokens=512",
             "data.completion_buckets=[128,256,512]")
  assert out.returncode == 0, out.stderr
  text = out.stdout
  assert "train [reasoning_gym:gsm_symbolic:seed=0]: kept 16/16" in text
  assert "eval [reasoning_gym:gsm_symbolic:seed=10000]: kept 4/4" in text
  assert "prompt tokens: n=16" in text and "completion tokens (incl. EOS): n=16" in text
  assert "C=128:" in text and "C=512:" in text
  assert "reasoning:answer tokens: n=16 " in text and "reasoning:answer tokens: n=4 " in text
  assert "ROUGE-L" not in text  # generation only on request
  assert text.count("\n--- ") == 3  # three rendered examples
  assert text.count("<reasoning>\n[[") == 3 and text.count("</answer><|im_end|>]]") == 3  # loss span incl. EOS


@pytest.mark.slow
def test_cli_generate_reports_reasoning_rouge_l():
  out = _run("data.size=4", "data.eval_size=2", "--generate", "2", "train.eval_max_new_tokens=8")
  assert out.returncode == 0, out.stderr
  line = next(line for line in out.stdout.splitlines() if "ROUGE-L" in line)
  assert "reasoning ROUGE-L vs reference (2 eval rows, greedy, 8 new tokens): mean=" in line
  mean = float(line.split("mean=")[1].split()[0])
  assert 0.0 <= mean <= 1.0

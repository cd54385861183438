"""Chat REPL: piped stdin, streaming through on_chunk, --hide-thoughts, redaction, history and
/reset, budget flags, a run directory's LoRA, and the CLI as a subprocess."""

import dataclasses
import io
import subprocess
import sys

import numpy as np
import pytest

from tests.conftest import one_device_env
from tpu_reason import chat, config_io, tags
from tpu_reason.config import Config
from tpu_reason.sampling import sampler

pytestmark = pytest.mark.slow  # the chat CLI and real weights

REASONING = tags.get_schema("reasoning")
REPLY = "2 + 3 = 5\n</reasoning>\n<answer>\n5\n</answer>"  # what the fake sampler "generates"


def _cfg(*overrides):
  return config_io.load(Config, None, ["sampling.max_new_tokens=6", "data.system_prompt=", *overrides])


@pytest.fixture(scope="module")
def session():
  return chat.open_session(_cfg(), "tiny-llama")


def _fresh(session, *overrides):
  s = dataclasses.replace(session, cfg=_cfg(*overrides))
  s.reset()
  return s


def _fake_sampler(monkeypatch, text=REPLY):
  """sampler.generate returning `text`, streamed in two chunks through on_chunk; records its kwargs."""
  calls = []

  def generate(params, cfg, tok, tokens, mask, *, on_chunk=None, **kw):
    calls.append({"tokens": tokens, "mask": mask, **kw})
    ids = np.array([tok.encode(text, add_special_tokens=False)], np.int32)
    n = ids.shape[1]
    if on_chunk is not None:
      on_chunk(ids, np.array([n // 2]))
      on_chunk(ids, np.array([n]))
    return sampler.Generation(ids, np.array([n], np.int32), np.array([True]), [text], 0.1)

  monkeypatch.setattr(sampler, "generate", generate)
  return calls


def test_reply_streams_the_primer_and_text(session, monkeypatch):
  calls = _fake_sampler(monkeypatch)
  out = io.StringIO()
  s = _fresh(session)
  s.reply("What is 2+3?", out)
  assert out.getvalue() == REASONING.primer + REPLY + "\n"
  assert calls[0]["stop_strings"] == ("</answer>",) and "budget" not in calls[0]
  assert s.history == [{"role": "user", "content": "What is 2+3?"},
                       {"role": "assistant", "content": REASONING.primer + REPLY}]


def test_hide_thoughts_prints_only_the_answer(session, monkeypatch):
  _fake_sampler(monkeypatch)
  out = io.StringIO()
  _fresh(session).reply("What is 2+3?", out, hide=True)
  assert out.getvalue() == "5\n"
  _fake_sampler(monkeypatch, "still thinking")
  out = io.StringIO()
  _fresh(session).reply("What is 2+3?", out, hide=True)
  assert out.getvalue() == "(no answer: the reasoning did not close)\n"


def test_redact_thoughts_shows_the_reasoning_length_only(session, monkeypatch):
  _fake_sampler(monkeypatch)
  out = io.StringIO()
  _fresh(session, "redact_thoughts=true").reply("What is 2+3?", out)
  assert out.getvalue() == REASONING.redact(REASONING.primer + REPLY) + "\n"
  assert "2 + 3 = 5" not in out.getvalue() and "[9 chars of reasoning redacted]" in out.getvalue()


def test_history_grows_and_resets_through_piped_stdin(monkeypatch):
  calls = _fake_sampler(monkeypatch)
  out, err = io.StringIO(), io.StringIO()
  s = chat.run(_cfg("data.system_prompt=Be brief."), "tiny-llama", stdin=io.StringIO("first\n\nsecond\n/reset\nthird\n"),
               out=out, err=err)
  assert out.getvalue() == (REASONING.primer + REPLY + "\n") * 3
  assert "(conversation cleared)" in err.getvalue()
  assert [len(c["tokens"][0]) for c in calls] == [sampler.prompt_width(int(c["mask"].sum())) for c in calls]
  lengths = [int(c["mask"].sum()) for c in calls]
  assert lengths[1] > lengths[0] and lengths[2] < lengths[1]  # the second turn carries the first
  assert [m["role"] for m in s.history] == ["system", "user", "assistant"]
  assert s.history[1]["content"] == "third"


def test_real_stream_equals_the_generated_text(session):
  """Tiny random model, real sampler: what on_chunk streamed is the final text."""
  out = io.StringIO()
  gen = _fresh(session, "sampling.max_new_tokens=20").reply("Hello", out)
  assert out.getvalue() == REASONING.primer + gen.texts[0] + "\n"
  assert gen.lengths[0] == 20


def test_run_dir_chats_with_its_lora(tiny_run):
  run, _ = tiny_run
  s = chat.open_session(_cfg(), str(run))
  assert s.policy.lora is not None and s.policy.source.endswith("checkpoints/best/1 on tiny-llama")
  # it decodes on the merged copy: the run's adapter folded into the base, no adapter left to apply per token
  w = s.weights
  assert w.layout == "merged" and w.lora is None
  assert not np.allclose(np.asarray(w.params["layers"]["q"]), np.asarray(s.policy.model.params["layers"]["q"]))


def test_cli_reads_piped_stdin():
  env = one_device_env()
  p = subprocess.run([sys.executable, "-m", "tpu_reason.chat", "--model", "tiny-llama", "--max-new-tokens", "5",
                      "--hide-thoughts"], input="What is 2+3?\n", capture_output=True, text=True, env=env,
                     timeout=600)
  assert p.returncode == 0, p.stderr
  assert p.stdout == "(no answer: the reasoning did not close)\n"  # 5 random tokens never close it
  assert "[5 tokens" in p.stderr and "chat with tiny-llama" in p.stderr


def test_cli_bad_flag_is_one_error_line():
  p = subprocess.run([sys.executable, "-m", "tpu_reason.chat", "--max-thinking-tokens", "-1"], input="",
                     capture_output=True, text=True, timeout=600)
  assert p.returncode == 2 and p.stderr.strip().startswith("error: budget.max_thinking_tokens")

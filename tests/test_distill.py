"""Tests for tpu_reason.distill against a fake OpenAI-compatible teacher on 127.0.0.1.

The fake answers "What is A plus B?" correctly by default; a test scripts other replies per
question (HTTP errors, garbage, hangs, bad JSON, bad checkpoints) and the fake counts requests.
Questions come from a JSONL file through the normal data config; the target tokenizer is the
embedded SmolLM2's.
"""

import collections
import contextlib
import http.server
import io
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from tpu_reason import config_io, distill
from tpu_reason.config import Config
from tpu_reason.data import sources
from tpu_reason.data.sources import Record
from tpu_reason.errors import UserError

KEY_ENV = "TPU_REASON_TEST_TEACHER_KEY"
KEY = "sk-test-0123456789abcdef"
QUESTION = re.compile(r"What is (\d+) plus (\d+)\?")


def good_reply(question: str) -> str:
  a, b = map(int, QUESTION.search(question).groups())
  return json.dumps({"reasoning": f"Start with {a}. Add {b}: {a} + {b} = {a + b}. The total is {a + b}.",
                     "answer": str(a + b), "checkpoints": [f"{a} + {b} = {a + b}"]})


def completion(content: str) -> str:
  return json.dumps({"id": "x", "object": "chat.completion", "choices": [
      {"index": 0, "message": {"role": "assistant", "content": content}, "finish_reason": "stop"}]})


class FakeTeacher:
  """Chat completions on 127.0.0.1. A script maps a question to replies used in turn (the last
  repeats): ("ok", content) -> 200 with that content, (status, body) -> raw, ("hang", s) -> sleep."""

  def __init__(self, key: str = KEY, delay: float = 0.0):
    self.key, self.delay = key, delay
    self.script: dict[str, list] = {}
    self.requests = collections.Counter()
    self.bodies: list[dict] = []
    self.lock = threading.Lock()
    teacher = self

    class Handler(http.server.BaseHTTPRequestHandler):
      def log_message(self, *args):
        pass

      def do_POST(self):
        try:
          teacher.handle(self)
        except (BrokenPipeError, ConnectionResetError):  # the client gave up (a timeout test)
          pass

    self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    self.server.daemon_threads = True
    self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"
    threading.Thread(target=self.server.serve_forever, daemon=True).start()

  def handle(self, h):
    body = json.loads(h.rfile.read(int(h.headers["Content-Length"])))
    question = body["messages"][-1]["content"]
    with self.lock:
      self.requests[question] += 1
      self.bodies.append(body)
      replies = self.script.get(question, [("ok", good_reply(question))])
      kind, value = replies[min(self.requests[question], len(replies)) - 1]
    auth = h.headers.get("Authorization", "")
    if h.path != "/v1/chat/completions":
      kind, value = 404, "no such route"
    elif auth != f"Bearer {self.key}":
      kind, value = 401, f"invalid credentials: {auth!r}"  # echoes the key, as some servers do
    if kind == "hang":
      time.sleep(value)
      kind, value = "ok", good_reply(question)
    time.sleep(self.delay)
    status, text = (200, completion(value)) if kind == "ok" else (kind, value)
    data = text.encode()
    h.send_response(status)
    h.send_header("Content-Type", "application/json")
    h.send_header("Content-Length", str(len(data)))
    if status == 429:
      h.send_header("Retry-After", "0")
    h.end_headers()
    h.wfile.write(data)

  def close(self):
    self.server.shutdown()
    self.server.server_close()


def write_questions(path, n: int, extra: list[dict] = ()):
  rows = [{"id": f"q{i}", "question": f"What is {i + 3} plus {2 * i + 1}?", "answer": str(3 * i + 4)}
          for i in range(n)]
  path.write_text("".join(json.dumps(r) + "\n" for r in [*rows, *extra]))
  return path


def question(i: int) -> str:
  return f"What is {i + 3} plus {2 * i + 1}?"


def make_cfg(data, out, url, *overrides) -> Config:
  return config_io.load(Config, None, [
      "model.spec=smollm2-135m", "data.source=jsonl", f"data.path={data}", "data.size=1000", "data.eval_size=0",
      "data.max_prompt_tokens=160", "data.max_completion_tokens=128", "data.completion_buckets=[128]",
      f"distill.base_url={url}", "distill.model=fake-teacher", f"distill.output={out}",
      f"distill.api_key_env={KEY_ENV}", "distill.backoff=0.01", "distill.retries=2", "distill.timeout=1",
      "distill.concurrency=4", *overrides])


def read_rows(path) -> list[dict]:
  return [json.loads(line) for line in Path(path).read_text().splitlines()]


# --------------------------------------------------------------------------- one scripted run

LONG_QUESTION = {"id": "long", "question": "What is 1 plus 1? " + "Think about it carefully. " * 60, "answer": "2"}
SCRIPT = {  # question index -> (replies, what becomes of it)
    4: ([(429, "slow down"), (429, "slow down"), ("ok", None)], "kept"),
    5: ([(500, f"internal error for key {KEY}"), ("ok", None)], "kept"),
    6: ([(503, f"overloaded, key {KEY}")], "http_503"),
    7: ([(200, "<html>502 bad gateway</html>")], "bad_response"),
    8: ([("ok", "The answer is 25.")], "not_json"),
    9: ([("ok", json.dumps({"reasoning": "13 + 19 = 32.", "answer": "32", "checkpoints": ["13 * 19 = 247"]}))],
        "checkpoint_not_in_reasoning"),
    10: ([("ok", json.dumps({"reasoning": "13 + 21 = 33.", "answer": "33", "checkpoints": ["13 + 21 = 33"]}))],
         "wrong_answer"),
    11: ([("ok", json.dumps({"reasoning": "14 + 23 = 37.", "checkpoints": ["14 + 23 = 37"]}))], "missing_field"),
    12: ([("ok", json.dumps({"reasoning": "15 + 25 = 40. " + "Let me double check that sum once more. " * 40,
                             "answer": "40", "checkpoints": ["15 + 25 = 40"]}))], "completion_too_long"),
    13: ([("ok", json.dumps({"reasoning": "16 + 27 = 43.</reasoning>", "answer": "43",
                             "checkpoints": ["16 + 27 = 43"]}))], "contains_tag"),
    14: ([("hang", 3.0), ("ok", None)], "kept"),  # first attempt times out (timeout=1 s), the retry succeeds
    15: ([("ok", "```json\n" + json.dumps({"reasoning": "18 + 31 = 49.", "answer": 49,
                                           "checkpoints": ["18 + 31 = 49"]}) + "\n```")], "kept"),
    16: ([(400, f"bad request, key {KEY}")], "http_400"),
    17: ([("ok", json.dumps({"reasoning": "20 + 35 = 55.", "answer": "55", "checkpoints": []}))], "no_checkpoints"),
}
N_QUESTIONS = 18


@pytest.fixture(scope="module")
def scripted(tmp_path_factory):
  """One distill run over 18 scripted questions plus one over-long prompt."""
  tmp = tmp_path_factory.mktemp("distill")
  data = write_questions(tmp / "questions.jsonl", N_QUESTIONS, [LONG_QUESTION])
  teacher = FakeTeacher()
  for i, (replies, _) in SCRIPT.items():
    teacher.script[question(i)] = [("ok", good_reply(question(i))) if r == ("ok", None) else r for r in replies]
  cfg = make_cfg(data, tmp / "out" / "teacher.jsonl", teacher.url)
  printed = io.StringIO()
  with pytest.MonkeyPatch.context() as mp, contextlib.redirect_stdout(printed), contextlib.redirect_stderr(printed):
    mp.setenv(KEY_ENV, KEY)
    summary = distill.run(cfg)
    print(summary)
  yield cfg, teacher, summary, printed.getvalue()
  teacher.close()


def test_scripted_replies_are_kept_or_counted_by_reason(scripted):
  cfg, teacher, summary, _ = scripted
  fates = {f"q{i}": SCRIPT.get(i, (None, "kept"))[1] for i in range(N_QUESTIONS)}
  want_dropped = collections.Counter(f for f in fates.values() if f != "kept")
  want_dropped["prompt_too_long"] += 1
  assert summary.dropped == want_dropped
  assert summary.kept == sum(f == "kept" for f in fates.values()) and summary.already_done == 0
  assert summary.questions == N_QUESTIONS + 1

  rows = read_rows(cfg.distill.output)
  assert sorted(r["id"] for r in rows) == sorted(k for k, f in fates.items() if f == "kept")
  assert all(r["metadata"]["teacher"] == "fake-teacher" for r in rows)
  records, report = sources.load_teacher(cfg.distill.output, strict=True)  # the canonical schema
  assert report.kept == len(rows)
  gold = {f"q{i}": str(3 * i + 4) for i in range(N_QUESTIONS)}
  for r in records:
    assert r.answer == gold[r.id] and r.checkpoints and r.checkpoints[0] in r.reasoning


def test_retries_and_what_never_reaches_the_teacher(scripted):
  _, teacher, _, _ = scripted
  assert teacher.requests[question(4)] == 3  # two 429s, then the reply
  assert teacher.requests[question(5)] == 2
  assert teacher.requests[question(6)] == 3  # 1 + distill.retries, then counted
  assert teacher.requests[question(14)] == 2  # timed out once
  assert teacher.requests[question(16)] == 1  # a 400 is not retried
  assert teacher.requests[LONG_QUESTION["question"]] == 0  # over the prompt budget: never asked
  body = teacher.bodies[0]
  assert body["model"] == "fake-teacher" and body["response_format"] == {"type": "json_object"}
  assert body["messages"][0]["role"] == "system" and "checkpoints" in body["messages"][0]["content"]


def test_api_key_is_sent_but_never_shown(scripted):
  cfg, teacher, summary, printed = scripted
  assert summary.kept > 0  # so every request carried the key (the fake answers 401 otherwise)
  # the fake echoed the key in three error bodies; the summary shows them masked
  assert summary.examples["http_503"] == "overloaded, key ***" and summary.examples["http_400"] == "bad request, key ***"
  assert "overloaded, key ***" in printed and "distill: kept" in printed
  for shown in (printed, str(summary), json.dumps(summary.examples), open(cfg.distill.output).read(),
                repr(distill.Teacher(cfg.distill, KEY))):
    assert KEY not in shown


def test_rerun_skips_done_ids_and_retries_the_rest(scripted):
  cfg, teacher, first, _ = scripted
  before = dict(teacher.requests)
  with pytest.MonkeyPatch.context() as mp:
    mp.setenv(KEY_ENV, KEY)
    again = distill.run(cfg)
  assert again.already_done == first.kept and again.kept == 0
  kept_ids = {r["id"] for r in read_rows(cfg.distill.output)}
  assert len(read_rows(cfg.distill.output)) == len(kept_ids) == first.kept  # no duplicates
  for i in range(N_QUESTIONS):
    asked_again = teacher.requests[question(i)] - before.get(question(i), 0)
    assert (asked_again == 0) == (f"q{i}" in kept_ids), i
  assert again.dropped["prompt_too_long"] == 1


# --------------------------------------------------------------------------- units


@pytest.mark.parametrize("content,want", [
    ('{"reasoning": "2 + 2 = 4.", "answer": "4", "checkpoints": ["2 + 2 = 4"]}', ("2 + 2 = 4.", "4", ["2 + 2 = 4"])),
    ('Sure! {"reasoning": " r ", "answer": 4.5, "checkpoints": ["a", " "]} Hope it helps', ("r", "4.5", ["a"])),
])
def test_parse_reply_accepts_json_with_chatter(content, want):
  assert distill.parse_reply(content) == want


@pytest.mark.parametrize("content,reason", [
    ("no json here", "not_json"), ("{broken", "not_json"), ("[1, 2]", "not_json"),
    ('{"reasoning": "", "answer": "4", "checkpoints": []}', "missing_field"),
    ('{"reasoning": "r", "answer": "4", "checkpoints": "2 + 2 = 4"}', "missing_field"),
    ('{"reasoning": "r", "answer": true, "checkpoints": []}', "missing_field"),
])
def test_parse_reply_rejects(content, reason):
  with pytest.raises(distill.Rejected) as e:
    distill.parse_reply(content)
  assert e.value.reason == reason


def test_accept_checks_checkpoints_with_the_reward_normalisation():
  q = Record("q", "What is 1,200 times 3?", "", "3600", (), "math")
  reply = {"reasoning": "1,200 x 3 = 3,600 so the answer is 3600.", "answer": "$3,600", "checkpoints": ["1200*3=3600"]}
  record = distill.accept(q, json.dumps(reply))
  assert (record.answer, record.checkpoints, record.id) == ("3600", ("1200*3=3600",), "q")
  reply["checkpoints"] = ["1200*3=360"]  # must not match inside 3600
  with pytest.raises(distill.Rejected, match="checkpoint_not_in_reasoning"):
    distill.accept(q, json.dumps(reply))


def test_done_ids_cuts_a_torn_last_line(tmp_path):
  path = tmp_path / "t.jsonl"
  path.write_text('{"id": "a"}\n{"id": "b"}\n{"id": "c", "pro')
  assert distill.done_ids(path) == {"a", "b"}
  assert path.read_text() == '{"id": "a"}\n{"id": "b"}\n'
  path.write_text('{"id": "a"}\nnot json\n')
  with pytest.raises(UserError, match="t.jsonl:2: not a teacher row"):
    distill.done_ids(path)
  assert distill.done_ids(tmp_path / "missing.jsonl") == set()


def test_retry_after_header():
  assert distill._seconds("2") == 2.0 and distill._seconds("1e9") == distill.MAX_RETRY_AFTER
  assert distill._seconds(None) is None and distill._seconds("Wed, 21 Oct 2015 07:28:00 GMT") is None


# --------------------------------------------------------------------------- CLI: errors, kill and resume


def _cli(cfg_args, key, **popen):
  env = {**os.environ, "JAX_PLATFORMS": "cpu", KEY_ENV: key}
  return subprocess.Popen([sys.executable, "-m", "tpu_reason.distill", *cfg_args], env=env, text=True,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, **popen)


def _args(data, out, url, *extra):
  return ["model.spec=smollm2-135m", "data.source=jsonl", f"data.path={data}", "data.eval_size=0",
          "data.max_prompt_tokens=160", "data.max_completion_tokens=128", "data.completion_buckets=[128]",
          "--base-url", url, "--teacher", "fake-teacher", "--out", str(out), f"distill.api_key_env={KEY_ENV}",
          "distill.backoff=0.01", *extra]


@pytest.mark.slow
def test_wrong_key_stops_with_one_line_that_hides_it(tmp_path):
  teacher = FakeTeacher()
  try:
    data = write_questions(tmp_path / "q.jsonl", 4)
    wrong = "sk-wrong-key-abcdef987654"
    proc = _cli(_args(data, tmp_path / "t.jsonl", teacher.url), wrong)
    _, err = proc.communicate(timeout=300)
  finally:
    teacher.close()
  assert proc.returncode == 2
  lines = [ln for ln in err.splitlines() if ln.startswith("error:")]
  assert len(lines) == 1 and "the teacher rejected the API key (HTTP 401" in lines[0], err
  assert "***" in lines[0] and wrong not in err and "Traceback" not in err


@pytest.mark.slow
def test_killed_run_resumes_without_duplicates(tmp_path):
  teacher = FakeTeacher(delay=0.3)
  n = 16
  data = write_questions(tmp_path / "q.jsonl", n)
  out = tmp_path / "t.jsonl"
  args = _args(data, out, teacher.url, "--concurrency", "2")
  try:
    proc = _cli(args, KEY, start_new_session=True)
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None and len(out.read_text().splitlines() if out.exists() else []) < 3:
      time.sleep(0.1)
    assert proc.poll() is None, "the run finished before it could be killed"
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=60)
    first = [json.loads(line)["id"] for line in out.read_text().splitlines()]
    assert 3 <= len(first) < n
    with open(out, "a") as f:
      f.write('{"id": "torn", "prom')  # as if killed in the middle of a write

    proc = _cli(args, KEY)
    stdout, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err
  finally:
    teacher.close()
  ids = [r["id"] for r in read_rows(out)]
  assert len(ids) == len(set(ids)) == n and set(ids) == {f"q{i}" for i in range(n)}
  assert ids[: len(first)] == first
  assert all(teacher.requests[question(int(i[1:]))] == 1 for i in first)  # done rows were not asked again
  assert f"kept {n - len(first)} new rows, dropped 0 ({len(first)} of {n} questions were already done)" in stdout


@pytest.mark.slow
def test_nothing_kept_exits_nonzero_with_one_line(tmp_path):
  with socket.socket() as s:  # a port nobody listens on: every request is refused
    s.bind(("127.0.0.1", 0))
    url = f"http://127.0.0.1:{s.getsockname()[1]}/v1"
  data = write_questions(tmp_path / "q.jsonl", 3)
  proc = _cli(_args(data, tmp_path / "t.jsonl", url, "distill.retries=0"), KEY)
  out, err = proc.communicate(timeout=300)
  assert proc.returncode == 2, err
  lines = [ln for ln in err.splitlines() if ln.startswith("error:")]
  assert len(lines) == 1 and "no row kept: all 3 questions asked were dropped" in lines[0], err
  assert "Traceback" not in err and "kept 0 new rows" in out

"""`python -m tpu_reason.distill --config recipes/X.yaml --teacher NAME [--base-url URL] [--out FILE]`.

Builds the canonical teacher JSONL (`data.sources.load_teacher` reads it back) from a teacher
behind an OpenAI-compatible chat-completions API: DeepSeek, a local vLLM or llama.cpp server.
Questions come from the recipe's data section (its train split: held-out rows stay unseen).
The teacher replies with JSON {reasoning, answer, checkpoints}; a reply becomes a row only if

  * every checkpoint appears in the reasoning (`rewards.checkpoint_fraction` == 1),
  * its answer matches the gold answer (`rewards.answers_match`) when the source has one,
  * the rendered row fits the recipe's token budgets with the target model's tokenizer
    (`data.examples`, 256 prompt / 512 completion tokens on the TPU recipes): dropped, never
    truncated. Prompts over budget are counted without asking the teacher at all.

Rows are appended as they arrive and ids already in the output are skipped, so a killed run
resumes where it stopped. `distill.concurrency` requests run at once, each with a timeout;
429s, 5xx, timeouts and dropped connections are retried with exponential backoff. Any other
bad reply is counted by reason in the summary; only a rejected key (401/403) or an unknown
URL or model (404) stops the run. The API key is read from the environment variable named by
`distill.api_key_env`, sent only in the Authorization header, and scrubbed from every message.
"""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import http.client
import json
import os
import random
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from tpu_reason import config_io, models, rewards, tags
from tpu_reason.config import Config, DataCfg, DistillCfg
from tpu_reason.data import examples as data_examples, render as data_render
from tpu_reason.data.prepare import split_records
from tpu_reason.data.sources import Record, teacher_row
from tpu_reason.errors import UserError, cli

FLAGS = {"--base-url": "distill.base_url", "--teacher": "distill.model", "--out": "distill.output",
         "--concurrency": "distill.concurrency", "--limit": "distill.limit"}

SYSTEM_PROMPT = (
    "You write worked solutions for a student model. Solve the problem step by step, then reply with "
    "one JSON object and nothing else:\n"
    '{"reasoning": "...", "answer": "...", "checkpoints": ["...", "..."]}\n'
    "reasoning: the solution in plain text, no tags, under 250 words; write every calculation out "
    "as you do it, e.g. 4 * 2 = 8.\n"
    "answer: only the final answer, no units or words.\n"
    "checkpoints: 2 to 6 key intermediate results, each copied exactly as it appears in the reasoning."
)
FATAL = {401: "the teacher rejected the API key", 403: "the teacher refused access",
         404: "not found: check distill.base_url and distill.model"}
MAX_RETRY_AFTER = 60.0


class Rejected(Exception):
  """A question that yields no row; `reason` is its key in the summary."""

  def __init__(self, reason: str, detail: str = ""):
    super().__init__(f"{reason}: {detail}" if detail else reason)
    self.reason, self.detail = reason, detail


def scrub(text: str, secret: str) -> str:
  """`text` with every occurrence of `secret` masked."""
  return text.replace(secret, "***") if secret else text


# --------------------------------------------------------------------------- the teacher


@dataclasses.dataclass(frozen=True)
class Teacher:
  """A chat-completions endpoint; `ask` returns the reply text, retrying transient failures."""

  cfg: DistillCfg
  key: str = dataclasses.field(default="", repr=False)

  def body(self, question: str) -> bytes:
    return json.dumps({
        "model": self.cfg.model,
        "messages": [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": question}],
        "temperature": self.cfg.temperature,
        "max_tokens": self.cfg.max_tokens,
        "response_format": {"type": "json_object"},
    }).encode()

  def post(self, body: bytes) -> tuple[int, str, str | None]:
    """(status, body text, Retry-After header) of one request."""
    headers = {"Content-Type": "application/json"}
    if self.key:
      headers["Authorization"] = f"Bearer {self.key}"
    request = urllib.request.Request(self.cfg.base_url.rstrip("/") + "/chat/completions", body, headers)
    try:
      with urllib.request.urlopen(request, timeout=self.cfg.timeout) as resp:
        return resp.status, resp.read().decode("utf-8", "replace"), None
    except urllib.error.HTTPError as e:
      return e.code, e.read().decode("utf-8", "replace"), e.headers.get("Retry-After")

  def ask(self, question: str) -> str:
    """The reply's message content; raises Rejected (or UserError when no request can succeed)."""
    body = self.body(question)
    for attempt in range(self.cfg.retries + 1):
      wait = None
      try:
        status, text, retry_after = self.post(body)
      except (OSError, http.client.HTTPException) as e:
        timed_out = isinstance(e, TimeoutError) or isinstance(getattr(e, "reason", None), TimeoutError)
        reason, detail = ("timeout" if timed_out else "network_error"), f"{type(e).__name__}: {e}"
      else:
        text = scrub(text, self.key)  # a server may echo the key back: nothing downstream sees it
        if status == 200:
          return message_content(text)
        detail = " ".join(text.split())[:200]
        if status in FATAL:
          raise UserError(f"{FATAL[status]} (HTTP {status} from {self.cfg.base_url}): {detail}")
        reason = f"http_{status}"
        if status != 429 and status < 500:
          raise Rejected(reason, detail)
        wait = _seconds(retry_after)
      if attempt < self.cfg.retries:
        time.sleep(wait if wait is not None else self.cfg.backoff * 2**attempt * random.uniform(0.5, 1.0))
    raise Rejected(reason, scrub(detail, self.key))


def _seconds(retry_after: str | None) -> float | None:
  """A Retry-After header in seconds (capped), or None when absent or a date."""
  try:
    return min(max(float(retry_after), 0.0), MAX_RETRY_AFTER)
  except (TypeError, ValueError):
    return None


def message_content(text: str) -> str:
  """choices[0].message.content of a chat-completions response body."""
  try:
    content = json.loads(text)["choices"][0]["message"]["content"]
  except (json.JSONDecodeError, KeyError, IndexError, TypeError):
    raise Rejected("bad_response", " ".join(text.split())[:200]) from None
  if not isinstance(content, str):
    raise Rejected("bad_response", "message content is not text")
  return content


# --------------------------------------------------------------------------- validation


def parse_reply(content: str) -> tuple[str, str, list[str]]:
  """(reasoning, answer, checkpoints) from the teacher's JSON (code fences and chatter around it allowed)."""
  start = content.find("{")
  try:
    obj, _ = json.JSONDecoder().raw_decode(content[start:]) if start >= 0 else (None, 0)
  except json.JSONDecodeError:
    obj = None
  if not isinstance(obj, dict):
    raise Rejected("not_json", " ".join(content.split())[:200])
  reasoning, answer, checkpoints = obj.get("reasoning"), obj.get("answer"), obj.get("checkpoints")
  if isinstance(answer, (int, float)) and not isinstance(answer, bool):
    answer = str(answer)
  if not (isinstance(reasoning, str) and reasoning.strip() and isinstance(answer, str) and answer.strip()):
    raise Rejected("missing_field", "reasoning and answer must be non-empty strings")
  if not isinstance(checkpoints, list) or not all(isinstance(c, str) for c in checkpoints):
    raise Rejected("missing_field", "checkpoints must be a list of strings")
  return reasoning.strip(), answer.strip(), [c for c in checkpoints if c.strip()]


def accept(question: Record, content: str) -> Record:
  """The teacher's reply as a record, if its checkpoints, answer and tags check out."""
  reasoning, answer, checkpoints = parse_reply(content)
  if not checkpoints:
    raise Rejected("no_checkpoints")
  if rewards.checkpoint_fraction(reasoning, checkpoints) < 1.0:
    missing = [c for c in checkpoints if rewards.checkpoint_fraction(reasoning, [c]) < 1.0]
    raise Rejected("checkpoint_not_in_reasoning", repr(missing[0]))
  if question.answer and not rewards.answers_match(answer, question.answer):
    raise Rejected("wrong_answer", f"{answer!r} != gold {question.answer!r}")
  if "</reasoning>" in reasoning or "</answer>" in answer:
    raise Rejected("contains_tag")
  return Record(question.id, question.prompt, reasoning, question.answer or answer, tuple(checkpoints),
                question.domain)


def prompt_fits(question: Record, model: Any, data: DataCfg, schema: tags.TagSchema) -> bool:
  """Whether the rendered prompt fits data.max_prompt_tokens (checked before asking the teacher)."""
  prompt_text, _ = data_render.render(question, model, schema, data.system_prompt)
  return len(model.encode(prompt_text)) <= data.max_prompt_tokens


def check_budget(record: Record, model: Any, data: DataCfg, schema: tags.TagSchema):
  """Raise Rejected unless the row renders and fits the budgets exactly as training will build it."""
  examples, report = data_examples.build_examples(
      [record], model, schema, system_prompt=data.system_prompt, max_prompt_tokens=data.max_prompt_tokens,
      max_completion_tokens=data.max_completion_tokens, buckets=data.completion_buckets)
  if not examples:
    (reason,) = report.dropped
    raise Rejected(reason)


# --------------------------------------------------------------------------- output


def done_ids(path: Path) -> set[str]:
  """Ids already in the output; a torn last line (a run killed mid-write) is cut off first, once every whole
  line has read as a teacher row (a file of something else is refused, never cut)."""
  if path.is_dir():
    raise UserError(f"distill.output={path} is a directory: give a .jsonl file (appended to)")
  if not path.exists():
    if path.parent.exists() and not path.parent.is_dir():
      raise UserError(f"distill.output={path}: {path.parent} is a file, not a directory")
    return set()
  data = path.read_bytes()
  whole = data[: data.rfind(b"\n") + 1]
  ids = set()
  for lineno, line in enumerate(whole.splitlines(), start=1):
    try:
      ids.add(str(json.loads(line.decode("utf-8"))["id"]))
    except (UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError):
      raise UserError(f"{path}:{lineno}: not a teacher row; fix or move the file before resuming") from None
  if len(whole) < len(data):
    if not data[len(whole):].startswith(b'{"'):  # not the start of a row this command wrote
      raise UserError(f"{path}:{len(ids) + 1}: not a teacher row; fix or move the file before resuming")
    with open(path, "r+b") as f:
      f.truncate(len(whole))
  return ids


@dataclasses.dataclass
class Summary:
  """What one run did: rows kept, questions dropped by reason (with one example each)."""

  questions: int
  already_done: int
  kept: int = 0
  dropped: collections.Counter = dataclasses.field(default_factory=collections.Counter)
  examples: dict[str, str] = dataclasses.field(default_factory=dict)

  def drop(self, e: Rejected):
    self.dropped[e.reason] += 1
    self.examples.setdefault(e.reason, e.detail)

  def __str__(self) -> str:
    lines = [f"distill: kept {self.kept} new rows, dropped {sum(self.dropped.values())}"
             f" ({self.already_done} of {self.questions} questions were already done)"]
    lines += [f"  {reason:<28} {n:>6}" + (f"  e.g. {self.examples[reason][:120]}" if self.examples[reason] else "")
              for reason, n in self.dropped.most_common()]
    return "\n".join(lines)


def run(cfg: Config) -> Summary:
  """Ask the teacher every pending question of cfg.data's train split; append kept rows to distill.output."""
  from tqdm.auto import tqdm

  d = cfg.distill
  if not d.model:
    raise UserError("name the teacher model: --teacher NAME (distill.model)")
  teacher = Teacher(d, os.environ.get(d.api_key_env, ""))
  out = Path(d.output)
  done = done_ids(out)  # the output checked (and a torn last row cut) before anything else
  questions = list({r.id: r for r in split_records(cfg.data).train}.values())
  model = models.load(cfg.model.spec, weights=False)  # the target's tokenizer and chat template
  schema = tags.get_schema(cfg.data.schema)
  new = [p for p in (out, out.parent, *out.parent.parents) if not p.exists()]  # removed again if nothing is kept
  out.parent.mkdir(parents=True, exist_ok=True)
  pending = [q for q in questions if q.id not in done][: d.limit or None]
  summary = Summary(len(questions), sum(q.id in done for q in questions))
  ask = []
  for q in pending:
    if prompt_fits(q, model, cfg.data, schema):
      ask.append(q)
    else:
      summary.drop(Rejected("prompt_too_long"))
  bar = tqdm(total=len(pending), initial=len(pending) - len(ask), desc="distill", dynamic_ncols=True)
  with open(out, "a", encoding="utf-8") as f, concurrent.futures.ThreadPoolExecutor(d.concurrency) as pool:
    futures = {pool.submit(teacher.ask, q.prompt): q for q in ask}
    try:
      for future in concurrent.futures.as_completed(futures):
        question = futures[future]
        try:
          record = accept(question, future.result())
          check_budget(record, model, cfg.data, schema)
        except Rejected as e:
          summary.drop(e)
        else:
          f.write(json.dumps(teacher_row(record, teacher=d.model), ensure_ascii=False) + "\n")
          f.flush()  # one whole line per write: a kill can only tear the last one
          summary.kept += 1
        bar.update(1)
        bar.set_postfix(kept=summary.kept, dropped=sum(summary.dropped.values()))
    except BaseException:
      pool.shutdown(wait=False, cancel_futures=True)
      raise
    finally:
      bar.close()
      if new and new[0] == out and out.stat().st_size == 0:  # a run that kept nothing leaves no new empty file
        out.unlink()  # (or folder) behind
        for folder in new[1:]:
          folder.rmdir()
  return summary


@cli
def main(argv: list[str] | None = None):
  cfg, _ = config_io.parse_args(Config, sys.argv[1:] if argv is None else argv, FLAGS)
  summary = run(cfg)
  print(summary)
  if summary.kept == 0 and summary.dropped:  # e.g. the endpoint refused every request
    reason, n = summary.dropped.most_common(1)[0]
    raise UserError(f"no row kept: all {sum(summary.dropped.values())} questions asked were dropped "
                    f"({n} {reason}{': ' + summary.examples[reason][:160] if summary.examples[reason] else ''})")
  print(f"output: {cfg.distill.output} (train on it with data.source=teacher data.path={cfg.distill.output})")


if __name__ == "__main__":
  main()

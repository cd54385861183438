"""Records as chat-template text and token ids: what a row says before it gets a static shape."""

from __future__ import annotations

from typing import Any

from tpu_reason.data.sources import Record
from tpu_reason.tags import TagSchema


def render(record: Record, model: Any, schema: TagSchema, system_prompt: str = "") -> tuple[str, str]:
  """(prompt text ending in the primer, completion text after the primer)."""
  prompt = model.chat_prompt(messages(record, system_prompt), primer=schema.primer)
  target = schema.render_target(record.reasoning, record.answer)
  assert target.startswith(schema.primer), (schema.name, target[:40])
  return prompt, target[len(schema.primer) :]


def messages(record: Record, system_prompt: str) -> list[dict]:
  """The chat turns of a record's prompt: the system prompt (if any), then the user's."""
  system = [{"role": "system", "content": system_prompt}] if system_prompt else []
  return system + [{"role": "user", "content": record.prompt}]


def round_trips(record: Record, schema: TagSchema, completion_text: str) -> bool:
  """Whether the rendered target parses back, well formed, to the record's answer.

  A reasoning text containing the schema's markers (or a multi-line answer in a
  tagless schema) would otherwise teach a format the reward parser rejects.
  """
  parsed = schema.parse(schema.primer + completion_text)
  return parsed.well_formed and parsed.answer == record.answer.strip()


def tokenize(model: Any, prompt_text: str, completion_text: str, eot: int) -> tuple[list[int], list[int]]:
  """(prompt ids, completion ids + end-of-turn id `eot`), tokenized separately.

  Separately, not as one string: at generation time the model continues from
  exactly these prompt ids, so a merge across the boundary must not be learned.
  """
  prompt_ids = model.encode(prompt_text)
  completion_ids = model.tokenizer.encode(completion_text, add_special_tokens=False)
  return prompt_ids, completion_ids + [eot]

"""Diversity stage: stratified sampling to a target size over a topic field.

Strata come from the `domain` column (the task name for reasoning-gym rows) or,
when every row shares one domain (or curate.strata=keywords), from a coarse
keyword bucketer over the question text (`KEYWORD_TOPICS`: the first topic with
a keyword starting a word wins, else "other").

Allocation is balanced: every stratum gets the same quota, and strata too small
to fill theirs hand the rest to the larger ones (water-filling). The set then
has exactly min(target, rows available) rows and is as even across topics as the
pool allows. Within a stratum the rows are a seeded random sample, kept in pool
order.
"""

from __future__ import annotations

import collections
import re
import zlib
from collections.abc import Mapping, Sequence

import numpy as np

from tpu_reason.data.sources import Record

REASONS = ("over_quota",)

KEYWORD_TOPICS: tuple[tuple[str, tuple[str, ...]], ...] = (
  ("geometry", ("triangle", "circle", "radius", "diameter", "area", "perimeter", "angle", "rectangle", "volume")),
  ("probability", ("probability", "chance", "dice", "coin", "odds", "random")),
  ("combinatorics", ("how many ways", "arrangement", "combination", "permutation")),
  ("number_theory", ("prime", "divisible", "remainder", "factor", "gcd", "lcm", "digit")),
  ("algebra", ("solve for", "equation", "variable", "polynomial", "function")),
  ("money", ("$", "£", "€", "dollar", "price", "cost", "pay", "paid", "earn", "profit", "discount", "sell", "buy")),
  ("time_and_rates", ("hour", "minute", "second", "speed", "per day", "per week", "rate", "km", "mile")),
  ("counting", ("how many", "total", "count")),
)
_TOPIC_PATTERNS = tuple(
  (topic, re.compile("|".join(r"(?<!\w)" + re.escape(k) for k in keys))) for topic, keys in KEYWORD_TOPICS
)


def keyword_topic(question: str) -> str:
  """The question's topic by `KEYWORD_TOPICS`, or "other"."""
  text = question.casefold()
  return next((topic for topic, pattern in _TOPIC_PATTERNS if pattern.search(text)), "other")


def strata(records: Sequence[Record], mode: str = "auto") -> tuple[list[str], str]:
  """(stratum of each row, the field used: "domain" or "keywords"); `mode` one of choices.STRATA."""
  if mode == "auto":
    mode = "domain" if len({r.domain for r in records}) > 1 else "keywords"
  if mode == "domain":
    return [r.domain for r in records], mode
  return [keyword_topic(r.prompt) for r in records], mode


def allocate(sizes: Mapping[str, int], target: int) -> dict[str, int]:
  """Per-stratum quotas, as equal as the sizes allow, summing to min(target, total).

  Strata are filled smallest first, each taking an equal share of what is left;
  a stratum smaller than its share takes all it has, so the share of the larger
  ones grows.
  """
  left = min(target, sum(sizes.values()))
  order = sorted(sizes, key=lambda s: (sizes[s], s))
  quotas = {}
  for i, name in enumerate(order):
    quotas[name] = min(sizes[name], left // (len(order) - i))
    left -= quotas[name]
  assert left == 0, (sizes, target, quotas)
  return dict(sorted(quotas.items()))


def verdicts(keys: Sequence[str], target: int, seed: int = 0) -> tuple[list[str | None], dict[str, int]]:
  """(per row None if sampled else "over_quota", quota per stratum)."""
  members = collections.defaultdict(list)
  for i, key in enumerate(keys):
    members[key].append(i)
  quotas = allocate({k: len(v) for k, v in members.items()}, target)
  out: list[str | None] = ["over_quota"] * len(keys)
  for key, rows in members.items():
    # Seeded by the stratum's name, so adding a stratum does not reshuffle the others.
    rng = np.random.default_rng([seed, zlib.crc32(key.encode())])
    for j in rng.permutation(len(rows))[: quotas[key]]:
      out[rows[j]] = None
  return out, quotas

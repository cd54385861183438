"""Tests for tpu_reason.curate.diversity: strata, balanced quotas, seeded sampling."""

import collections

from hypothesis import given
from hypothesis import strategies as st

from tpu_reason.curate import diversity
from tpu_reason.data.sources import Record


def _rec(prompt: str, domain: str = "math") -> Record:
  return Record(prompt, prompt, "", "1", (), domain)


def test_keyword_topics():
  assert diversity.keyword_topic("What is the area of a circle of radius 2?") == "geometry"
  assert diversity.keyword_topic("A coin is tossed twice; what is the probability of two heads?") == "probability"
  assert diversity.keyword_topic("She buys 3 pens at $2 each.") == "money"
  assert diversity.keyword_topic("How many hours are in 3 days?") == "time_and_rates"
  assert diversity.keyword_topic("How many legs do 3 spiders have?") == "counting"
  assert diversity.keyword_topic("Name the capital of France.") == "other"
  # keywords start a word: "are" is not "area", "prepay" is not "pay"
  assert diversity.keyword_topic("There are apples; prepay later.") == "other"


def test_strata_auto_uses_domain_only_when_it_varies():
  mixed = [_rec("Find the area of a square.", "a"), _rec("Sell 3 pens for $1.", "b")]
  assert diversity.strata(mixed) == (["a", "b"], "domain")
  same = [_rec("Find the area of a square."), _rec("Sell 3 pens for $1.")]
  assert diversity.strata(same) == (["geometry", "money"], "keywords")
  assert diversity.strata(mixed, "keywords") == (["geometry", "money"], "keywords")
  assert diversity.strata(same, "domain") == (["math", "math"], "domain")


def test_allocate_is_balanced_and_hands_leftovers_to_bigger_strata():
  assert diversity.allocate({"a": 10, "b": 10, "c": 10}, 9) == {"a": 3, "b": 3, "c": 3}
  assert diversity.allocate({"a": 10, "b": 10, "c": 10}, 10) == {"a": 3, "b": 3, "c": 4}
  assert diversity.allocate({"a": 1, "b": 2, "c": 50}, 30) == {"a": 1, "b": 2, "c": 27}
  assert diversity.allocate({"a": 5, "b": 8, "c": 20}, 18) == {"a": 5, "b": 6, "c": 7}
  assert diversity.allocate({"a": 3, "b": 4}, 100) == {"a": 3, "b": 4}  # fewer rows than the target


@given(st.dictionaries(st.text("abcdef", min_size=1, max_size=3), st.integers(0, 40), max_size=8), st.integers(1, 150))
def test_allocate_sums_to_what_is_possible_and_never_exceeds_a_stratum(sizes, target):
  quotas = diversity.allocate(sizes, target)
  assert sum(quotas.values()) == min(target, sum(sizes.values()))
  assert all(0 <= quotas[k] <= sizes[k] for k in sizes)
  # balanced: a stratum below another's quota is full
  assert all(quotas[a] == sizes[a] for a in sizes for b in sizes if quotas[a] + 1 < quotas[b])


def test_verdicts_sample_each_stratum_to_its_quota_reproducibly():
  keys = ["a"] * 12 + ["b"] * 3 + ["c"] * 7
  out, quotas = diversity.verdicts(keys, 10, seed=0)
  assert quotas == {"a": 4, "b": 3, "c": 3}
  picked = collections.Counter(k for k, v in zip(keys, out) if v is None)
  assert picked == quotas
  assert collections.Counter(out)["over_quota"] == 12
  assert diversity.verdicts(keys, 10, seed=0)[0] == out
  assert diversity.verdicts(keys, 10, seed=1)[0] != out

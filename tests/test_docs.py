"""The README and the docs pages: short README, every relative link and anchor resolves, the first screen
holds what a new user needs (the two commands, what they print, the Kaggle path)."""

import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PAGES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
FENCE = re.compile(r"^```.*?^```", re.M | re.S)


def slug(heading: str) -> str:
  """GitHub's anchor of a heading: lower case, punctuation dropped (not - or _), each space a hyphen."""
  return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def anchors(page: Path) -> set[str]:
  text = FENCE.sub("", page.read_text())
  return {slug(m.group(1)) for m in re.finditer(r"^#+\s+(.*)$", text, re.M)}


def links(page: Path) -> list[str]:
  return [m.group(1) for m in LINK.finditer(FENCE.sub("", page.read_text()))
          if not re.match(r"[a-z]+:", m.group(1))]  # http(s):, mailto: ... are not checked offline


def test_slug_follows_github():
  assert slug("Models — `model` / `model.spec`") == "models--model--modelspec"
  assert slug("Eval, chat, export") == "eval-chat-export"
  assert slug("Teacher data (`python -m tpu_reason.distill`)") == "teacher-data-python--m-tpu_reasondistill"


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_every_relative_link_and_anchor_resolves(page):
  broken = []
  for link in links(page):
    path, _, anchor = link.partition("#")
    target = (page.parent / path).resolve() if path else page
    if not target.exists():
      broken.append(f"{link}: no file {target.relative_to(REPO) if target.is_relative_to(REPO) else target}")
    elif anchor and target.suffix == ".md" and anchor not in anchors(target):
      broken.append(f"{link}: no heading with anchor #{anchor} in {target.name}")
  assert not broken, f"{page.name}: " + "; ".join(broken)


def test_readme_is_short_and_its_first_screen_has_the_commands_what_they_print_and_kaggle():
  lines = (REPO / "README.md").read_text().splitlines()
  assert len(lines) <= 200
  screen = "\n".join(lines[:45])
  assert "python -m tpu_reason.sft" in screen and "python -m tpu_reason.grpo" in screen
  assert "before/after" in screen  # what each prints
  assert "Kaggle" in screen and "(#run-on-kaggle)" in screen
  assert "run-on-kaggle" in anchors(REPO / "README.md")

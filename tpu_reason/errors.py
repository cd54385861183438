"""User-facing errors: CLIs print these as one line instead of a traceback."""

from __future__ import annotations

import functools
import sys


class UserError(ValueError):
  """A mistake in the user's input (config, path, model spec): shown as one line."""


def cli(main):
  """Decorate a CLI `main` so a UserError exits 2 with `error: <message>`."""

  @functools.wraps(main)
  def wrapper(*args, **kwargs):
    try:
      return main(*args, **kwargs)
    except UserError as e:
      print(f"error: {e}", file=sys.stderr)
      sys.exit(2)
    except KeyboardInterrupt:
      print("interrupted", file=sys.stderr)
      sys.exit(130)

  return wrapper

"""User-facing errors and interrupts: CLIs print these as one line instead of a traceback."""

from __future__ import annotations

import functools
import os
import signal
import sys
import threading


class UserError(ValueError):
  """A mistake in the user's input (config, path, model spec): shown as one line."""


def first_line(e: BaseException) -> str:
  """`Type: first line of the message` (at most 200 characters): a library error inside one error line."""
  return f"{type(e).__name__}: {(str(e).strip().splitlines() or [''])[0][:200]}"


_pending: list[int] = []  # Ctrl-Cs received: their KeyboardInterrupt may have been dropped


def _on_interrupt(signum, frame):
  _pending.append(signum)
  raise KeyboardInterrupt


def check_interrupt():
  """Raise the KeyboardInterrupt of a Ctrl-C that landed where Python drops exceptions.

  A signal that arrives while a GC callback (e.g. jax's) or a __del__ runs raises there, is
  printed as 'Exception ignored' and lost: the run would carry on. Loops call this at safe points.
  """
  if _pending:
    raise KeyboardInterrupt


def _unraisable(info):
  """Python's hook for exceptions it must drop: a Ctrl-C's is silent (check_interrupt raises it later)."""
  if not issubclass(info.exc_type, KeyboardInterrupt):
    sys.__unraisablehook__(info)


def cli(main):
  """Decorate a CLI `main` so a UserError exits 2 with `error: <message>` and Ctrl-C exits 130."""

  @functools.wraps(main)
  def wrapper(*args, **kwargs):
    main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGINT, _on_interrupt) if main_thread else None
    sys.unraisablehook = _unraisable
    try:
      return main(*args, **kwargs)
    except UserError as e:
      print(f"error: {e}", file=sys.stderr)
      sys.exit(2)
    except KeyboardInterrupt:
      # Whatever had to be saved is saved by now; skip the interpreter's teardown, which can
      # crash (SIGSEGV) when the interrupt left XLA's threads mid-compile.
      print("interrupted", file=sys.stderr)
      sys.stdout.flush()
      sys.stderr.flush()
      os._exit(130)
    finally:
      if previous is not None:
        signal.signal(signal.SIGINT, previous)

  return wrapper

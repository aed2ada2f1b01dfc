"""The one prologue of every main: absl app, stray-argument check, quiet logs, clean errors.

  def main():
    print(some_lib.do(FLAG.value))

  if __name__ == "__main__":
    cli_lib.run(main)

Bad input (a ValueError, raised before any compute by the libraries) is printed as
one line `error: ...` on stderr and exits with status 2.
"""

from __future__ import annotations

import sys
from collections.abc import Callable

import numpy as np
from absl import app, flags, logging

EXIT_BAD_INPUT = 2


def run(main: Callable[[], object], *, errors: tuple[type[BaseException], ...] = ()) -> None:
  """`app.run(main)` with the shared prologue; `errors` are extra exception types to report
  like a ValueError (e.g. a non-finite loss)."""

  def _main(argv):
    if len(argv) > 1:
      raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    if not flags.FLAGS["verbosity"].present:  # orbax logs every file at INFO
      logging.set_verbosity(logging.WARNING)
    try:
      main()
    except (ValueError, *errors) as e:
      print(f"error: {e}", file=sys.stderr, flush=True)
      sys.exit(EXIT_BAD_INPUT)

  app.run(_main)


def check_int(value, name: str, lo: int) -> int:
  """`value` as an int >= lo, or a ValueError naming `name` (bools are not ints here)."""
  if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < lo:
    raise ValueError(f"{name}={value!r} must be an int >= {lo}")
  return int(value)

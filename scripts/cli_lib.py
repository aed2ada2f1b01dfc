"""The one prologue of every main: absl app, stray-argument check, quiet logs, clean errors.

  def main():
    print(some_lib.do(FLAG.value))

  if __name__ == "__main__":
    cli_lib.run(main)

Bad input exits with status 2 and one line `error: ...` on stderr, before any compute:
a ValueError raised by the libraries, an OSError (missing / unreadable file, named by the
error), and a flag that does not parse, including an ml_collections override of a config
field that does not exist (`--config.train.stepz=10`), which ml_collections reports as an
AttributeError / KeyError traceback naming no flag. `read_json` is the one way the
scripts read a user-supplied JSON file, so a junk one is named with what is wrong with it.
"""

from __future__ import annotations

import json
import os
import re
import sys
from collections.abc import Callable

import numpy as np
from absl import app, flags, logging
from ml_collections import config_flags
from ml_collections.config_flags.config_flags import is_config_flag  # public, not re-exported

EXIT_BAD_INPUT = 2


def one_line(text: str) -> str:
  """`text` on one line (absl, orbax and ml_collections messages run over several)."""
  return " ".join(ln.strip() for ln in str(text).splitlines() if ln.strip())


def refuse(message: str) -> None:
  """Prints `error: message` (one line) on stderr and exits with EXIT_BAD_INPUT.

  The exit skips interpreter teardown (`os._exit`, after flushing): a failed orbax /
  TensorStore read leaves futures that complete into a closed event loop at teardown and
  print "Event loop is closed" tracebacks under the one error line. Every file a main
  writes is closed by its own `finally` / context managers before the error gets here.
  """
  print(f"error: {one_line(message)}", file=sys.stderr, flush=True)
  sys.stdout.flush()
  logging.flush()
  os._exit(EXIT_BAD_INPUT)


def _config_flag_names() -> list[str]:
  return [n for n in flags.FLAGS if is_config_flag(flags.FLAGS[n])]


def _unknown_field(argv: list[str], e: BaseException) -> str:
  """The message for an override naming a missing config field, e.g. --config.train.stepz.

  ml_collections raises AttributeError / KeyError('\\'stepz\\'\\nDid you mean "steps"...')
  from inside the --config flag's parser, so the override is found back in argv by the key.
  """
  text = str(e).replace("\\'", "'").replace("\\n", "\n")
  key = re.search(r"'([^'\s]+)'", text)
  key = key.group(1) if key else None
  hint = re.search(r'Did you mean "([^"]+)"', text)
  hint = f' (did you mean "{hint.group(1)}"?)' if hint else ""
  overrides = [a[2:].split("=", 1)[0] for a in argv[1:]
               if any(a.startswith(f"--{n}.") for n in _config_flag_names())]
  for name in overrides:
    parts = name.split(".")
    if key in parts[1:]:
      parent = ".".join(parts[:parts.index(key, 1)])
      return f"--{name}: {parent} has no field {key!r}{hint}"
  overrides = [f"--{n}" for n in overrides]
  return f"{' / '.join(overrides) or _typed_config_files(argv)}: {one_line(text)}"


def _typed_config_files(argv: list[str]) -> str:
  """The `--config=FILE` arguments as typed (for an error raised while loading FILE)."""
  names = {f"--{n}" for n in _config_flag_names()}
  return " / ".join(a for a in argv[1:] if a.split("=", 1)[0] in names) or "a config flag"


def _check_config_files() -> None:
  """Refuses a --config file that failed to load: ml_collections defers that error to the
  first use of the config, where it surfaces as a many-line OSError traceback."""
  for name in _config_flag_names():
    flag = flags.FLAGS[name]
    if not flag.present:
      continue
    try:
      hasattr(flag.value, "_sparq_probe")  # a failed load raises on any attribute
    except OSError as e:
      cause = e.__cause__ or e
      lines = [ln.strip() for ln in str(cause).splitlines() if ln.strip()]
      refuse(f"--{name}={config_flags.get_config_filename(flag)}: cannot load the config "
             f"file ({lines[-1] if lines else type(cause).__name__})")


def _parse_flags(argv: list[str]) -> list[str]:
  """`FLAGS(argv)` with every parsing failure reported as one line naming the flag."""
  try:
    rest = flags.FLAGS(argv)
  except flags.UnrecognizedFlagError as e:
    refuse(f"--{e.flagname}: {e}")
  except flags.Error as e:  # absl's own messages name the flag: "flag --x=v: ..."
    refuse(str(e))
  except (AttributeError, KeyError) as e:  # ml_collections: an override of a missing field
    refuse(_unknown_field(argv, e))
  except SyntaxError as e:  # a config file that is not Python
    refuse(f"{_typed_config_files(argv)}: {e.filename} line {e.lineno}: {e.msg}")
  _check_config_files()
  if not flags.FLAGS["verbosity"].present:  # orbax logs every file at INFO
    logging.set_verbosity(logging.WARNING)  # under app.run this sets Python's root level too
  return rest


def run(main: Callable[[], object], *, errors: tuple[type[BaseException], ...] = ()) -> None:
  """`app.run(main)` with the shared prologue; `errors` are extra exception types to report
  like a ValueError (e.g. a non-finite loss)."""

  def _main(argv):
    if len(argv) > 1:
      refuse(f"unexpected arguments {argv[1:]} (flags are --name=value)")
    try:
      main()
    except (ValueError, OSError, *errors) as e:
      refuse(str(e) or type(e).__name__)

  app.run(_main, flags_parser=_parse_flags)


def check_int(value, name: str, lo: int) -> int:
  """`value` as an int >= lo, or a ValueError naming `name` (bools are not ints here)."""
  if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < lo:
    raise ValueError(f"{name}={value!r} must be an int >= {lo}")
  return int(value)


def read_json(path: str, what: str = "", *, kind: type | None = dict):
  """The parsed JSON file at `path`, or a one-line ValueError naming `what` (the flag the
  user typed, e.g. "--model=/x") and the file, and what is wrong with it.

  kind: the type the top level must have (None: any).
  """
  where = f"{what}: {path}" if what else path
  try:
    with open(path, "rb") as f:
      data = f.read()
  except FileNotFoundError:
    raise ValueError(f"{where} does not exist") from None
  except OSError as e:
    raise ValueError(f"{where} cannot be read ({e.strerror or e})") from None
  try:
    value = json.loads(data)
  except json.JSONDecodeError as e:
    raise ValueError(f"{where} is not valid JSON (line {e.lineno} column {e.colno}: "
                     f"{e.msg})") from None
  except UnicodeDecodeError as e:
    raise ValueError(f"{where} is not valid JSON (not UTF-8 text at byte {e.start})") from None
  if kind is not None and not isinstance(value, kind):
    raise ValueError(f"{where} is not valid here: expected a JSON "
                     f"{'object' if kind is dict else kind.__name__}, got "
                     f"{type(value).__name__}")
  return value

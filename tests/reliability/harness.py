"""Shared checks of the failure-behaviour matrix: how a refused input must look.

A CLI refusal exits with status 2 and prints exactly one `error: ...` line on stderr that
names the argument or file; no traceback; nothing written to the output folder.
"""

from __future__ import annotations

import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def run_cli(module: str, *args: str, timeout: int = 300) -> subprocess.CompletedProcess:
  """`python -m <module> <args>` from the repository root, on CPU, output captured."""
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=ROOT)
  return subprocess.run([sys.executable, "-m", module, *args], cwd=ROOT, env=env,
                        capture_output=True, text=True, timeout=timeout, check=False)


def error_line(proc: subprocess.CompletedProcess) -> str:
  """The one `error:` line of a refused run (AssertionError with the run's output otherwise)."""
  report = f"rc={proc.returncode}\nstdout:\n{proc.stdout[-2000:]}\nstderr:\n{proc.stderr[-4000:]}"
  assert proc.returncode == 2, report
  assert "Traceback" not in proc.stderr, report
  errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("error:")]
  assert len(errors) == 1, report
  return errors[0]


def assert_refused(proc: subprocess.CompletedProcess, *names: str) -> str:
  """Exit 2, one `error:` line naming every one of `names`, no traceback; returns the line."""
  line = error_line(proc)
  for name in names:
    assert name in line, f"{name!r} not named in {line!r}"
  return line


def assert_one_line(message: str, *names: str) -> None:
  """An API error message: one line naming every one of `names`."""
  assert "\n" not in message.strip(), message
  for name in names:
    assert name in message, f"{name!r} not named in {message!r}"


def snapshot(path: str) -> dict[str, tuple[int, int]]:
  """{relative path: (size, mtime_ns)} of every file under `path` ({} if absent)."""
  out = {}
  if not os.path.exists(path):
    return out
  for root, _, files in os.walk(path):
    for name in files:
      p = os.path.join(root, name)
      st = os.stat(p)
      out[os.path.relpath(p, path)] = (st.st_size, st.st_mtime_ns)
  return out

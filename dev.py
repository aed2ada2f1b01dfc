#!/usr/bin/env python3
"""The two set-up-and-run commands (only a Python 3.11+ interpreter is needed).

  python3 dev.py run    # install into .venv, then run the main job on embedded defaults
  python3 dev.py test   # install into .venv (with test + hf extras), then run the tests

Extra arguments after the command are passed to the job (run) or to pytest (test).
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import venv
from pathlib import Path

ROOT = Path(__file__).resolve().parent
VENV = ROOT / ".venv"
PY = VENV / ("Scripts/python.exe" if os.name == "nt" else "bin/python")
# PyTorch (parity tests only) is pinned to the CPU build available offline; an
# unpinned torch would pull a multi-GB CUDA build.
TORCH = "torch==2.13.0"


def _install(extras: str) -> None:
  if not PY.exists():
    print(f"[dev] creating {VENV}", flush=True)
    venv.EnvBuilder(with_pip=True).create(VENV)
  stamp = VENV / f".sparq-installed-{extras or 'base'}"
  digest = hashlib.sha256((ROOT / "pyproject.toml").read_bytes()).hexdigest()
  if stamp.exists() and stamp.read_text() == digest:
    return
  pip = [str(PY), "-m", "pip", "install", "--disable-pip-version-check", "-q"]
  if "hf" in extras:
    subprocess.run([*pip, TORCH], check=True)
  target = f".[{extras}]" if extras else "."
  print(f"[dev] pip install -e {target}", flush=True)
  subprocess.run([*pip, "-e", target], check=True, cwd=ROOT)
  stamp.write_text(digest)


def main(argv: list[str]) -> int:
  if len(argv) < 2 or argv[1] not in ("run", "test"):
    print(__doc__)
    return 2
  cmd, rest = argv[1], argv[2:]
  env = dict(os.environ, PYTHONPATH=str(ROOT))
  if cmd == "run":
    _install("")
    return subprocess.call([str(PY), "-m", "scripts.main_job", *rest], cwd=ROOT, env=env)
  _install("test,hf")
  args = rest or ["-m", "not slow", "-q", "-n", "2", "--durations=15"]
  return subprocess.call([str(PY), "-m", "pytest", *args], cwd=ROOT, env=env)


if __name__ == "__main__":
  sys.exit(main(sys.argv))

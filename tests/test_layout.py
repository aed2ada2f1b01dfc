"""The package DAG and the scripts/ layout (DESIGN.md), checked on every module's AST.

pallas_kernels <- model <- quant <- sparsity <- decoding <- scripts: a package imports
only packages to its left, never inside a function (no lazy imports dodging a
circle), and no module-level import circle exists anywhere, scripts/ included.
Inside scripts/: mains (top-level modules not named *_lib) are thin (<= 50 lines)
and import libraries only; libraries never import mains, bench/, sweeps/ or configs/.
"""

import ast
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ORDER = ["pallas_kernels", "model", "quant", "sparsity", "decoding", "scripts"]
RANK = {p: i for i, p in enumerate(ORDER)}
MAIN_MAX_LINES = 50


def _module_name(path: Path) -> str:
  parts = list(path.relative_to(ROOT).with_suffix("").parts)
  return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> dict[str, Path]:
  return {_module_name(f): f for pkg in ORDER for f in sorted((ROOT / pkg).rglob("*.py"))}


MODULES = _modules()


def _resolve(node: ast.AST, here: str) -> list[str]:
  """The sparq modules an import statement loads (a `from pkg import name` of a submodule
  names the submodule)."""
  if isinstance(node, ast.Import):
    names = [a.name for a in node.names]
  elif isinstance(node, ast.ImportFrom):
    assert not node.level, f"{here}: relative import (sparq imports absolutely)"
    mod = node.module
    names = [f"{mod}.{a.name}" if f"{mod}.{a.name}" in MODULES else mod for a in node.names]
  else:
    return []
  return [n for n in names if n.split(".")[0] in RANK]


def _imports(name: str) -> list[tuple[ast.AST, str, bool]]:
  """(node, imported module, inside a function) for every sparq import of a module."""
  tree = ast.parse(MODULES[name].read_text())
  inner = {id(n) for fn in ast.walk(tree) if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef))
           for n in ast.walk(fn) if n is not fn}
  return [(node, dep, id(node) in inner) for node in ast.walk(tree) for dep in _resolve(node, name)]


def test_packages_import_only_leftwards_and_never_lazily_across_packages():
  bad = []
  for name in MODULES:
    pkg = name.split(".")[0]
    for node, dep, lazy in _imports(name):
      where = f"{MODULES[name].relative_to(ROOT)}:{node.lineno}"
      dep_pkg = dep.split(".")[0]
      if RANK[dep_pkg] > RANK[pkg]:
        bad.append(f"{where}: {pkg} imports {dep} (only packages left of it)")
      elif lazy and dep_pkg != pkg:
        bad.append(f"{where}: {pkg} imports {dep} inside a function")
  assert not bad, "\n".join(bad)


def test_no_import_circle():
  graph = {name: {dep for _, dep, lazy in _imports(name) if not lazy and dep in MODULES
                  and dep != name} for name in MODULES}
  state, stack, cycles = {}, [], []

  def visit(n):
    state[n] = "open"
    stack.append(n)
    for m in sorted(graph[n]):
      if state.get(m) == "open":
        cycles.append(stack[stack.index(m):] + [m])
      elif m not in state:
        visit(m)
    stack.pop()
    state[n] = "done"

  for n in sorted(graph):
    if n not in state:
      visit(n)
  assert not cycles, "\n".join(" -> ".join(c) for c in cycles)


def _kind(name: str) -> str:
  parts = name.split(".")
  if parts[0] != "scripts" or len(parts) == 1:
    return "package"
  if parts[1] in ("bench", "sweeps", "configs"):
    return parts[1]
  return "lib" if parts[1].endswith("_lib") or parts[1] == "__init__" else "main"


MAINS = sorted(n for n in MODULES if _kind(n) == "main")


def test_scripts_layout():
  assert {"scripts.train", "scripts.generate", "scripts.main_job"} <= set(MAINS)
  bad = []
  for name, path in MODULES.items():
    kind = _kind(name)
    deps = {_kind(dep) for _, dep, _ in _imports(name) if dep.startswith("scripts.")}
    if kind == "main":
      lines = len(path.read_text().splitlines())
      if lines > MAIN_MAX_LINES:
        bad.append(f"{name}: a main of {lines} lines (at most {MAIN_MAX_LINES})")
      if deps - {"lib"}:
        bad.append(f"{name}: a main imports {sorted(deps - {'lib'})} (only libraries)")
      if 'if __name__ == "__main__":' not in path.read_text():
        bad.append(f"{name}: a main without a __main__ guard")
    banned = deps & {"main", "bench", "sweeps", "configs"}
    if kind == "lib" and banned:
      bad.append(f"{name}: a library imports {sorted(banned)}")
  assert not bad, "\n".join(bad)


HELP_PROBE = """
import io, os, runpy, sys, contextlib
import decoding, model, quant, sparsity  # imported once; every main runs in a fork
import scripts.train_lib, scripts.generate_lib, scripts.main_job_lib  # noqa: F401
for name in sys.argv[1:]:
  r, w = os.pipe()
  pid = os.fork()
  if pid == 0:
    os.close(r)
    out = os.fdopen(w, "w")
    code = 0
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
      sys.argv = [name, "--help"]
      try:
        runpy.run_module(name, run_name="__main__", alter_sys=True)
      except SystemExit as e:
        code = e.code if isinstance(e.code, int) else 1
    out.close()
    os._exit(code)
  os.close(w)
  with os.fdopen(r) as f:
    text = f.read()
  _, status = os.waitpid(pid, 0)
  print(f"=== {name} {os.waitstatus_to_exitcode(status)}")
  print(text)
"""

HELP_MAINS = MAINS + sorted(n for n in MODULES if _kind(n) == "sweeps" and n != "scripts.sweeps")


def test_every_main_has_help():
  """`python -m scripts.<main> --help` prints the module docstring and the flags."""
  proc = subprocess.run([sys.executable, "-c", HELP_PROBE, *HELP_MAINS], cwd=ROOT,
                        capture_output=True, text=True, timeout=300,
                        env=dict(os.environ, PYTHONPATH=str(ROOT)))
  assert proc.returncode == 0, proc.stderr[-3000:]
  chunks = proc.stdout.split("=== ")[1:]
  assert [c.split()[0] for c in chunks] == HELP_MAINS
  for chunk in chunks:
    name, code = chunk.split()[:2]
    # absl prints the usage (the module docstring, then the flags) and exits 1 on --help.
    assert code in ("0", "1") and "Try --helpfull" in chunk, chunk[-2000:]
    assert f"python -m {name}" in chunk and "  --" in chunk, chunk[-2000:]

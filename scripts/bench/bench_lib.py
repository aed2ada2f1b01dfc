"""The one timing harness and results writer of the benchmarks in scripts/bench/.

Timing: `timed` (one call, waiting for its jax result), `repeat_times` and `best_of`
(one function, repeated) and `interleaved` (several methods over several inputs, taking
turns). Results: `machine_info` (what ran them), `command_line` (the command that
reproduces them) and `write_results` (`<out>.json` and `<out>.md`).
"""

from __future__ import annotations

import json
import os
import platform
import shlex
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any, TypeVar

import jax
from absl import flags

T = TypeVar("T")


def timed(fn: Callable[[], T]) -> tuple[float, T]:
  """Wall seconds of `fn()` and its result, blocked on: jax dispatch returns before the work."""
  t0 = time.perf_counter()
  out = jax.block_until_ready(fn())
  return time.perf_counter() - t0, out


def repeat_times(fn: Callable[[], T], repeats: int) -> tuple[list[float], T]:
  """The seconds of each of `repeats` calls of `fn` and the last result."""
  if repeats < 1:
    raise ValueError(f"repeats={repeats} must be >= 1")
  times = []
  for _ in range(repeats):
    seconds, out = timed(fn)
    times.append(seconds)
  return times, out


def best_of(fn: Callable[[], T], repeats: int) -> tuple[float, T]:
  """The fastest of `repeats` calls of `fn` (the least disturbed by load) and the last result."""
  times, out = repeat_times(fn, repeats)
  return min(times), out


def interleaved(methods: dict[str, Callable[[Any], T]], inputs: Sequence[Any], repeats: int, *,
                warm_up: bool = True, log: Callable[[str], object] = print
                ) -> tuple[dict[str, list[float]], dict[tuple[str, int], T]]:
  """Best seconds per (method, input), every repeat running every input through every method.

  Taking turns spreads machine load over all methods alike, where timing one method's
  repeats back to back would charge a burst of load to that method alone. With `warm_up`,
  each method first runs once on inputs[0], untimed (compilation). The log line after
  each repeat reports the first method, by convention the baseline.

  Returns:
    best: method -> best seconds per input; outs: (method, input index) -> the last result.
  """
  if repeats < 1:
    raise ValueError(f"repeats={repeats} must be >= 1")
  if not methods or not inputs:
    raise ValueError(f"need at least one method and one input, got {len(methods)} and "
                     f"{len(inputs)}")
  if warm_up:
    for name, fn in methods.items():
      log(f"compiling {name}")
      jax.block_until_ready(fn(inputs[0]))
  best = {name: [float("inf")] * len(inputs) for name in methods}
  outs = {}
  first = next(iter(methods))
  for r in range(repeats):
    for i, x in enumerate(inputs):
      for name, fn in methods.items():
        seconds, outs[name, i] = timed(lambda: fn(x))
        best[name][i] = min(best[name][i], seconds)
    log(f"repeat {r + 1}/{repeats}: {first} {sum(best[first]):.2f}s")
  return best, outs


def stream_bandwidth(nbytes: int = 256 << 20, repeats: int = 10) -> tuple[float, int]:
  """(bytes / s, bytes read) of the fastest of `repeats` jitted sums over an f32 array of
  `nbytes`: the rate a decode step can stream weights at on this machine, now."""
  x = jax.numpy.ones((nbytes // 4,), jax.numpy.float32)
  total = jax.jit(jax.numpy.sum)
  jax.block_until_ready(total(x))
  seconds, _ = best_of(lambda: total(x), repeats)
  return x.size * 4 / seconds, x.size * 4


def int_list(flag: str, values: Sequence[str], *, minimum: int = 1) -> list[int]:
  """A list flag's values as integers >= `minimum`, or a ValueError naming the flag."""
  try:
    out = [int(v) for v in values]
  except ValueError:
    out = []
  if not out or min(out) < minimum:
    raise ValueError(f"--{flag}={','.join(map(str, values))} must be a list of integers "
                     f">= {minimum}")
  return out


def machine_info() -> dict[str, Any]:
  """What ran the benchmark: a one-line description, versions, backend, cores and load."""
  dev = jax.devices()[0]
  if dev.platform == "cpu":
    desc = f"{os.cpu_count()}-core CPU container ({platform.machine()}), no accelerator"
  else:
    count = jax.device_count()
    desc = f"{count} x {dev.device_kind} ({dev.platform})" if count > 1 else (
        f"{dev.device_kind} ({dev.platform})")
  return {"machine": desc, "backend": jax.default_backend(), "jax": jax.__version__,
          "python": platform.python_version(), "cpu_count": os.cpu_count(),
          "load_avg_1m": os.getloadavg()[0]}


def command_line(module: str, names: Iterable[str],
                 flag_values: flags.FlagValues = flags.FLAGS) -> str:
  """`python -m <module> --name=value ...` for the parsed flags `names`; unset (None) ones
  are left out."""
  parts = [f"python -m {module}"]
  for name in names:
    value = flag_values[name].value
    if value is None:
      continue
    if isinstance(value, bool):  # absl spells booleans --name=true / --name=false
      value = str(value).lower()
    elif isinstance(value, list):
      value = ",".join(str(v) for v in value)
    parts.append(f"--{name}={shlex.quote(str(value))}")
  return " ".join(parts)


def finish(module: str, names: Iterable[str], out: str, meta: dict,
           report: Callable[[str], tuple[dict, str | None]]) -> tuple[str, ...]:
  """The end of a bench: `meta` gains the closing load average and the command line, then
  `report(command) -> (result dict, markdown)` is written with `write_results`."""
  meta["load_avg_1m_end"] = os.getloadavg()[0]
  meta["command"] = command = command_line(module, names)
  return write_results(out, *report(command))


def write_results(out: str, result: dict, markdown: str | None,
                  log: Callable[[str], object] = print) -> tuple[str, ...]:
  """Writes `<out>.json` and, given `markdown`, `<out>.md` (creating the folder); logs the
  markdown and the paths written, and returns them."""
  os.makedirs(os.path.dirname(out) or ".", exist_ok=True)
  paths = [out + ".json"]
  with open(paths[0], "w") as f:
    json.dump(result, f, indent=2)
    f.write("\n")
  if markdown is not None:
    paths.append(out + ".md")
    with open(paths[1], "w") as f:
      f.write(markdown)
    log(markdown.rstrip("\n"))
  log(f"wrote {', '.join(paths)}")
  return tuple(paths)

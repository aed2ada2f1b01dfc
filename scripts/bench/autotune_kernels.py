r"""Autotunes the low-bit matmul kernels' block sizes on this device:
python -m scripts.bench.autotune_kernels [--shapes=2048x8192] [--m=1,16,256] [--bits=4,8]

For every weight shape (K x N), M, bit width and group size (0 = per channel), and with
--w8a8 also the W8A8 kernel (int8, per channel), it times each legal candidate block
configuration of `pallas_kernels.lowbit` on the current device (the compiled kernel of
this backend: jit, compile and one warm-up call excluded, median of --iters calls), keeps
the fastest and records it in the block table (`pallas_kernels.tuning`, default
`pallas_kernels/tuned_blocks.json`) under this device kind and M's power-of-two bucket.
Existing entries for other devices and cases are kept; the write is atomic.

--interpret runs the kernels in Pallas interpret mode on the CPU over one or two tiny
candidates. It exists only so the tests can exercise this script: its timings are
meaningless (an interpreter on a CPU), so it refuses to write the committed table.
"""

from __future__ import annotations

import functools
import itertools
import os

import jax
import jax.numpy as jnp
import numpy as np
from absl import flags

from pallas_kernels import lowbit, tuning
from scripts import cli_lib
from scripts.bench import bench_lib

_SHAPES = flags.DEFINE_list("shapes", ["2048x2048", "2048x8192", "8192x2048"],
                            "Weight shapes K x N.")
_M = flags.DEFINE_list("m", ["1", "16", "256"], "Rows of x (tokens per step).")
_BITS = flags.DEFINE_list("bits", ["8", "4"], "Weight code widths (4, 8).")
_GROUPS = flags.DEFINE_list("group_sizes", ["0", "128"],
                            "Group sizes; 0 = one scale per output channel.")
_W8A8 = flags.DEFINE_bool("w8a8", True, "Also tune the W8A8 (int8 x int8) kernel.")
_DTYPE = flags.DEFINE_enum("x_dtype", "bfloat16", ["float32", "bfloat16"], "Activation dtype.")
_ITERS = flags.DEFINE_integer("iters", 20, "Timed calls per candidate (median kept).")
_OUT = flags.DEFINE_string("table", tuning.TABLE_PATH, "Block table to update (JSON).")
_INTERPRET = flags.DEFINE_bool("interpret", False,
                               "Interpret on the CPU (tests only; timings are meaningless).")
_PLATFORM = flags.DEFINE_enum("platform", None, ["tpu", "gpu"],
                              "Kernel to interpret with --interpret (default tpu).")

# Per platform: candidate values of block_m (prefill), block_n and block_k.
CANDIDATES = {
    "tpu": dict(block_m=(128, 256, 512), block_n=(128, 256, 512, 1024),
                block_k=(256, 512, 1024, 2048)),
    "gpu": dict(block_m=(16, 32, 64, 128), block_n=(32, 64, 128, 256),
                block_k=(32, 64, 128, 256)),
}


def parse_shape(s: str) -> tuple[int, int]:
  try:
    k, n = (int(v) for v in s.lower().split("x"))
  except ValueError:
    k = n = 0
  if k < 1 or n < 1:
    raise ValueError(f"--shapes entry {s!r} must be KxN with positive integers (e.g. "
                     "2048x8192)")
  return k, n


def candidates(kernel: str, platform: str, M: int, K: int, N: int, *, bits: int,
               group_size: int | None, interpret: bool) -> list[dict[str, int]]:
  """Distinct legal (fitted) block configurations to time; 1-2 with `interpret`."""
  kw = dict(bits=bits, group_size=group_size)
  first = tuning.default_blocks(kernel, M, K, N, platform=platform, **kw)
  grid = dict(CANDIDATES[platform])
  if M <= 16:
    grid["block_m"] = (first["block_m"],)
  if group_size and platform == "tpu":
    grid["block_k"] = tuple(sorted({group_size * t for t in (1, 2, 4, 8, 16)}))
  pool = [first] + [dict(zip(grid, v, strict=True)) for v in itertools.product(*grid.values())]
  if interpret:
    half = {**first, "block_n": max(first["block_n"] // 2, 1)}
    pool = [first, half]
  seen, out = set(), []
  for blocks in pool:
    try:
      fitted = lowbit.fit_blocks(kernel, platform, M, K, N, compiled=not interpret,
                                 **kw, **blocks)
    except ValueError:
      continue
    if fitted not in seen:
      seen.add(fitted)
      out.append(dict(zip(lowbit.BLOCK_NAMES, fitted, strict=True)))
  return out


def make_inputs(kernel: str, M: int, K: int, N: int, *, bits: int, group_size: int | None,
                dtype: str, seed: int = 0) -> tuple:
  """Random x, packed values, scales (and None zeros) for one case."""
  rng = np.random.default_rng(seed)
  x = jnp.asarray(rng.normal(size=(M, K)), dtype)
  rows = K // 2 if bits == 4 else K
  values = jnp.asarray(rng.integers(-128, 128, size=(rows, N)), jnp.int8)
  groups = K // group_size if group_size else 1
  scales = jnp.asarray(rng.uniform(0.001, 0.01, size=(groups, N)), jnp.float32)
  return x, values, scales


def time_case(kernel: str, M: int, K: int, N: int, blocks: dict[str, int], *, bits: int,
              group_size: int | None, dtype: str, iters: int, interpret: bool,
              platform: str | None) -> float:
  """Median seconds of one jitted kernel call with these blocks (compile + warm-up excluded)."""
  x, values, scales = make_inputs(kernel, M, K, N, bits=bits, group_size=group_size,
                                  dtype=dtype)
  fn = jax.jit(functools.partial(
      lowbit.lowbit_matmul, bits=bits, group_size=group_size,
      act_bits=8 if kernel == "w8a8" else None, interpret=interpret, platform=platform,
      **blocks))
  jax.block_until_ready(fn(x, values, scales))
  times, _ = bench_lib.repeat_times(lambda: fn(x, values, scales), iters)
  return float(np.median(times))


def tune_case(kernel: str, M: int, K: int, N: int, *, bits: int, group_size: int | None,
              dtype: str, iters: int, interpret: bool, platform: str,
              log=print) -> tuple[dict[str, int], float]:
  """The fastest candidate's blocks and median seconds."""
  best, best_s = None, float("inf")
  for blocks in candidates(kernel, platform, M, K, N, bits=bits, group_size=group_size,
                           interpret=interpret):
    seconds = time_case(kernel, M, K, N, blocks, bits=bits, group_size=group_size,
                        dtype=dtype, iters=iters, interpret=interpret, platform=platform)
    log(f"{kernel} int{bits} g{group_size or 0} M={M} K={K} N={N} {blocks}: "
        f"{seconds * 1e6:.1f} us")
    if seconds < best_s:
      best, best_s = blocks, seconds
  if best is None:
    raise ValueError(f"no legal block configuration for {kernel} int{bits} g{group_size} "
                     f"M={M} K={K} N={N} on {platform}")
  return best, best_s


def cases(shapes, ms, bits_list, group_sizes, w8a8: bool):
  """(kernel, M, K, N, bits, group_size) to tune; skips groups that do not divide K."""
  out = []
  for (K, N), M in itertools.product(shapes, ms):
    for bits, g in itertools.product(bits_list, group_sizes):
      if g and (K % g or (bits == 4 and g % 2)):
        continue
      out.append(("weight_only", M, K, N, bits, g or None))
    if w8a8:
      out.append(("w8a8", M, K, N, 8, None))
  return out


def autotune(case_list, *, path: str, dtype: str = "bfloat16", iters: int = 20,
             interpret: bool = False, platform: str | None = None, log=print) -> dict:
  """Tunes every case, records the winners for this device kind in the table at `path`
  (keeping its other entries) and writes it; returns the table."""
  if interpret and os.path.abspath(path) == os.path.abspath(tuning.TABLE_PATH):
    raise ValueError("--interpret timings are meaningless; they may not go into the committed "
                     f"table {tuning.TABLE_PATH} (pass --table)")
  if interpret:
    platform = platform or "tpu"
  else:
    platform = lowbit.resolve_platform(platform, False)
  kind = tuning.current_device_kind()
  table = tuning.read_table(path) if os.path.exists(path) else tuning.empty_table()
  table = {"version": table["version"], "devices": dict(table["devices"])}
  for kernel, M, K, N, bits, g in case_list:
    blocks, seconds = tune_case(kernel, M, K, N, bits=bits, group_size=g, dtype=dtype,
                                iters=iters, interpret=interpret, platform=platform, log=log)
    tuning.record(table, kernel, M, K, N, bits=bits, group_size=g, platform=platform,
                  device_kind=kind, blocks=blocks, seconds=seconds)
  tuning.write_table(path, table)
  log(f"wrote {path} ({len(case_list)} cases for {kind!r})")
  return table


def main():
  if _ITERS.value < 1:
    raise ValueError(f"--iters={_ITERS.value} must be >= 1")
  shapes = [parse_shape(s) for s in _SHAPES.value]
  ms = bench_lib.int_list("m", _M.value)
  bits_list = bench_lib.int_list("bits", _BITS.value)
  if set(bits_list) - set(lowbit.BITS):
    raise ValueError(f"--bits={_BITS.value}; valid values: {lowbit.BITS}")
  groups = bench_lib.int_list("group_sizes", _GROUPS.value, minimum=0)
  autotune(cases(shapes, ms, bits_list, groups, _W8A8.value), path=_OUT.value,
           dtype=_DTYPE.value, iters=_ITERS.value, interpret=_INTERPRET.value,
           platform=_PLATFORM.value)


if __name__ == "__main__":
  cli_lib.run(main)

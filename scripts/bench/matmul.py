r"""Benchmarks int8 weight-only matmul: python -m scripts.bench.matmul [--m=1,16,256].

Times, for weight shapes taken from the presets, a float matmul (weights in
x.dtype), the XLA int8 path (`pallas_kernels` reference: codes in the dot, scale
on the f32 accumulator) and, on a TPU, the compiled Pallas kernel. It also
prints a memory/compute roofline estimate (no measurement) of float vs int8
weights on H100 and TPU v5e, and saves everything to --out as JSON.
"""

from __future__ import annotations

import json
import os
import platform
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

from pallas_kernels import int8_matmul as k

# (name, K, N): MLP up-projection and attention output shapes of the presets.
SHAPES = [
    ("bench-25m mlp.up", 512, 1536),
    ("smollm-135m mlp.up", 576, 1536),
    ("llama-3.2-1b attn.o", 2048, 2048),
    ("llama-3.2-1b mlp.up", 2048, 8192),
]
# Peak HBM bandwidth (bytes/s) and dense bf16 throughput (flop/s) from vendor sheets.
HARDWARE = {"H100 SXM": (3.35e12, 989e12), "TPU v5e": (819e9, 197e12)}

_M = flags.DEFINE_list("m", ["1", "16", "256"], "Rows of x (tokens per step).")
_DTYPE = flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "Activation dtype.")
_ITERS = flags.DEFINE_integer("iters", 20, "Timed iterations per case (median reported).")
_OUT = flags.DEFINE_string("out", "docs/bench_matmul.json", "JSON output path.")


def machine() -> str:
  dev = jax.devices()[0]
  if dev.platform == "cpu":
    return f"{os.cpu_count()}-core CPU container ({platform.machine()}), no accelerator"
  return f"{dev.device_kind} ({dev.platform})"


def time_fn(fn, *args, iters: int) -> float:
  """Median wall time in seconds of a jitted call (compile and one warm-up excluded)."""
  jax.block_until_ready(fn(*args))
  ts = []
  for _ in range(iters):
    t = time.perf_counter()
    jax.block_until_ready(fn(*args))
    ts.append(time.perf_counter() - t)
  return float(np.median(ts))


def roofline(M: int, K: int, N: int, x_bytes: int, w_bytes: int) -> dict[str, float]:
  """Lower-bound seconds per matmul: max(bytes / bandwidth, flops / peak)."""
  moved = K * N * w_bytes + (M * K + M * N) * x_bytes + (4 * N if w_bytes == 1 else 0)
  return {hw: max(moved / bw, 2 * M * K * N / peak) for hw, (bw, peak) in HARDWARE.items()}


def run(ms: list[int], dtype: str, iters: int) -> list[dict]:
  rng = np.random.default_rng(0)
  backend = jax.default_backend()
  float_mm = jax.jit(lambda x, w: jnp.matmul(x, w, preferred_element_type=jnp.float32)
                     .astype(x.dtype))
  int8_ref = jax.jit(k.reference)
  rows = []
  for name, K, N in SHAPES:
    w_int8 = jnp.asarray(rng.integers(-127, 128, size=(K, N)), jnp.int8)
    scale = jnp.asarray(rng.uniform(0.001, 0.01, size=(1, N)), jnp.float32)
    w_float = (w_int8.astype(jnp.float32) * scale).astype(dtype)
    for M in ms:
      x = jnp.asarray(rng.normal(size=(M, K)), dtype)
      row = dict(shape=name, M=M, K=K, N=N, dtype=dtype,
                 float_s=time_fn(float_mm, x, w_float, iters=iters),
                 xla_int8_s=time_fn(int8_ref, x, w_int8, scale, iters=iters), pallas_s=None)
      if backend == "tpu":
        row["pallas_s"] = time_fn(k.int8_matmul, x, w_int8, scale, iters=iters)
      x_bytes = jnp.dtype(dtype).itemsize
      row["roofline_float_s"] = roofline(M, K, N, x_bytes, x_bytes)
      row["roofline_int8_s"] = roofline(M, K, N, x_bytes, 1)
      rows.append(row)
  return rows


def print_table(rows: list[dict]) -> None:
  us = lambda s: "n/a" if s is None else f"{s * 1e6:9.1f}"
  hw = list(HARDWARE)
  head = (f"{'shape':22s} {'M':>4s} {'float us':>9s} {'xla-int8':>9s} {'pallas':>9s} | "
          + " | ".join(f"{h} float/int8 us (x)" for h in hw))
  print(head)
  print("-" * len(head))
  for r in rows:
    est = " | ".join(
        f"{r['roofline_float_s'][h] * 1e6:8.2f}/{r['roofline_int8_s'][h] * 1e6:7.2f} "
        f"({r['roofline_float_s'][h] / r['roofline_int8_s'][h]:3.1f}x)" for h in hw)
    print(f"{r['shape']:22s} {r['M']:4d} {us(r['float_s'])} {us(r['xla_int8_s'])} "
          f"{us(r['pallas_s']):>9s} | {est}")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  try:
    ms = [int(m) for m in _M.value]
  except ValueError:
    raise SystemExit(f"error: --m={_M.value} must be a list of positive integers") from None
  if not ms or min(ms) < 1:
    raise SystemExit(f"error: --m={_M.value} must be a list of positive integers")
  if _ITERS.value < 1:
    raise SystemExit(f"error: --iters={_ITERS.value} must be >= 1")
  rows = run(ms, _DTYPE.value, _ITERS.value)
  print(f"machine: {machine()}; backend {jax.default_backend()}; jax {jax.__version__}")
  print("measured: median wall time per call; estimates: roofline lower bounds (not measured)")
  print_table(rows)
  if jax.default_backend() != "tpu":
    print("pallas: n/a (the compiled kernel is TPU-only; this backend runs the XLA int8 path)")
  os.makedirs(os.path.dirname(_OUT.value) or ".", exist_ok=True)
  with open(_OUT.value, "w") as f:
    json.dump(dict(machine=machine(), backend=jax.default_backend(), jax=jax.__version__,
                   hardware_peaks=HARDWARE, rows=rows), f, indent=1)
  print(f"wrote {_OUT.value}")


if __name__ == "__main__":
  app.run(main)

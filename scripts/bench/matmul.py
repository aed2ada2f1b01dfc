r"""Benchmarks int8 weight-only matmul: python -m scripts.bench.matmul [--m=1,16,256].

Times, for weight shapes taken from the presets, a float matmul (weights in
x.dtype), the XLA int8 path (`model.ops.dot` on an int8 QArray: codes in the dot, scale
on the f32 accumulator) and, on a TPU or GPU, the compiled Pallas kernel
(`pallas_kernels.lowbit_matmul`). It also
prints a memory/compute roofline estimate (no measurement) of float vs int8
weights on H100 and TPU v5e, and saves everything to --out as JSON, with the
table beside it as markdown (.md).
"""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np
from absl import flags

import model
import pallas_kernels
from model.qarray import QArray
from scripts import cli_lib
from scripts.bench import bench_lib

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
_OUT = flags.DEFINE_string("out", "docs/bench_matmul.json",
                           "JSON output path (the markdown goes beside it, .md).")


def time_fn(fn, *args, iters: int) -> float:
  """Median wall time in seconds of a jitted call (compile and one warm-up excluded)."""
  jax.block_until_ready(fn(*args))
  times, _ = bench_lib.repeat_times(lambda: fn(*args), iters)
  return float(np.median(times))


def roofline(M: int, K: int, N: int, x_bytes: int, w_bytes: int) -> dict[str, float]:
  """Lower-bound seconds per matmul: max(bytes / bandwidth, flops / peak)."""
  moved = K * N * w_bytes + (M * K + M * N) * x_bytes + (4 * N if w_bytes == 1 else 0)
  return {hw: max(moved / bw, 2 * M * K * N / peak) for hw, (bw, peak) in HARDWARE.items()}


def run(ms: list[int], dtype: str, iters: int) -> list[dict]:
  rng = np.random.default_rng(0)
  backend = jax.default_backend()
  float_mm = jax.jit(lambda x, w: jnp.matmul(x, w, preferred_element_type=jnp.float32)
                     .astype(x.dtype))
  int8_ref = jax.jit(lambda x, w, s: model.ops.dot(x, QArray(
      values=w, scale=s, shape=w.shape, bits=8, fmt="int", dtype=x.dtype)))
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
      if backend in ("tpu", "gpu"):
        kernel = jax.jit(lambda x, w, s: pallas_kernels.lowbit_matmul(
            x, w, s, bits=8, group_size=None))
        row["pallas_s"] = time_fn(kernel, x, w_int8, scale, iters=iters)
      x_bytes = jnp.dtype(dtype).itemsize
      row["roofline_float_s"] = roofline(M, K, N, x_bytes, x_bytes)
      row["roofline_int8_s"] = roofline(M, K, N, x_bytes, 1)
      rows.append(row)
  return rows


def markdown(rows: list[dict], info: dict, command: str) -> str:
  """The measured times and roofline estimates as a markdown table."""
  us = lambda s: "n/a" if s is None else f"{s * 1e6:.1f}"
  hw = list(HARDWARE)
  lines = ["# int8 weight-only matmul", "",
           f"Machine: {info['machine']}; backend {info['backend']}; jax {info['jax']}. "
           f"Command: `{command}`", "",
           "Measured: median wall time per call (us). Estimates: roofline lower bounds "
           "(not measured), float / int8 weights (us) and their ratio.", "",
           "| shape | M | float | xla-int8 | pallas | "
           + " | ".join(f"{h} float / int8 (x)" for h in hw) + " |",
           "|---|---:|---:|---:|---:|" + "---:|" * len(hw)]
  for r in rows:
    est = " | ".join(
        f"{r['roofline_float_s'][h] * 1e6:.2f} / {r['roofline_int8_s'][h] * 1e6:.2f} "
        f"({r['roofline_float_s'][h] / r['roofline_int8_s'][h]:.1f}x)" for h in hw)
    lines.append(f"| {r['shape']} | {r['M']} | {us(r['float_s'])} | {us(r['xla_int8_s'])} | "
                 f"{us(r['pallas_s'])} | {est} |")
  if info["backend"] not in ("tpu", "gpu"):
    lines += ["", "pallas: n/a (no compiled kernel on this backend; `scripts/bench/kernels.py` "
              "benchmarks every low-bit kernel on a GPU / TPU)."]
  return "\n".join(lines) + "\n"


def main():
  ms = bench_lib.int_list("m", _M.value)
  if _ITERS.value < 1:
    raise ValueError(f"--iters={_ITERS.value} must be >= 1")
  info = bench_lib.machine_info()
  rows = run(ms, _DTYPE.value, _ITERS.value)
  command = bench_lib.command_line("scripts.bench.matmul", ("m", "dtype", "iters", "out"))
  result = dict(**info, command=command, hardware_peaks=HARDWARE, rows=rows)
  bench_lib.write_results(os.path.splitext(_OUT.value)[0], result,
                          markdown(rows, info, command))


if __name__ == "__main__":
  cli_lib.run(main)

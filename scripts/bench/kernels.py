r"""Benchmarks the Pallas kernels: python -m scripts.bench.kernels [--smoke].

Block-sparse attention (`pallas_kernels.block_sparse_attention`), forward, B x H heads of
Dh at T = S = --seq_lens, over random layouts of --densities percent of the 128 x 128
blocks (each q block keeps the same number of kv blocks, all "full", no element mask):
seconds, TFLOP/s over the visited blocks (4 T S Dh H density flops), and time relative to
the kernel's dense mode (layout=None) and to `jax.nn.dot_product_attention` (cuDNN on a
GPU, XLA elsewhere). Low-bit matmul (`pallas_kernels.lowbit_matmul`) for M = --ms rows
against K x N weights: int8 weight-only (per channel), int4 weight-only (groups of 128) and
W8A8, against a bf16 XLA dot: seconds, GB/s of the bytes a call must move (weights, scales,
x, y) and that as a fraction of the device's HBM peak.

Kernel rows need a GPU or TPU. On a CPU the kernels only run interpreted (`--smoke`:
tiny shapes through every code path; its timings measure the interpreter, not a kernel,
and are labelled so); without --smoke a CPU run times the XLA baselines only and leaves
the kernel columns empty. Writes --out.json and --out.md.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from absl import flags

import model
import pallas_kernels
from scripts import cli_lib
from scripts.bench import bench_lib

# Peak HBM bandwidth (bytes/s) by `device_kind` prefix, from vendor sheets.
HBM_PEAK = {"NVIDIA H100": 3.35e12, "NVIDIA H200": 4.8e12, "TPU v5 lite": 819e9,
            "TPU v5e": 819e9, "TPU v5p": 2.76e12, "TPU v6": 1.64e12}

_SEQ = flags.DEFINE_list("seq_lens", ["4096", "8192", "16384", "32768"], "T = S values.")
_DENS = flags.DEFINE_list("densities", ["100", "50", "25", "10"], "Block densities (percent).")
_HEADS = flags.DEFINE_integer("heads", 16, "Query heads (kv heads: --kv_heads).")
_KV_HEADS = flags.DEFINE_integer("kv_heads", 16, "KV heads (divides --heads).")
_HEAD_DIM = flags.DEFINE_integer("head_dim", 128, "Head dimension.")
_BLOCK = flags.DEFINE_integer("block", 128, "Layout block size (block_q = block_kv).")
_MS = flags.DEFINE_list("ms", ["1", "4", "16", "64", "128", "256"], "Matmul rows M.")
_KN = flags.DEFINE_list("kn", ["4096x4096", "4096x14336"], "Matmul weight shapes K x N.")
_ITERS = flags.DEFINE_integer("iters", 10, "Timed calls per case (median reported).")
_SMOKE = flags.DEFINE_bool("smoke", False, "Tiny shapes, kernels interpreted (CPU check).")
_SKIP = flags.DEFINE_list("skip", [], "Sections to skip: attention, matmul.")
_OUT = flags.DEFINE_string("out", "docs/bench_kernels", "Output path without extension.")


def median_seconds(fn, *args, iters: int) -> float:
  jax.block_until_ready(fn(*args))
  times, _ = bench_lib.repeat_times(lambda: fn(*args), iters)
  return float(np.median(times))


def hbm_peak() -> float | None:
  kind = jax.devices()[0].device_kind
  return next((v for k, v in HBM_PEAK.items() if kind.startswith(k)), None)


def random_layout(rng, t: int, block: int, density: float) -> model.BlockLayout:
  """Each q block keeps round(density * Sb) random kv blocks (at least one), all full."""
  nb = t // block
  keep = max(1, round(density * nb))
  active = np.zeros((1, 1, nb, nb), bool)
  for i in range(nb):
    active[0, 0, i, rng.choice(nb, keep, replace=False)] = True
  return model.BlockLayout.from_block_mask(jnp.asarray(active), block_q=block, block_kv=block,
                                           full_mask=jnp.asarray(active))


def attention_rows(seq_lens, densities, *, heads, kv_heads, head_dim, block, iters, interpret):
  backend = jax.default_backend()
  kernels_run = backend in ("gpu", "tpu") or interpret
  dtype = jnp.bfloat16
  rng = np.random.default_rng(0)
  rows = []
  for t in seq_lens:
    keys = jax.random.split(jax.random.key(t), 3)
    q = jax.random.normal(keys[0], (1, t, heads, head_dim), dtype)
    k = jax.random.normal(keys[1], (1, t, kv_heads, head_dim), dtype)
    v = jax.random.normal(keys[2], (1, t, kv_heads, head_dim), dtype)
    base = dict(T=t, heads=heads, kv_heads=kv_heads, head_dim=head_dim, block=block)
    cudnn = "cudnn" if backend == "gpu" and not interpret else "xla"
    ref_fn = jax.jit(lambda q, k, v: jax.nn.dot_product_attention(
        q, k, v, implementation=cudnn))
    ref_s = median_seconds(ref_fn, q, k, v, iters=iters)
    dense_s = None
    if kernels_run:
      dense = jax.jit(lambda q, k, v: pallas_kernels.block_sparse_attention(
          q, k, v, None, block_q=block, block_kv=block, interpret=interpret))
      dense_s = median_seconds(dense, q, k, v, iters=iters)
    for d in densities:
      layout = random_layout(rng, t, block, d / 100)
      real = float(np.asarray(layout.block_mask(t // block)).mean())
      flops = 4 * t * t * head_dim * heads * real
      row = dict(base, density=d, real_density=real, dot_product_attention=cudnn,
                 reference_s=ref_s, dense_mode_s=dense_s, kernel_s=None)
      if kernels_run:
        fn = jax.jit(lambda q, k, v, l: pallas_kernels.block_sparse_attention(
            q, k, v, l, interpret=interpret))
        row["kernel_s"] = s = median_seconds(fn, q, k, v, layout, iters=iters)
        row["tflops"] = flops / s / 1e12
        row["vs_dense_mode"] = dense_s / s
        row["vs_reference"] = ref_s / s
      rows.append(row)
      print(row)
  return rows


def quantize(w, bits: int, group: int | None):
  """(values, scales) of symmetric codes for W [K, N], groups along K (or per channel)."""
  k, n = w.shape
  g = group or k
  top = 2 ** (bits - 1) - 1
  wg = w.reshape(k // g, g, n)
  scale = jnp.maximum(jnp.abs(wg).max(axis=1), 1e-8) / top
  codes = jnp.clip(jnp.round(wg / scale[:, None]), -top - 1, top).astype(jnp.int8).reshape(k, n)
  if bits == 4:
    c = codes.astype(jnp.int32) & 0xF
    codes = jax.lax.bitcast_convert_type(
        (c[0::2] | (c[1::2] << 4)).astype(jnp.uint8), jnp.int8)
  return codes, scale.astype(jnp.float32)


def matmul_rows(ms, shapes, *, iters, interpret):
  backend = jax.default_backend()
  kernels_run = backend in ("gpu", "tpu") or interpret
  peak = hbm_peak()
  rows = []
  variants = [("int8", 8, None, None), ("int4-g128", 4, 128, None), ("w8a8", 8, None, 8)]
  for k, n in shapes:
    w = jax.random.normal(jax.random.key(k * n), (k, n), jnp.float32) * 0.02
    w_bf16 = w.astype(jnp.bfloat16)
    bf16 = jax.jit(lambda x, w: jnp.matmul(x, w, preferred_element_type=jnp.float32)
                   .astype(x.dtype))
    packed = {name: quantize(w, bits, min(g, k) if g else None)
              for name, bits, g, _ in variants}
    for m in ms:
      x = jax.random.normal(jax.random.key(m), (m, k), jnp.bfloat16)
      bf16_s = median_seconds(bf16, x, w_bf16, iters=iters)
      for name, bits, g, act in variants:
        values, scales = packed[name]
        g = min(g, k) if g else None
        moved = values.size + scales.size * 4 + 2 * (m * k + m * n)
        row = dict(variant=name, M=m, K=k, N=n, bf16_s=bf16_s, kernel_s=None,
                   bf16_gbps=(2 * k * n + 2 * (m * k + m * n)) / bf16_s / 1e9)
        if kernels_run:
          fn = jax.jit(lambda x, vals, sc, bits=bits, g=g, act=act: pallas_kernels.lowbit_matmul(
              x, vals, sc, bits=bits, group_size=g, act_bits=act, interpret=interpret))
          row["kernel_s"] = s = median_seconds(fn, x, values, scales, iters=iters)
          row["gbps"] = moved / s / 1e9
          row["vs_bf16"] = bf16_s / s
          row["hbm_fraction"] = None if peak is None else moved / s / peak
        rows.append(row)
        print(row)
  return rows


def markdown(info: dict, attn: list[dict], mm: list[dict], smoke: bool) -> str:
  f = lambda v, spec: "" if v is None else format(v, spec)
  lines = ["# Pallas kernels", "", f"Machine: {info['machine']}; jax {info['jax']}. "
           f"Command: `{info['command']}`", ""]
  if smoke:
    lines += ["**Smoke run: kernels interpreted on a CPU; the times measure the interpreter, "
              "not the kernels.**", ""]
  if attn:
    lines += ["## Block-sparse attention (forward, bf16)", "",
              "Median seconds per call; TFLOP/s over the visited blocks; speedups are the "
              "kernel's time relative to its dense mode (layout=None) and to "
              "`jax.nn.dot_product_attention` (implementation in the column).", "",
              "| T | density % | kernel ms | TFLOP/s | vs dense mode | dense mode ms | "
              "dot_product_attention | its ms | vs it |", "|" + "---:|" * 9]
    for r in attn:
      lines.append(
          f"| {r['T']} | {r['density']} | {f(r['kernel_s'] and r['kernel_s'] * 1e3, '.3f')} | "
          f"{f(r.get('tflops'), '.1f')} | {f(r.get('vs_dense_mode'), '.2f')} | "
          f"{f(r['dense_mode_s'] and r['dense_mode_s'] * 1e3, '.3f')} | "
          f"{r['dot_product_attention']} | {r['reference_s'] * 1e3:.3f} | "
          f"{f(r.get('vs_reference'), '.2f')} |")
  if mm:
    lines += ["", "## Low-bit matmul (x bf16)", "",
              "Median seconds; GB/s of the bytes one call must move; speedup over a bf16 XLA "
              "dot of the same shape.", "",
              "| variant | M | K x N | kernel us | GB/s | HBM fraction | bf16 dot us | "
              "bf16 GB/s | vs bf16 |", "|---|" + "---:|" * 8]
    for r in mm:
      lines.append(
          f"| {r['variant']} | {r['M']} | {r['K']}x{r['N']} | "
          f"{f(r['kernel_s'] and r['kernel_s'] * 1e6, '.1f')} | {f(r.get('gbps'), '.1f')} | "
          f"{f(r.get('hbm_fraction'), '.2f')} | {r['bf16_s'] * 1e6:.1f} | "
          f"{r['bf16_gbps']:.1f} | {f(r.get('vs_bf16'), '.2f')} |")
  if info["backend"] not in ("gpu", "tpu") and not smoke:
    lines += ["", "Kernel columns are empty: no GPU or TPU ran this (XLA baselines only)."]
  return "\n".join(lines) + "\n"


def main():
  smoke = _SMOKE.value
  seq = bench_lib.int_list("seq_lens", _SEQ.value)
  dens = bench_lib.int_list("densities", _DENS.value)
  if max(dens) > 100:
    raise ValueError(f"--densities={_DENS.value} must be percentages in [1, 100]")
  ms = bench_lib.int_list("ms", _MS.value)
  try:
    shapes = [tuple(int(p) for p in s.lower().split("x")) for s in _KN.value]
  except ValueError:
    shapes = []
  if not shapes or any(len(s) != 2 or min(s) < 1 for s in shapes):
    raise ValueError(f"--kn={','.join(_KN.value)} must be KxN pairs like 4096x4096")
  bad = set(_SKIP.value) - {"attention", "matmul"}
  if bad:
    raise ValueError(f"--skip={','.join(_SKIP.value)}; valid entries: attention, matmul")
  if _ITERS.value < 1:
    raise ValueError(f"--iters={_ITERS.value} must be >= 1")
  heads, kv_heads, dh, block = _HEADS.value, _KV_HEADS.value, _HEAD_DIM.value, _BLOCK.value
  if smoke:
    seq, heads, kv_heads, dh, block = [64], 2, 1, 16, 16
    ms, shapes = [1, 8], [(256, 128)]
  elif kv_heads < 1 or heads % kv_heads:
    raise ValueError(f"--kv_heads={kv_heads} must divide --heads={heads}")
  for t in seq:
    if t % block:
      raise ValueError(f"--block={block} must divide every --seq_lens entry (got {t})")
  info = bench_lib.machine_info()
  attn = [] if "attention" in _SKIP.value else attention_rows(
      seq, dens, heads=heads, kv_heads=kv_heads, head_dim=dh, block=block,
      iters=_ITERS.value, interpret=smoke)
  mm = [] if "matmul" in _SKIP.value else matmul_rows(ms, shapes, iters=_ITERS.value,
                                                      interpret=smoke)
  names = ("seq_lens", "densities", "heads", "kv_heads", "head_dim", "block", "ms", "kn",
           "iters", "smoke", "skip", "out")
  bench_lib.finish("scripts.bench.kernels", names, _OUT.value, info, lambda command: (
      dict(info, smoke=smoke, hbm_peak=hbm_peak(), attention=attn, matmul=mm),
      markdown(info, attn, mm, smoke)))


if __name__ == "__main__":
  cli_lib.run(main)

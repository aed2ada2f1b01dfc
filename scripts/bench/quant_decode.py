r"""Decode speed of f32 vs int8 weight-only vs W8A8 weights, and the dot paths behind it.

  python -m scripts.bench.quant_decode          # ~5 min on 2 cores
  python -m scripts.bench.quant_decode --batch=1,8 --new_tokens=64 --matmul=false

Decode: the --preset model with seeded init weights in f32, quantized with the "int8"
(weight-only) and "w8a8" recipes (`quant.quantize`), greedy `decoding.generate` of
exactly --new_tokens tokens after a --prompt_len-token random prompt, at each --batch;
every (recipe, batch) point is compiled first, then all are timed in turns (best of
--repeats). tok/s = batch x new tokens / wall time, prefill included; "vs f32" is the
ratio to the f32 model at the same batch; "greedy agree" is the fraction of generated
tokens equal to the f32 model's. The path column is what `model.ops.dot` picks for the
model's kernels at M = batch rows (one token per row per decode step).

Matmul: every `model.ops` path (`W8A8_PATHS`, `WEIGHT_ONLY_PATHS`) and an f32-weight dot
for the probe shape 2048 x 8192 and the preset's own kernel shapes at M = 1, 8, 32: the
median time per dot of --loop_dots dots run inside one jitted loop (as in decoding,
where the weights stay put across steps), each dot's input the previous output.
Writes docs/bench_quant_decode.json and docs/bench_quant_decode.md.
"""

from __future__ import annotations

import dataclasses
import os

import jax
import jax.numpy as jnp
import numpy as np
from absl import flags

import decoding
import model
import quant
from model import ops
from scripts import cli_lib
from scripts.bench import bench_lib

RECIPES = ("f32", "int8", "w8a8")
PROBE_SHAPE = (2048, 8192)

_BATCH = flags.DEFINE_list("batch", ["1", "8", "32"], "Batch sizes (rows decoded at once).")
_PROMPT = flags.DEFINE_integer("prompt_len", 32, "Prompt tokens per row.")
_NEW = flags.DEFINE_integer("new_tokens", 96, "Tokens generated per row.")
_PRESET = flags.DEFINE_string("preset", "bench-25m", "Model preset (seeded init weights, f32).")
_REPEATS = flags.DEFINE_integer("repeats", 3, "Timed turns per decode point (best kept).")
_MATMUL = flags.DEFINE_bool("matmul", True, "Also time every dot path (the microbenchmark).")
_M = flags.DEFINE_list("m", ["1", "8", "32"], "Rows of x in the microbenchmark.")
_LOOP = flags.DEFINE_integer("loop_dots", 8, "Dots per jitted loop in the microbenchmark.")
_MM_REPEATS = flags.DEFINE_integer("matmul_repeats", 7, "Timed loops per matmul point "
                                   "(median kept).")
_OUT = flags.DEFINE_string("output_dir", "docs", "Where bench_quant_decode.{json,md} go.")
FLAG_NAMES = ("batch", "prompt_len", "new_tokens", "preset", "repeats", "matmul", "m",
              "loop_dots", "matmul_repeats", "output_dir")


def kernel_shapes(params) -> list[tuple[int, int]]:
  """The distinct 2-D shapes of the kernels the recipes quantize (first seen first)."""
  paths, specs, leaves = quant.plan(params, "int8")
  shapes = [tuple(w.shape) for s, w in zip(specs, leaves, strict=True) if s is not None]
  return list(dict.fromkeys(shapes))


def chosen_paths(recipe: str, rows: int, shapes, backend: str) -> str:
  """What `ops.dot` runs for the model's kernels at `rows` rows, e.g. "int32 (rows padded to 2)"."""
  if recipe == "f32":
    return "f32 dot"
  if recipe == "w8a8":
    p = ops.pick_w8a8_path(rows, backend)
    pad = p == "int32" and backend == "cpu" and rows < ops.W8A8_MIN_DOT_ROWS
    return p + (f" (rows padded to {ops.W8A8_MIN_DOT_ROWS})" if pad else "")
  picks = {ops.pick_weight_only_path(rows, s, jnp.float32, backend) for s in shapes}
  return "/".join(sorted(picks))


def decode_points(cfg, params, batches, prompt_len, new, repeats) -> list[dict]:
  """tok/s of each recipe at each batch, all points timed in turns after compiling each."""
  trees = {"f32": params, "int8": quant.quantize(params, "int8")[0],
           "w8a8": quant.quantize(params, "w8a8")[0]}
  step_fn = model.Decoder(cfg)
  rng = np.random.RandomState(0)
  prompts = [rng.randint(0, cfg.vocab_size, (b, prompt_len)).astype(np.int32) for b in batches]

  def runner(tree):
    return lambda p: np.asarray(decoding.generate(tree, p, step_fn, max_new_tokens=new).tokens)

  methods = {name: runner(tree) for name, tree in trees.items()}
  for name, fn in methods.items():
    for p in prompts:
      print(f"compiling {name} batch {p.shape[0]}", flush=True)
      fn(p)
  best, outs = bench_lib.interleaved(methods, prompts, repeats, warm_up=False)
  shapes, backend = kernel_shapes(params), jax.default_backend()
  rows = []
  for i, b in enumerate(batches):
    for name in RECIPES:
      tok_s = b * new / best[name][i]
      rows.append(dict(recipe=name, batch=b, wall_s=best[name][i], tok_s=tok_s,
                       vs_f32=best["f32"][i] / best[name][i],
                       greedy_agree=float((outs[name, i] == outs["f32", i]).mean()),
                       path=chosen_paths(name, b, shapes, backend)))
  return rows


def _loop(dot_fn, k, steps):
  """`steps` dots in one jitted loop; each input is the previous output folded to width k."""
  def run(x, w):
    def body(_, x):
      y = dot_fn(x, w)
      reps = -(-k // y.shape[1])
      return jnp.tanh(jnp.concatenate([y] * reps, axis=1)[:, :k])
    return jax.lax.fori_loop(0, steps, body, x)
  return jax.jit(run)


def matmul_points(shapes, ms, steps, repeats) -> list[dict]:
  """Median seconds per dot of each path (and f32 weights), paths taking turns."""
  rng = np.random.default_rng(0)
  rows = []
  for k, n in shapes:
    w = rng.standard_normal((k, n)).astype(np.float32) / np.sqrt(k)
    q8 = quant.quantize_tensor(w, bits=8)
    cases = {"f32": (lambda x, w: jnp.matmul(x, w, preferred_element_type=jnp.float32),
                     jnp.asarray(w))}
    cases.update({f"int8 {p}": ((lambda p: lambda x, w: ops.dot(x, w, path=p))(p), q8)
                  for p in ops.WEIGHT_ONLY_PATHS})
    cases["int8 auto"] = (ops.dot, q8)
    qa = dataclasses.replace(q8, act_bits=8)
    cases.update({f"w8a8 {p}": ((lambda p: lambda x, w: ops.dot(x, w, path=p))(p), qa)
                  for p in ops.W8A8_PATHS})
    cases["w8a8 auto"] = (ops.dot, qa)
    fns = {name: _loop(f, k, steps) for name, (f, _) in cases.items()}
    for m in ms:
      x = jnp.asarray(rng.standard_normal((m, k)), jnp.float32)
      for name, fn in fns.items():
        jax.block_until_ready(fn(x, cases[name][1]))
      times = {name: [] for name in fns}
      for _ in range(repeats):
        for name, fn in fns.items():
          times[name].append(bench_lib.timed(lambda: fn(x, cases[name][1]))[0] / steps)
      med = {name: float(np.median(t)) for name, t in times.items()}
      row = dict(K=k, N=n, M=m, us={name: s * 1e6 for name, s in med.items()},
                 vs_f32={name: med["f32"] / s for name, s in med.items()},
                 auto_int8=ops.pick_weight_only_path(m, (k, n), jnp.float32),
                 auto_w8a8=ops.pick_w8a8_path(m))
      rows.append(row)
      print(f"{k}x{n} M={m}: " + " ".join(f"{name} {row['vs_f32'][name]:.2f}x" for name in med),
            flush=True)
  return rows


def markdown(meta, decode_rows, mm_rows, command) -> str:
  lines = [f"# Decode speed: f32 vs int8 weight-only vs W8A8 ({meta['machine']})", "",
           f"Model: preset `{meta['preset']}` ({meta['params'] / 1e6:.1f}M params), seeded "
           f"init weights, greedy, {meta['prompt_len']}-token prompts, {meta['new_tokens']} new "
           f"tokens per row; jax {meta['jax']}, backend {meta['backend']}. Load average at "
           f"start / end: {meta['load_avg_1m']:.2f} / {meta['load_avg_1m_end']:.2f} (the cores "
           "were shared with other jobs: compare within a batch).", "",
           "| batch | weights | tok/s | vs f32 | greedy agree | `ops.dot` path |",
           "|---:|---|---:|---:|---:|---|"]
  for r in decode_rows:
    lines.append(f"| {r['batch']} | {r['recipe']} | {r['tok_s']:.1f} | {r['vs_f32']:.2f}x | "
                 f"{r['greedy_agree']:.3f} | {r['path']} |")
  lines += ["", "tok/s = batch x new tokens / wall time (prefill included), best of "
            f"{meta['repeats']} turns taken in rotation."]
  if mm_rows:
    names = list(mm_rows[0]["us"])
    lines += ["", "## Dot paths (`model.ops`), time per dot relative to f32 weights", "",
              f"Median of {meta['matmul_repeats']} jitted loops of {meta['loop_dots']} dots; "
              "cells are f32 time / path time (> 1 is faster); f32 column in us.", "",
              "| K x N | M | f32 us | " + " | ".join(names[1:]) + " | auto int8 | auto w8a8 |",
              "|---|---:|---:|" + "---:|" * (len(names) - 1) + "---|---|"]
    for r in mm_rows:
      cells = " | ".join(f"{r['vs_f32'][n]:.2f}x" for n in names[1:])
      lines.append(f"| {r['K']} x {r['N']} | {r['M']} | {r['us']['f32']:.0f} | {cells} | "
                   f"{r['auto_int8']} | {r['auto_w8a8']} |")
  lines += ["", f"Command: `{command}`."]
  return "\n".join(lines) + "\n"


def main():
  batches = bench_lib.int_list("batch", _BATCH.value)
  ms = bench_lib.int_list("m", _M.value)
  for name, v, lo in (("prompt_len", _PROMPT.value, 1), ("new_tokens", _NEW.value, 1),
                      ("repeats", _REPEATS.value, 1), ("loop_dots", _LOOP.value, 1),
                      ("matmul_repeats", _MM_REPEATS.value, 1)):
    if v < lo:
      raise ValueError(f"--{name}={v} must be >= {lo}")
  if _PRESET.value not in model.PRESETS:
    raise ValueError(f"--preset={_PRESET.value!r}; valid: {sorted(model.PRESETS)}")
  cfg = model.get_preset(_PRESET.value, param_dtype="float32", dtype="float32")
  if _PROMPT.value + _NEW.value > cfg.max_seq_len:
    raise ValueError(f"--prompt_len={_PROMPT.value} + --new_tokens={_NEW.value} exceeds "
                     f"max_seq_len={cfg.max_seq_len}")
  params = model.init(cfg, jax.random.key(0))
  meta = dict(**bench_lib.machine_info(), preset=_PRESET.value,
              params=model.count_params(params), prompt_len=_PROMPT.value,
              new_tokens=_NEW.value, repeats=_REPEATS.value, loop_dots=_LOOP.value,
              matmul_repeats=_MM_REPEATS.value,
              dispatch=dict(W8A8_MIN_DOT_ROWS=ops.W8A8_MIN_DOT_ROWS,
                            BLOCKED_MIN_BYTES=ops.BLOCKED_MIN_BYTES,
                            BLOCK_BYTES=ops.BLOCK_BYTES))
  decode_rows = decode_points(cfg, params, batches, _PROMPT.value, _NEW.value, _REPEATS.value)
  mm_rows = []
  if _MATMUL.value:
    mm_rows = matmul_points([PROBE_SHAPE, *kernel_shapes(params)], ms, _LOOP.value,
                            _MM_REPEATS.value)
  bench_lib.finish("scripts.bench.quant_decode", FLAG_NAMES,
                   os.path.join(_OUT.value, "bench_quant_decode"), meta,
                   lambda cmd: (dict(meta=meta, decode=decode_rows, matmul=mm_rows),
                                markdown(meta, decode_rows, mm_rows, cmd)))


if __name__ == "__main__":
  cli_lib.run(main)

r"""Why small-M decode dots are slow on XLA:CPU, and which weight layout is fastest.

  python -m scripts.bench.decode_dots                    # ~3 min on 2 cores
  XLA_FLAGS=--xla_cpu_use_thunk_runtime=false python -m scripts.bench.decode_dots \
      --out=docs/bench_decode_dots_nothunk                # the same under other XLA flags

The weight matmuls of one decode step of a preset (default bench-25m: per layer q / k / v,
o, gate / up, down; no attention, no embedding), chained as in the model and run 50 times
in one jitted loop, at M = batch rows, in four weight layouts:

  fused       q / k / v as one [D, (H + 2K) Dh] kernel, gate / up as one [D, 2F]
              (`model.fuse_projections`);
  separate    the checkpoint's kernels (XLA:CPU may run independent dots concurrently);
  halves      every separate kernel stored as two column halves (more independent dots);
  transposed  the fused kernels stored [out, in] (the dot contracts their last axis).

Each is reported as ms per step, GB/s of weights read, and the step over the weight-
streaming bound (weight bytes / the streaming bandwidth measured in the same run).
Writes `<out>.json` and `<out>.md`. XLA_FLAGS is recorded with the results.
"""

import os

import jax
import jax.numpy as jnp
import numpy as np
from absl import flags
from jax import lax

import model
from scripts import cli_lib
from scripts.bench import bench_lib

_ROWS = flags.DEFINE_list("rows", ["1", "8", "32"], "Batch rows M of the decode dots.")
_PRESET = flags.DEFINE_string("preset", "bench-25m", "Model preset whose shapes are used.")
_LAYOUTS = flags.DEFINE_list("layouts", ["fused", "separate", "halves", "transposed"],
                             "Weight layouts to time.")
_REPEATS = flags.DEFINE_integer("repeats", 5, "Timed runs of the 50-step loop (best kept).")
_OUT = flags.DEFINE_string("out", "docs/bench_decode_dots", "Output path prefix.")
FLAG_NAMES = ("rows", "preset", "layouts", "repeats", "out")
LAYOUTS = ("fused", "separate", "halves", "transposed")
STEPS = 50


def _weights(cfg, layout: str, key):
  """Per layer: a list of stages, each a list of kernels whose outputs concatenate."""
  d, f = cfg.d_model, cfg.ffn_dim
  hd, kd = cfg.n_heads * cfg.dh, cfg.n_kv_heads * cfg.dh
  layers = []
  for i in range(cfg.n_layers):
    ks = jax.random.split(jax.random.fold_in(key, i), 7)
    w = lambda k, a, b: jax.random.normal(k, (a, b), jnp.float32) * 0.02
    sep = [[w(ks[0], d, hd), w(ks[1], d, kd), w(ks[2], d, kd)], [w(ks[3], hd, d)],
           [w(ks[4], d, f), w(ks[5], d, f)], [w(ks[6], f, d)]]
    if layout == "separate":
      stages = sep
    elif layout == "halves":
      stages = [[h for k in st for h in jnp.split(k, 2, axis=1)] for st in sep]
    else:
      stages = [[jnp.concatenate(st, axis=1)] for st in sep]
      if layout == "transposed":
        stages = [[k.T for k in st] for st in stages]
    layers.append([[jnp.array(k, copy=True) for k in st] for st in stages])
  return layers


def _step_fn(cfg, layout: str):
  f, hd = cfg.ffn_dim, cfg.n_heads * cfg.dh
  contract = (((1,), (1,)), ((), ())) if layout == "transposed" else (((1,), (0,)), ((), ()))
  stage = lambda x, ks: jnp.concatenate([lax.dot_general(x, k, contract) for k in ks], axis=1)

  def layer(x, w):
    h = stage(x, w[0])[:, :hd]  # the attention output stands in for q
    x = x + stage(h, w[1])
    g = stage(x, w[2])
    return (x + stage(jax.nn.silu(g[:, :f]) * g[:, f:], w[3])) * 0.5

  @jax.jit
  def run(x, weights):
    def body(_, x):
      for w in weights:
        x = layer(x, w)
      return x
    return lax.fori_loop(0, STEPS, body, x)

  return run


def _table(results, meta, command: str) -> str:
  bw = meta["stream_bytes_per_s"]
  lines = [f"# Decode-step weight dots by layout ({meta['machine']})", "",
           f"Preset `{meta['preset']}`: {meta['weight_bytes'] / 1e6:.1f} MB of f32 projection "
           f"weights per step (embedding / LM head excluded). Streaming bandwidth in this run: "
           f"{bw / 1e9:.1f} GB/s (bound {meta['weight_bytes'] / bw * 1e3:.2f} ms). "
           f"jax {meta['jax']}. XLA_FLAGS: `{meta['xla_flags'] or '(none)'}`. Load average "
           f"at start / end: {meta['load_avg_1m']:.2f} / {meta['load_avg_1m_end']:.2f}.", "",
           "| M | layout | ms / step | GB/s | step / bound | vs fused |",
           "|---:|---|---:|---:|---:|---:|"]
  for r in results:
    base = next(x for x in results
                if x["rows"] == r["rows"] and x["layout"] == results[0]["layout"])
    lines.append(f"| {r['rows']} | {r['layout']} | {r['step_ms']:.3f} | {r['gb_s']:.1f} | "
                 f"{r['step_vs_bound']:.2f} | {base['step_ms'] / r['step_ms']:.2f}x |")
  lines += ["", f"Best of {meta['repeats']} runs of a {STEPS}-step jitted loop. 'vs fused': "
            f"the first layout's time over this one's. Command: `{command}`."]
  return "\n".join(lines) + "\n"


def main():
  rows = bench_lib.int_list("rows", _ROWS.value)
  bad = [x for x in _LAYOUTS.value if x not in LAYOUTS]
  if bad:
    raise ValueError(f"--layouts={','.join(_LAYOUTS.value)}: {bad} unknown; valid: "
                     f"{', '.join(LAYOUTS)}")
  if _REPEATS.value < 1:
    raise ValueError(f"--repeats={_REPEATS.value} must be >= 1")
  cfg = model.get_preset(_PRESET.value)
  meta = dict(**bench_lib.machine_info(), preset=_PRESET.value, repeats=_REPEATS.value,
              xla_flags=os.environ.get("XLA_FLAGS", ""))
  meta["stream_bytes_per_s"], _ = bench_lib.stream_bandwidth()
  results = []
  for layout in _LAYOUTS.value:
    weights = _weights(cfg, layout, jax.random.key(0))
    nbytes = sum(a.nbytes for a in jax.tree.leaves(weights))
    meta["weight_bytes"] = nbytes
    run = _step_fn(cfg, layout)
    for m in rows:
      x = jnp.ones((m, cfg.d_model), jnp.float32)
      run(x, weights).block_until_ready()
      t, out = bench_lib.best_of(lambda x=x, w=weights: run(x, w), _REPEATS.value)
      if not np.isfinite(np.asarray(out)).all():
        raise RuntimeError(f"layout {layout}, M={m}: non-finite output")
      step = t / STEPS
      results.append(dict(rows=m, layout=layout, step_ms=step * 1e3, gb_s=nbytes / step / 1e9,
                          step_vs_bound=step / (nbytes / meta["stream_bytes_per_s"])))
      print(f"M={m:3d} {layout:10s} {step * 1e3:7.3f} ms  {nbytes / step / 1e9:5.1f} GB/s",
            flush=True)
  bench_lib.finish("scripts.bench.decode_dots", FLAG_NAMES, _OUT.value, meta,
                   lambda cmd: (dict(meta=meta, results=results), _table(results, meta, cmd)))


if __name__ == "__main__":
  cli_lib.run(main)

r"""Pruned attention speed: block-sparse vs dense attention, whole-model prefill with dynamic
layouts, decoding with a KV budget, and HiP's selection cost.

  python -m scripts.bench.attention                   # ~15 min on 2 cores
  python -m scripts.bench.attention --parts=kernel --lengths=1024,2048

Parts (--parts):
  kernel: one attention call (batch 1, --heads heads of 64 dims, non-causal) at each of
    --lengths, dense (`jax.nn.dot_product_attention`'s XLA path, skipped where its T x S
    scores would pass --dense_max_gib) and the XLA block-sparse path (`model.attention`
    with a `model.BlockLayout`, impl "xla") at densities 100 / 50 / 25 / 10 %: every q
    block keeps the same number of kv blocks (random ones), so the ideal speedup is
    1 / density; blocks of --block.
  prefill: a whole model (d_model 256, 4 layers, 4 heads) prefilling --prefill_len tokens
    into a cache, dense vs `sparsity.TopK` / `sparsity.HiP` block selection.
  decode: tokens/s of `decoding.generate` from a --decode_prompt-token prompt with the
    full cache vs an H2O KV budget of --budget slots.
  hip: selection time of HiP (hierarchical) vs exact block top-k as length grows.
Timings are the best of --repeats after a compile, all in the same process; ratios are
the result (absolute times depend on the machine, named in the output). Writes
docs/bench_attention.{json,md}.
"""

import os

import jax
import jax.numpy as jnp
import numpy as np
from absl import flags

import decoding
import model
from scripts import cli_lib
from scripts.bench import bench_lib
from sparsity import attention as sparse_attention
from sparsity import eviction

PARTS = ("kernel", "prefill", "decode", "hip")
_PARTS = flags.DEFINE_list("parts", list(PARTS), f"Which parts to run: {', '.join(PARTS)}.")
_LENGTHS = flags.DEFINE_list("lengths", ["1024", "2048", "4096", "8192", "16384"],
                             "Sequence lengths of the kernel part.")
_HEADS = flags.DEFINE_integer("heads", 4, "Attention heads (kernel part; kv heads = heads).")
_BLOCK = flags.DEFINE_integer("block", 128, "block_q = block_kv of the kernel part.")
_DENSE_MAX = flags.DEFINE_float("dense_max_gib", 4.0,
                                "Skip dense attention whose f32 scores exceed this.")
_PREFILL = flags.DEFINE_integer("prefill_len", 8192, "Prompt tokens of the prefill part.")
_DECODE_PROMPT = flags.DEFINE_integer("decode_prompt", 4096, "Prompt tokens (decode part).")
_BUDGET = flags.DEFINE_integer("budget", 512, "KV slots per head with eviction (decode).")
_REPEATS = flags.DEFINE_integer("repeats", 3, "Timed runs per measurement (best kept).")
_OUT = flags.DEFINE_string("output_dir", "docs", "Where bench_attention.{json,md} go.")
FLAG_NAMES = ("parts", "lengths", "heads", "block", "dense_max_gib", "prefill_len",
              "decode_prompt", "budget", "repeats", "output_dir")
DENSITIES = (1.0, 0.5, 0.25, 0.1)


def random_layout(rng, heads, q_blocks, kv_blocks, density, *, block_q, block_kv):
  """Every (head, q block) keeps round(density * kv_blocks) random kv blocks (>= 1)."""
  keep = max(1, int(round(density * kv_blocks)))
  order = np.argsort(rng.random((1, heads, q_blocks, kv_blocks)), axis=-1)[..., :keep]
  idx = np.sort(order, axis=-1).astype(np.int32)
  return model.BlockLayout(kv_num_blocks=jnp.full((1, heads, q_blocks), keep, jnp.int32),
                           kv_indices=jnp.asarray(idx), block_q=block_q, block_kv=block_kv)


def kernel_part(lengths, heads, block, repeats, dense_max_gib):
  rng = np.random.default_rng(0)
  attend = jax.jit(lambda q, k, v, m: model.attention(q, k, v, mask=m, impl="xla"))
  rows = []
  for t in lengths:
    q, k, v = (jnp.asarray(rng.normal(size=(1, t, heads, 64)), jnp.float32) for _ in range(3))
    run = lambda m: (lambda: attend(q, k, v, m))
    row = dict(seq_len=t)
    gib = heads * t * t * 4 / 2**30
    if gib <= dense_max_gib:
      mask = model.AttentionMask(causal=False)
      jax.block_until_ready(run(mask)())
      row["dense_s"] = bench_lib.best_of(run(mask), repeats)[0]
    nb = -(-t // block)
    for d in DENSITIES:
      lay = random_layout(rng, heads, nb, nb, d, block_q=block, block_kv=block)
      mask = model.AttentionMask(causal=False, layout=lay)
      jax.block_until_ready(run(mask)())
      row[f"sparse_{int(d * 100)}_s"] = bench_lib.best_of(run(mask), repeats)[0]
    rows.append(row)
    print(row, flush=True)
  return rows


def _kernel_table(rows):
  lines = ["| T | dense ms | block 100% ms | 50% | 25% | 10% | speedup vs dense at 50 / 25 / 10 % "
           "(ideal 2 / 4 / 10) | vs block 100% |", "|---:|---:|---:|---:|---:|---:|---|---|"]
  for r in rows:
    dense = r.get("dense_s")
    ms = lambda x: f"{x * 1e3:.1f}"
    sp = [r[f"sparse_{p}_s"] for p in (50, 25, 10)]
    vs_dense = " / ".join(f"{dense / x:.2f}x" for x in sp) if dense else "n/a (dense skipped)"
    vs_full = " / ".join(f"{r['sparse_100_s'] / x:.2f}x" for x in sp)
    lines.append(f"| {r['seq_len']} | {ms(dense) if dense else '-'} | {ms(r['sparse_100_s'])} | "
                 f"{' | '.join(ms(x) for x in sp)} | {vs_dense} | {vs_full} |")
  return lines


# The prefill / decode parts' model: random weights (speed does not depend on them).
BENCH_MODEL = dict(d_model=256, n_layers=4, n_heads=4, n_kv_heads=2, ffn_dim=768)


def _bench_cfg(max_len):
  return model.ModelConfig(**BENCH_MODEL, max_seq_len=max_len)


def prefill_part(t, repeats):
  """Whole-model prefill of t tokens into an empty cache: dense vs block selectors."""
  cfg = _bench_cfg(t)
  params = model.init(cfg, jax.random.key(0))
  tokens = jnp.asarray(np.random.default_rng(0).integers(0, 256, size=(1, t)), jnp.int32)
  nb = t // 64
  variants = {"dense": None,
              f"top-k {max(1, nb // 10)} of {nb} blocks of 64 (~10%)": sparse_attention.TopK(
                  k=max(1, nb // 10), block=64),
              f"top-k {max(1, nb // 4)} of {nb} blocks of 64 (~25%)": sparse_attention.TopK(
                  k=max(1, nb // 4), block=64),
              f"HiP k={max(1, nb // 10)} blocks of 64": sparse_attention.HiP(
                  k=max(1, nb // 10), block=64)}
  rows = []
  for name, sel in variants.items():
    dec = model.Decoder(cfg, attn_select=sel)
    fwd = jax.jit(lambda p, x, c, dec=dec: dec(p, x, c)[0][:, -1])
    run = lambda dec=dec, fwd=fwd: fwd(params, tokens, dec.init_cache(1, t))
    jax.block_until_ready(run())
    rows.append(dict(variant=name, seconds=bench_lib.best_of(run, repeats)[0]))
    print(rows[-1], flush=True)
  base = rows[0]["seconds"]
  for r in rows:
    r["speedup"] = base / r["seconds"]
  return dict(seq_len=t, model=BENCH_MODEL, rows=rows)


def decode_part(prompt_len, budget, repeats, new=256, batch=4):
  """decode tok/s = batch x (new - 1) / (t(new) - t(1)) of generate: full cache vs budgets."""
  cfg = _bench_cfg(prompt_len + new + 64)
  params = model.init(cfg, jax.random.key(0))
  prompts = np.random.default_rng(1).integers(0, 256, size=(batch, prompt_len)).astype(np.int32)
  variants = {"full cache": None,
              f"H2O budget {budget}": eviction.H2O(budget=budget),
              f"StreamingLLM budget {budget}": eviction.StreamingLLM(budget=budget)}
  runs = {}
  for name, pol in variants.items():
    dec = model.Decoder(cfg, evict=pol)
    runs[name] = lambda n, dec=dec: decoding.generate(params, prompts, dec, max_new_tokens=n).tokens
  for fn in runs.values():
    jax.block_until_ready(fn(1))
  best, _ = bench_lib.interleaved(runs, [new, 1], repeats)
  rows = [dict(variant=name, tokens_per_s=batch * (new - 1) / max(t[0] - t[1], 1e-9))
          for name, t in best.items()]
  for r in rows:
    r["speedup"] = r["tokens_per_s"] / rows[0]["tokens_per_s"]
  return dict(prompt_len=prompt_len, new_tokens=new, batch=batch, budget=budget,
              model=BENCH_MODEL, rows=rows)


def hip_part(lengths, repeats, heads=4, block=64, k=8):
  """Selection time: HiP's hierarchical halving vs exact block top-k (Quest scores)."""
  rng = np.random.default_rng(2)
  rows = []
  for t in lengths:
    q = jnp.asarray(rng.normal(size=(1, t, heads, 64)), jnp.float32)
    kk = jnp.asarray(rng.normal(size=(1, heads, t, 64)), jnp.float32)
    kw = dict(block_q=block, block_kv=block, k=min(k, t // block))
    fns = {"topk": jax.jit(lambda q, kk: sparse_attention.topk_layout(q, kk, **kw).kv_indices),
           "hip": jax.jit(lambda q, kk: sparse_attention.hip_layout(q, kk, **kw).kv_indices)}
    row = dict(seq_len=t)
    for name, fn in fns.items():
      jax.block_until_ready(fn(q, kk))
      row[f"{name}_s"] = bench_lib.best_of(lambda fn=fn: fn(q, kk), repeats)[0]
    rows.append(row)
    print(row, flush=True)
  return rows


def main():
  parts = list(_PARTS.value)
  bad = [p for p in parts if p not in PARTS]
  if bad or not parts:
    raise ValueError(f"--parts={','.join(parts)}; valid: {', '.join(PARTS)}")
  lengths = bench_lib.int_list("lengths", _LENGTHS.value, minimum=_BLOCK.value)
  for name, flag in (("heads", _HEADS), ("block", _BLOCK), ("repeats", _REPEATS),
                     ("prefill_len", _PREFILL), ("decode_prompt", _DECODE_PROMPT),
                     ("budget", _BUDGET)):
    if flag.value < 1:
      raise ValueError(f"--{name}={flag.value} must be >= 1")
  meta = dict(**bench_lib.machine_info(), parts=parts)
  result, md = dict(meta=meta), [f"# Pruned attention speed ({meta['machine']})", ""]
  if "kernel" in parts:
    rows = kernel_part(lengths, _HEADS.value, _BLOCK.value, _REPEATS.value, _DENSE_MAX.value)
    result["kernel"] = rows
    md += [f"## One attention call: batch 1, {_HEADS.value} heads x 64, non-causal, blocks of "
           f"{_BLOCK.value}, f32", ""] + _kernel_table(rows) + [""]
  if "prefill" in parts:
    pre = prefill_part(_PREFILL.value, _REPEATS.value)
    result["prefill"] = pre
    md += [f"## Whole-model prefill of {pre['seq_len']} tokens (batch 1, {BENCH_MODEL}, "
           "random weights, f32)", "", "| attention | seconds | speedup |", "|---|---:|---:|"]
    md += [f"| {r['variant']} | {r['seconds']:.3f} | {r['speedup']:.2f}x |" for r in pre["rows"]]
    md += [""]
  if "decode" in parts:
    dec = decode_part(_DECODE_PROMPT.value, _BUDGET.value, _REPEATS.value)
    result["decode"] = dec
    md += [f"## Decoding after a {dec['prompt_len']}-token prompt (batch {dec['batch']}, "
           f"{dec['new_tokens']} new tokens, greedy, {BENCH_MODEL})", "",
           "| KV cache | decode tok/s | speedup |", "|---|---:|---:|"]
    md += [f"| {r['variant']} | {r['tokens_per_s']:.1f} | {r['speedup']:.2f}x |"
           for r in dec["rows"]]
    md += ["", "decode tok/s = batch x (new - 1) / (t(new) - t(1)), best of the repeats.", ""]
  if "hip" in parts:
    hip = hip_part([t for t in lengths if t >= 512], _REPEATS.value)
    result["hip"] = hip
    md += ["## Block selection cost: HiP vs exact top-k (batch 1, 4 heads x 64, blocks of 64, "
           "k = 8)", "", "| T | top-k ms | HiP ms | HiP / top-k |", "|---:|---:|---:|---:|"]
    md += [f"| {r['seq_len']} | {r['topk_s'] * 1e3:.1f} | {r['hip_s'] * 1e3:.1f} | "
           f"{r['hip_s'] / r['topk_s']:.2f} |" for r in hip]
    md += [""]
  bench_lib.finish("scripts.bench.attention", FLAG_NAMES,
                   os.path.join(_OUT.value, "bench_attention"), meta,
                   lambda cmd: (result, "\n".join(md + [f"Command: `{cmd}`."]) + "\n"))


if __name__ == "__main__":
  cli_lib.run(main)

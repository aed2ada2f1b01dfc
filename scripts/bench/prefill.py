r"""Long-prompt prefill: blocked causal attention vs the dense masked path.

  python -m scripts.bench.prefill                                  # ~3 min on 2 cores
  python -m scripts.bench.prefill --prompt_len=1024 --batch=1,8    # a subset

One cached forward over a random prompt (the prefill `decoding.generate` runs first),
jitted, compile excluded, best of --repeats, on the preset's random weights. "blocked":
the model's default, `model.attention.blocked_causal` in query blocks of BLOCKED_BLOCK
tokens for prompts of at least BLOCKED_MIN_TOKENS (the cache's empty slots skipped at run
time, new keys attended from the projections, then written in place). "dense": the same
forward with that path switched off (every query against every cache slot, masked). The
two logits must agree. Writes `<out>.json` and `<out>.md`.
"""

import importlib

import jax
import jax.numpy as jnp
import numpy as np
from absl import flags

import model
from scripts import cli_lib
from scripts.bench import bench_lib

attention = importlib.import_module("model.attention")

_PROMPT = flags.DEFINE_list("prompt_len", ["1024", "2048", "4096"], "Prompt lengths.")
_BATCH = flags.DEFINE_list("batch", ["1"], "Batch sizes.")
_PRESET = flags.DEFINE_string("preset", "bench-25m", "Model preset (random weights).")
_REPEATS = flags.DEFINE_integer("repeats", 3, "Timed runs per point (the best is kept).")
_OUT = flags.DEFINE_string("out", "docs/bench_prefill", "Output path prefix.")
FLAG_NAMES = ("prompt_len", "batch", "preset", "repeats", "out")


def _prefill(cfg, params, tokens, blocked: bool):
  """(seconds, logits) of one cached prefill; the path is fixed at trace time."""
  b, t = tokens.shape
  saved = attention.BLOCKED_MIN_TOKENS
  attention.BLOCKED_MIN_TOKENS = saved if blocked else 1 << 30
  try:
    fwd = jax.jit(lambda p, x, c: model.apply(cfg, p, x, cache=c)[0][:, -1])
    make = lambda: model.init_cache(cfg, b, t)
    fwd(params, tokens, make()).block_until_ready()  # compile
  finally:
    attention.BLOCKED_MIN_TOKENS = saved
  return bench_lib.best_of(lambda: fwd(params, tokens, make()), _REPEATS.value)


def _table(results, meta, command: str) -> str:
  lines = [f"# Prefill: blocked causal vs dense attention ({meta['machine']})", "",
           f"Preset `{meta['preset']}` ({meta['params'] / 1e6:.1f}M params, float32), random "
           f"weights, one cached forward over the prompt. Blocked: query blocks of "
           f"{meta['block']} tokens (from {meta['min_tokens']} tokens on). jax {meta['jax']}. "
           f"Load average at start / end: {meta['load_avg_1m']:.2f} / "
           f"{meta['load_avg_1m_end']:.2f}.", "",
           "| prompt | batch | dense s | blocked s | speedup | blocked tok/s | "
           "dense scores / layer | blocked scores / layer | max logit diff |",
           "|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
  for r in results:
    lines.append(f"| {r['prompt_len']} | {r['batch']} | {r['dense_s']:.3f} | "
                 f"{r['blocked_s']:.3f} | {r['dense_s'] / r['blocked_s']:.2f}x | "
                 f"{r['batch'] * r['prompt_len'] / r['blocked_s']:.0f} | "
                 f"{r['dense_score_bytes'] / 2**20:.0f} MiB | "
                 f"{r['blocked_score_bytes'] / 2**20:.0f} MiB | {r['max_logit_diff']:.1e} |")
  lines += ["", "Scores / layer: the f32 score matrix one layer's attention holds at once "
            "(dense: B x H x T x S; blocked: B x H x block x T, the last block). Best of "
            f"{meta['repeats']} runs after a compile. Command: `{command}`."]
  return "\n".join(lines) + "\n"


def main():
  lens = bench_lib.int_list("prompt_len", _PROMPT.value)
  batches = bench_lib.int_list("batch", _BATCH.value)
  if _REPEATS.value < 1:
    raise ValueError(f"--repeats={_REPEATS.value} must be >= 1")
  blk, lo = attention.BLOCKED_BLOCK, attention.BLOCKED_MIN_TOKENS
  bad = [t for t in lens if t < lo or t % blk]
  if bad:
    raise ValueError(f"--prompt_len={','.join(map(str, lens))}: {bad} take no blocked path "
                     f"(valid: multiples of {blk}, at least {lo})")
  cfg = model.get_preset(_PRESET.value)
  cfg = cfg.replace(max_seq_len=max(cfg.max_seq_len, max(lens)))
  params = model.init(cfg, jax.random.key(0))
  meta = dict(**bench_lib.machine_info(), preset=_PRESET.value, params=model.count_params(params),
              block=blk, min_tokens=lo, repeats=_REPEATS.value)
  results = []
  rng = np.random.RandomState(0)
  for t in lens:
    for b in batches:
      tokens = jnp.asarray(rng.randint(0, cfg.vocab_size, (b, t)), jnp.int32)
      dense_s, dense = _prefill(cfg, params, tokens, blocked=False)
      blocked_s, blocked = _prefill(cfg, params, tokens, blocked=True)
      diff = float(jnp.abs(dense - blocked).max())
      if not diff < 1e-3:
        raise RuntimeError(f"prompt {t}, batch {b}: blocked and dense logits differ by {diff}")
      results.append(dict(prompt_len=t, batch=b, dense_s=dense_s, blocked_s=blocked_s,
                          max_logit_diff=diff,
                          dense_score_bytes=4 * b * cfg.n_heads * t * t,
                          blocked_score_bytes=4 * b * cfg.n_heads * blk * t))
      print(f"prompt {t:5d} batch {b:3d}: dense {dense_s:.3f} s, blocked {blocked_s:.3f} s "
            f"({dense_s / blocked_s:.2f}x)", flush=True)
  bench_lib.finish("scripts.bench.prefill", FLAG_NAMES, _OUT.value, meta,
                   lambda cmd: (dict(meta=meta, results=results), _table(results, meta, cmd)))


if __name__ == "__main__":
  cli_lib.run(main)

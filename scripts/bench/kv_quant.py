r"""KV-cache quantization: bytes, logit error, greedy agreement and decode speed per format.

  python -m scripts.bench.kv_quant          # ~1 min on 2 cores

For the `tiny` preset (trained weights from --workdir when it holds a checkpoint, else a
seeded init; the json says which), batch --batch prompts of --prompt_len bytes of Python
stdlib source: the KV cache's bytes, the max |logit diff| against the float cache over a
teacher-forced --new_tokens-token continuation (one cached forward after the prefill),
the greedy agreement with the float cache over --new_tokens generated tokens, and decode
tok/s = batch * (new - 1) / (t(new) - t(1)) of `decoding.generate` (compile excluded),
for float / int8 / int4 / fp8 caches and int8 + smoothed int8 Q.K^T (attn_qk="int8").
Writes docs/bench_kv_quant.json and docs/bench_kv_quant.md.
"""

import inspect
import json
import os
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
from absl import flags

import decoding
import model
from scripts import checkpoint_lib, cli_lib
from scripts.bench import bench_lib

_WORKDIR = flags.DEFINE_string("workdir", "runs/main/float",
                               "Trained `tiny` checkpoint (a seeded init when absent).")
_BATCH = flags.DEFINE_integer("batch", 4, "Prompts per batch.")
_PROMPT = flags.DEFINE_integer("prompt_len", 256, "Cached prompt tokens per row.")
_NEW = flags.DEFINE_integer("new_tokens", 64, "Teacher-forced / generated tokens per row.")
_REPEATS = flags.DEFINE_integer("repeats", 10, "Timed runs per method (the best is kept).")
_OUT = flags.DEFINE_string("output_dir", "docs", "Where bench_kv_quant.{json,md} go.")
FLAG_NAMES = ("workdir", "batch", "prompt_len", "new_tokens", "repeats", "output_dir")

METHODS = {"float": {}, "int8": dict(kv_quant="int8"), "int4": dict(kv_quant="int4"),
           "fp8": dict(kv_quant="fp8"), "int8+qk": dict(kv_quant="int8", attn_qk="int8")}
_SOURCES = (json.decoder, textwrap, inspect, os)  # stdlib text, the trained model's corpus


def _load(workdir):
  """(cfg, params, where the weights came from)."""
  if workdir and os.path.isdir(os.path.join(workdir, "checkpoints")):
    params, cfg, step = checkpoint_lib.load_params(workdir)
    return cfg, params, f"trained: {workdir} step {step}"
  cfg = model.get_preset("tiny")
  return cfg, model.init(cfg, jax.random.key(0)), "random: model.init(tiny, key 0)"


def _texts(b, n):
  """[b, n] byte tokens: row i from the middle of a stdlib module's source."""
  tok = model.ByteTokenizer()
  rows = []
  for i in range(b):
    ids = tok.encode(inspect.getsource(_SOURCES[i % len(_SOURCES)]))
    start = (len(ids) - n) // 2 + 997 * (i // len(_SOURCES))
    rows.append(ids[start:start + n])
  return np.asarray(rows, np.int32)


def _method(cfg, params, prompts, cont, new):
  """Teacher-forced logits, the cache, and a generate runner for one cache format."""
  b, p = prompts.shape
  dec = model.Decoder(cfg)
  fwd = jax.jit(lambda prm, t, c: dec(prm, t, c))
  cache = dec.init_cache(b, p + new)
  _, cache = fwd(params, jnp.asarray(prompts), cache)
  logits, cache = fwd(params, jnp.asarray(cont), cache)

  def run(n):
    return np.asarray(decoding.generate(params, prompts, dec, max_new_tokens=n).tokens)

  return np.asarray(logits), cache, run


def _table(rows, meta, command):
  lines = [f"# KV-cache quantization ({meta['machine']})", "",
           f"Model: preset `tiny` ({meta['params'] / 1e6:.2f}M params, float32), weights "
           f"{meta['weights']}. Batch {meta['batch']}, {meta['prompt_len']} cached prompt "
           f"tokens (Python stdlib source), {meta['new_tokens']} new tokens. jax {meta['jax']}. "
           f"Load average at start / end: {meta['load_avg_1m']:.2f} / "
           f"{meta['load_avg_1m_end']:.2f}.", "",
           "| cache | bytes | vs float | max abs logit diff | greedy agreement | decode tok/s |",
           "|---|---:|---:|---:|---:|---:|"]
  base = rows[0]["cache_bytes"]
  for r in rows:
    lines.append(f"| {r['method']} | {r['cache_bytes']:,} | {r['cache_bytes'] / base:.3f} | "
                 f"{r['max_abs_logit_diff']:.4f} | {r['greedy_agreement']:.3f} | "
                 f"{r['decode_tok_s']:.1f} |")
  lines += ["", f"bytes: the whole cache (codes + scales + key means; {meta['cache_slots']} "
            "slots per row, all layers). Logit diff: max over the teacher-forced continuation "
            f"(logit std {meta['logit_std']:.2f}). Greedy agreement: fraction of generated "
            "tokens equal to the float cache's. decode tok/s = batch x (new - 1) / "
            "(t(new) - t(1)), best of the repeats. int8+qk: int8 cache with keys smoothed by "
            f"their mean and int8 x int8 Q.K^T (attn_qk='int8'). Command: `{command}`."]
  return "\n".join(lines) + "\n"


def main():
  b, p, new = _BATCH.value, _PROMPT.value, _NEW.value
  if min(b, p) < 1 or new < 2 or _REPEATS.value < 1:
    raise ValueError(f"--batch={b} and --prompt_len={p} must be >= 1, --new_tokens={new} >= 2, "
                     f"--repeats={_REPEATS.value} >= 1")
  base_cfg, params, weights = _load(_WORKDIR.value)
  if p + new > base_cfg.max_seq_len:
    raise ValueError(f"--prompt_len={p} + --new_tokens={new} exceeds max_seq_len="
                     f"{base_cfg.max_seq_len}")
  text = _texts(b, p + new)
  prompts, cont = text[:, :p], text[:, p:]
  meta = dict(**bench_lib.machine_info(), weights=weights, params=model.count_params(params),
              batch=b, prompt_len=p, new_tokens=new)
  runs = {}
  for name, kw in METHODS.items():
    print(f"preparing {name}", flush=True)
    runs[name] = _method(base_cfg.replace(**kw), params, prompts, cont, new)
  ref_logits, ref_cache, _ = runs["float"]
  meta.update(logit_std=float(ref_logits.std()), cache_slots=ref_cache.max_len)
  gen = {name: run for name, (_, _, run) in runs.items()}
  for run in gen.values():
    run(1)  # compiles the 1-token shape (interleaved's warm-up compiles the first input's)
  best, outs = bench_lib.interleaved(gen, [new, 1], _REPEATS.value)
  tokens = {name: outs[name, 0] for name in gen}
  rows = []
  for name, (logits, cache, _) in runs.items():
    rows.append(dict(method=name, **METHODS[name], cache_bytes=int(cache.nbytes),
                     max_abs_logit_diff=float(np.abs(logits - ref_logits).max()),
                     greedy_agreement=float((tokens[name] == tokens["float"]).mean()),
                     decode_tok_s=b * (new - 1) / max(best[name][0] - best[name][1], 1e-9)))
    print({k: v for k, v in rows[-1].items() if k != "method"} | {"method": name}, flush=True)
  bench_lib.finish("scripts.bench.kv_quant", FLAG_NAMES,
                   os.path.join(_OUT.value, "bench_kv_quant"), meta,
                   lambda cmd: (dict(meta=meta, results=rows), _table(rows, meta, cmd)))


if __name__ == "__main__":
  cli_lib.run(main)

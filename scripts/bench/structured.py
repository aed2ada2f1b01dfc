r"""Greedy decode throughput of a dense model vs structurally shrunk copies of it.

  python -m scripts.bench.structured                          # bench-25m, batch 1 and 8
  python -m scripts.bench.structured --variants=neurons:0.5 --batch=1 --repeats=2

Each variant is `sparsity.structured.prune_structured` of the same random-weight
model (weight-only scores; speed does not depend on the values), physically
smaller: `neurons:F` prunes a fraction F of every layer's FFN neurons, `heads:F`
query heads per KV group, `kv_groups:F` whole KV groups; join them with `+`. For
each batch size: random prompts, `decoding.generate` greedy for exactly
--new_tokens tokens, compile excluded (a warm-up call per model and shape), all
models taking turns in one process (`bench_lib.interleaved`, best of --repeats).
tok/s = batch * new tokens / wall (prefill included); decode tok/s = batch *
(new - 1) / (t(new) - t(1)), from extra 1-token runs. Writes --out.{json,md}.
"""

from __future__ import annotations

import functools
import os

import jax
import numpy as np
from absl import flags

import decoding
import model
from scripts import cli_lib
from scripts.bench import bench_lib
from sparsity import structured

_PRESET = flags.DEFINE_string("preset", "bench-25m", "Model preset (random weights).")
_DTYPE = flags.DEFINE_string("dtype", "float32", "Param and compute dtype.")
_VARIANTS = flags.DEFINE_list("variants", ["neurons:0.5", "neurons:0.5+heads:0.5"],
                              "Shrunk variants: KIND:FRACTION joined by '+', KIND one of "
                              "neurons, heads, kv_groups.")
_BATCH = flags.DEFINE_list("batch", ["1", "8"], "Batch sizes.")
_PROMPT = flags.DEFINE_integer("prompt_len", 128, "Prompt length.")
_NEW = flags.DEFINE_integer("new_tokens", 128, "Tokens generated per row.")
_REPEATS = flags.DEFINE_integer("repeats", 3, "Timed turns per model (the best is kept).")
_OUT = flags.DEFINE_string("out", "docs/bench_structured", "Output path without extension.")
FLAG_NAMES = ("preset", "dtype", "variants", "batch", "prompt_len", "new_tokens", "repeats", "out")
KINDS = ("neurons", "heads", "kv_groups")


def parse_variant(text: str) -> dict:
  """'neurons:0.5+heads:0.5' -> prune_structured kwargs; ValueError names --variants."""
  kw: dict = {}
  for part in text.split("+"):
    kind, _, frac = part.strip().partition(":")
    try:
      value = float(frac)
    except ValueError:
      value = None
    bad = value is None or not 0.0 <= value < 1.0
    if kind not in KINDS or bad or ("heads" in kw and kind != "neurons") or kind in kw:
      raise ValueError(f"--variants entry {text!r} must be KIND:FRACTION joined by '+', KIND one "
                       f"of {KINDS}, FRACTION in [0, 1) (each kind once; heads and kv_groups "
                       "exclusive), e.g. "
                       "'neurons:0.5+heads:0.5'")
    if kind == "kv_groups":
      kw.update(heads=value, head_mode="kv_groups")
    else:
      kw[kind] = value
  return kw


def _generate(params, prompts, decoder, new: int):
  return decoding.generate(params, prompts, decoder, max_new_tokens=new).tokens


def run(preset: str, variants, batches, prompt_len: int, new_tokens: int, repeats: int, out: str,
        *, dtype: str = "float32", command: str = "", log=print) -> dict:
  """Times dense vs every variant at every batch size; writes `<out>.json` / `<out>.md`."""
  if new_tokens < 2 or repeats < 1 or prompt_len < 2:
    raise ValueError(f"new_tokens={new_tokens} must be >= 2, repeats={repeats} >= 1, "
                     f"prompt_len={prompt_len} >= 2")
  cfg = model.get_preset(preset, param_dtype=dtype, dtype=dtype)
  if prompt_len + new_tokens > cfg.max_seq_len:
    raise ValueError(f"prompt_len={prompt_len} + new_tokens={new_tokens} exceeds "
                     f"max_seq_len={cfg.max_seq_len}")
  kwargs = {v: parse_variant(v) for v in variants}
  info = dict(**bench_lib.machine_info(), preset=preset, dtype=dtype, prompt_len=prompt_len,
              new_tokens=new_tokens, repeats=repeats, command=command)
  params = model.init(cfg, jax.random.key(0))
  models = {"dense": (cfg, params)}
  for name, kw in kwargs.items():
    new_cfg, new_params, _ = structured.prune_structured(cfg, params, **kw)
    models[name] = (new_cfg, new_params)
  rows, rng = [], np.random.RandomState(0)
  for b in batches:
    prompts = rng.randint(0, cfg.vocab_size, (b, prompt_len)).astype(np.int32)
    methods = {}
    for name, (c, p) in models.items():
      dec = model.Decoder(c)
      methods[name] = functools.partial(_generate, p, decoder=dec, new=new_tokens)
      methods[name + "@1"] = functools.partial(_generate, p, decoder=dec, new=1)
    best, _ = bench_lib.interleaved(methods, [prompts], repeats, log=log)
    for name, (c, p) in models.items():
      t, t1 = best[name][0], best[name + "@1"][0]
      rows.append(dict(variant=name, params=model.count_params(p), ffn_dim=c.ffn_dim,
                       n_heads=c.n_heads, n_kv_heads=c.n_kv_heads, batch=b, wall_s=t,
                       prefill_s=t1, tok_s=b * new_tokens / t,
                       decode_tok_s=b * (new_tokens - 1) / max(t - t1, 1e-9)))
    dense = rows[-len(models)]
    for r in rows[-len(models):]:
      r["speedup"] = r["tok_s"] / dense["tok_s"]
      r["decode_speedup"] = r["decode_tok_s"] / dense["decode_tok_s"]
      log(f"batch {b} {r['variant']}: {r['tok_s']:.1f} tok/s ({r['speedup']:.2f}x), decode "
          f"{r['decode_tok_s']:.1f} tok/s ({r['decode_speedup']:.2f}x)")
  info["load_avg_1m_end"] = os.getloadavg()[0]
  result = dict(meta=info, rows=rows)
  bench_lib.write_results(out, result, markdown(result), log=log)
  return result


def markdown(result: dict) -> str:
  """The results as a markdown table with the machine and the command."""
  m = result["meta"]
  lines = [f"# Structured pruning: decode throughput, dense vs shrunk ({m['machine']})", "",
           f"Preset `{m['preset']}` ({m['dtype']}), random weights, greedy, prompt "
           f"{m['prompt_len']}, {m['new_tokens']} new tokens per row, best of {m['repeats']} "
           f"interleaved turns, compile excluded. jax {m['jax']}. Load average at start / end: "
           f"{m['load_avg_1m']:.2f} / {m['load_avg_1m_end']:.2f}.", "",
           "| variant | params | ffn_dim | n_heads | batch | tok/s | speedup vs dense | "
           "decode tok/s | decode speedup |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
  for r in result["rows"]:
    lines.append(f"| {r['variant']} | {r['params'] / 1e6:.2f}M | {r['ffn_dim']} | "
                 f"{r['n_heads']} / {r['n_kv_heads']} kv | {r['batch']} | {r['tok_s']:.1f} | "
                 f"{r['speedup']:.2f}x | {r['decode_tok_s']:.1f} | {r['decode_speedup']:.2f}x |")
  lines += ["", "tok/s = batch x new tokens / wall time, prefill included; decode tok/s = batch "
            "x (new - 1) / (t(new) - t(1)). Variants: `sparsity.structured.prune_structured` "
            "(weight-only scores), physically sliced to a smaller dense model.",
            f"Command: `{m['command']}`."]
  return "\n".join(lines) + "\n"


def main():
  batches = bench_lib.int_list("batch", _BATCH.value)
  for v in _VARIANTS.value:
    parse_variant(v)
  command = bench_lib.command_line("scripts.bench.structured", FLAG_NAMES)
  run(_PRESET.value, _VARIANTS.value, batches, _PROMPT.value, _NEW.value, _REPEATS.value,
      _OUT.value, dtype=_DTYPE.value, command=command)


if __name__ == "__main__":
  cli_lib.run(main)

r"""Shared-prefix (Hydragen) vs naive batched sampling as the shared prompt grows.

python -m scripts.bench.shared_prefix [--lengths=256,1024,4096 --n=32 --max_new_tokens=64]

N samples of one prompt (temperature 1). Both methods prefill the prompt once
(`prefill_prefix`) and then decode with `decoding.generate`; they differ only
in the prompt's KV at decode time: "shared" keeps one copy and attends all N
queries to it in one batched matmul, merged with each row's suffix attention
by log-sum-exp; "naive" keeps N copies (the layout of ordinary batched
sampling). Decode throughput = N * new tokens / decode wall time (best of
--repeats, after a compile run). Random weights: speed does not depend on them.
Models: the 25M decode-benchmark shape (d=512, 8 layers), and single wide
layers (d=2048; d=4096 shaped like Llama-2-7B) standing in for large models,
where the prompt's attention FLOPs (~P / 6d of the weights') stay small.
Writes docs/bench_shared_prefix.{json,md}.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from absl import flags

import decoding
import model
from decoding import shared_prefix
from scripts import cli_lib
from scripts.bench import bench_lib

MODELS = {
    "bench-25m": model.get_preset("bench-25m", max_seq_len=8192),  # d=512, 8 layers
    "wide": model.ModelConfig(  # one d=2048 layer
        vocab_size=256, d_model=2048, n_layers=1, n_heads=16, n_kv_heads=8, ffn_dim=5632,
        max_seq_len=8192),
    "7b-layer": model.ModelConfig(  # one Llama-2-7B-shaped layer (GQA 32 / 8 heads)
        vocab_size=256, d_model=4096, n_layers=1, n_heads=32, n_kv_heads=8, ffn_dim=11008,
        max_seq_len=8192),
}
_LENGTHS = flags.DEFINE_list("lengths", ["256", "1024", "4096"], "Shared prompt lengths.")
_N = flags.DEFINE_integer("n", 32, "Samples per prompt.")
_NEW = flags.DEFINE_integer("max_new_tokens", 64, "New tokens per sample.")
_REPEATS = flags.DEFINE_integer("repeats", 2, "Timed repeats (best kept).")
_MODELS = flags.DEFINE_list("models", list(MODELS), "Models (names in MODELS).")
_OUT = flags.DEFINE_string("out", "docs/bench_shared_prefix", "Output path without extension.")
FLAG_NAMES = ("models", "lengths", "n", "max_new_tokens", "repeats", "out")


def _decode_seconds(cfg, params, prefix, last: int, n: int, new: int, repeats: int) -> float:
  sampler = decoding.Sampler.create(n, temperature=1.0)
  decoder = model.Decoder(cfg)
  cache = lambda b, s: model.PrefixCache(prefix=prefix, suffix=decoder.init_cache(b, s))
  run = lambda: decoding.generate(params, [[last]] * n, decoder, sampler=sampler,
                                  max_new_tokens=new, cache=cache, key=jax.random.key(0))
  run()  # compile
  return bench_lib.best_of(run, repeats)[0]


def bench_model(name: str, cfg, lengths, n: int, new: int, repeats: int, log=print) -> list:
  params = model.init(cfg, jax.random.key(0))
  rng = np.random.RandomState(0)
  rows = []
  for p in lengths:
    prefill_s, (prefix, last, _) = bench_lib.timed(
        lambda: shared_prefix.prefill_prefix(cfg, params, rng.randint(0, 256, p)))
    shared = _decode_seconds(cfg, params, prefix, last, n, new, repeats)
    copied = prefix.take(jnp.zeros((n,), jnp.int32))
    naive = _decode_seconds(cfg, params, copied, last, n, new, repeats)
    del copied
    row = {"model": name, "prompt_len": p, "n": n, "new_tokens": new,
           "prefill_s": prefill_s, "shared_tok_s": n * new / shared,
           "naive_tok_s": n * new / naive,
           "prefix_kv_mb_shared": prefix.nbytes / 2**20,
           "prefix_kv_mb_naive": n * prefix.nbytes / 2**20,
           "attn_over_matmul_flops": (4 * cfg.n_layers * cfg.n_heads * cfg.dh * p)
                                     / (2 * model.count_params(params))}
    log(f"{name} P={p}: shared {row['shared_tok_s']:.0f} tok/s, naive "
        f"{row['naive_tok_s']:.0f} tok/s (prefill {prefill_s:.1f}s)")
    rows.append(row)
  first = rows[0]
  for r in rows:
    r["shared_drop"] = 1 - r["shared_tok_s"] / first["shared_tok_s"]
    r["naive_drop"] = 1 - r["naive_tok_s"] / first["naive_tok_s"]
  return rows


def markdown(rows: list, info: dict, command: str) -> str:
  lines = ["# Shared-prefix (Hydragen) sampling vs naive batching", "",
           f"Machine: {info['machine']}, jax {info['jax']}. Command: `{command}`", "",
           f"N = {rows[0]['n']} samples of one prompt, {rows[0]['new_tokens']} new tokens each, "
           "temperature 1, batch decode throughput (prompt prefilled once for both; drop is "
           f"relative to P = {rows[0]['prompt_len']}). attn/matmul = the prompt's attention FLOPs "
           "per decoded token over the weights' FLOPs (~P / 6d): exact attention cannot be "
           "cheaper than this, shared or not.", "",
           "| model | prompt | shared tok/s | drop | naive tok/s | drop | prompt KV shared / naive "
           "(MiB) | attn/matmul FLOPs | prefill (s) |", "|---|---|---|---|---|---|---|---|---|"]
  for r in rows:
    lines.append(
        f"| {r['model']} | {r['prompt_len']} | {r['shared_tok_s']:.0f} | "
        f"{100 * r['shared_drop']:.0f}% | {r['naive_tok_s']:.0f} | {100 * r['naive_drop']:.0f}% "
        f"| {r['prefix_kv_mb_shared']:.0f} / {r['prefix_kv_mb_naive']:.0f} | "
        f"{r['attn_over_matmul_flops']:.2f} | {r['prefill_s']:.1f} |")
  return "\n".join(lines) + "\n"


def main():
  lengths = bench_lib.int_list("lengths", _LENGTHS.value)
  bad = [m for m in _MODELS.value if m not in MODELS]
  if bad:
    raise ValueError(f"--models={bad} unknown; valid: {sorted(MODELS)}")
  for p in lengths:
    if not 2 <= p <= 8192 - _NEW.value:
      raise ValueError(f"--lengths value {p} must be in [2, {8192 - _NEW.value}]")
  for name, flag in (("n", _N), ("max_new_tokens", _NEW), ("repeats", _REPEATS)):
    if flag.value < 1:
      raise ValueError(f"--{name}={flag.value} must be >= 1")
  info = bench_lib.machine_info()
  rows = []
  for name in _MODELS.value:
    rows += bench_model(name, MODELS[name], lengths, _N.value, _NEW.value, _REPEATS.value)
  command = bench_lib.command_line("scripts.bench.shared_prefix", FLAG_NAMES)
  bench_lib.write_results(_OUT.value, {**info, "command": command, "rows": rows},
                          markdown(rows, info, command))


if __name__ == "__main__":
  cli_lib.run(main)

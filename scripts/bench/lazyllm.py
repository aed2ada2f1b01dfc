r"""LazyLLM prefill (progressive prompt-token pruning) vs the dense prefill: wall time.

python -m scripts.bench.lazyllm [--length=2048 --repeats=3]

One prompt of --length random tokens through the "small" preset shape (d=256, 4 layers,
8 heads / 4 kv, ffn 768), random weights (speed does not depend on them). Dense:
`model.apply` with an empty KVCache (the prefill every decoder runs); LazyLLM:
`sparsity.lazyllm.lazy_prefill` into the same cache at each schedule. Both jitted, in one
process, compiled first, then best of --repeats, taking turns (`bench_lib.interleaved`).
"token-layers" is the fraction of (token, layer) rows a schedule computes. Writes
docs/bench_lazyllm.{json,md}.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from absl import flags

import model
from scripts import cli_lib
from scripts.bench import bench_lib
from sparsity.lazyllm import LazyLLM, lazy_prefill

SCHEDULES = {  # name -> (keep, stages); keep = cumulative fraction of the prompt
    "half@2": LazyLLM(keep=(0.5,), stages=(2,)),
    "70/50/40": LazyLLM(keep=(0.7, 0.5, 0.4), stages=(1, 2, 3)),
    "50/30/20": LazyLLM(keep=(0.5, 0.3, 0.2), stages=(1, 2, 3)),
}
_LENGTH = flags.DEFINE_integer("length", 2048, "Prompt length.")
_REPEATS = flags.DEFINE_integer("repeats", 3, "Timed repeats (best kept).")
_OUT = flags.DEFINE_string("out", "docs/bench_lazyllm", "Output path without extension.")
FLAG_NAMES = ("length", "repeats", "out")


def bench(length: int, repeats: int, log=print) -> list[dict]:
  cfg = model.get_preset("small", max_seq_len=length)
  params = model.init(cfg, jax.random.key(0))
  tokens = jnp.asarray(np.random.RandomState(0).randint(0, cfg.vocab_size, (1, length)),
                       jnp.int32)
  cache = model.Decoder(cfg).init_cache(1, length)

  @jax.jit
  def dense(p, tok, c):
    logits, c = model.apply(cfg, p, tok, cache=c)
    return logits[:, -1], c

  methods = {"dense": lambda tok: dense(params, tok, cache)}
  for name, policy in SCHEDULES.items():
    fn = jax.jit(functools.partial(lazy_prefill, cfg, policy=policy))
    methods[name] = functools.partial(lambda f, tok: f(params, tok, cache=cache), fn)
  best, outs = bench_lib.interleaved(methods, [tokens], repeats, log=log)
  rows = []
  for name, seconds in best.items():
    if name == "dense":
      frac, per_layer = 1.0, [length] * cfg.n_layers
    else:
      per_layer = list(outs[name, 0][2].tokens_per_layer)
      frac = sum(per_layer) / (length * cfg.n_layers)
    policy = SCHEDULES.get(name)
    rows.append({"method": name, "keep": None if policy is None else list(policy.keep),
                 "stages": None if policy is None else list(policy.stages),
                 "tokens_per_layer": per_layer, "token_layer_fraction": frac,
                 "prefill_s": seconds[0], "speedup": best["dense"][0] / seconds[0]})
    log(f"{name}: {1e3 * seconds[0]:.0f} ms ({rows[-1]['speedup']:.2f}x)")
  return rows


def markdown(rows: list, info: dict, command: str, length: int) -> str:
  lines = ["# LazyLLM prefill vs dense prefill", "",
           f"Machine: {info['machine']}, jax {info['jax']}, load {info['load_avg_1m']:.1f}. "
           f"Command: `{command}`", "",
           f"\"small\" shape (d=256, 4 layers), one prompt of {length} tokens, random weights; "
           "best of the repeats after compiling, both jitted into an empty KVCache.", "",
           "| method | keep | stages | tokens per layer | token-layers | prefill (ms) | speedup |",
           "|---|---|---|---|---|---|---|"]
  for r in rows:
    keep = "-" if r["keep"] is None else "/".join(f"{k:g}" for k in r["keep"])
    stages = "-" if r["stages"] is None else ",".join(map(str, r["stages"]))
    lines.append(f"| {r['method']} | {keep} | {stages} | "
                 f"{', '.join(map(str, r['tokens_per_layer']))} | "
                 f"{100 * r['token_layer_fraction']:.0f}% | {1e3 * r['prefill_s']:.0f} | "
                 f"{r['speedup']:.2f}x |")
  return "\n".join(lines) + "\n"


def main():
  if not 2 <= _LENGTH.value <= 8192:
    raise ValueError(f"--length={_LENGTH.value} must be in [2, 8192]")
  if _REPEATS.value < 1:
    raise ValueError(f"--repeats={_REPEATS.value} must be >= 1")
  info = bench_lib.machine_info()
  rows = bench(_LENGTH.value, _REPEATS.value)
  command = bench_lib.command_line("scripts.bench.lazyllm", FLAG_NAMES)
  bench_lib.write_results(_OUT.value, {**info, "command": command, "rows": rows},
                          markdown(rows, info, command, _LENGTH.value))


if __name__ == "__main__":
  cli_lib.run(main)

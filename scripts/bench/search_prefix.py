r"""Search candidates sharing the prompt's KV vs re-prefilling it, as the prompt grows.

python -m scripts.bench.search_prefix [--lengths=256,1024,4096 --n=16 --rounds=4]

A step-level search (beam, DVTS, particle filtering) calls `propose` once per step on
N candidates that all continue one prompt. `core.Policy(share_prefix=True)` prefills
the prompt once per problem into a `PrefixCache` that every row and every round
attends to; `share_prefix=False` re-prefills prompt + candidate text for every row in
every call. Both produce the same tokens (greedy rows here: exact equality is
checked). Measured: `rounds` propose calls of `--step_tokens` new tokens on N rows
(a step-level search's propose traffic), and one best-of-N call of `--step_tokens`
x `rounds` tokens. Random weights of the 25M decode-benchmark shape (d=512, 8 layers):
speed does not depend on them. Best of --repeats after a compile run; a fresh
`bind` per repeat, so the shared prefill is paid every time. Writes
docs/bench_search_prefix.{json,md}.
"""

from __future__ import annotations

import jax
import numpy as np
from absl import flags

import model
from decoding.search import core
from decoding.tasks import ARITHMETIC, base
from scripts import cli_lib
from scripts.bench import bench_lib

CFG = model.get_preset("bench-25m", max_seq_len=8192)
_LENGTHS = flags.DEFINE_list("lengths", ["256", "1024", "4096"], "Prompt lengths (bytes).")
_N = flags.DEFINE_integer("n", 16, "Candidates (rows) per call.")
_ROUNDS = flags.DEFINE_integer("rounds", 4, "Step calls per search.")
_STEP = flags.DEFINE_integer("step_tokens", 8, "New tokens per row per step call.")
_REPEATS = flags.DEFINE_integer("repeats", 2, "Timed repeats (best kept).")
_OUT = flags.DEFINE_string("out", "docs/bench_search_prefix", "Output path without extension.")
FLAG_NAMES = ("lengths", "n", "rounds", "step_tokens", "repeats", "out")


def long_problem(length: int) -> base.Problem:
  """An arithmetic problem whose prompt is `length` bytes: solved examples before it."""
  rng = np.random.default_rng(0)
  shots, q = "", ARITHMETIC.problem(9, 0)
  while len(shots) < length - len(q.prompt):
    p = ARITHMETIC.problem(8, int(rng.integers(1 << 30)))
    shots += p.prompt + p.target
  shots = shots[-(length - len(q.prompt)):]
  return base.Problem(task="arithmetic", prompt=shots + q.prompt, target=q.target,
                      answer=q.answer, difficulty=q.difficulty, data=q.data)


def _steps(policy, problem, n: int, rounds: int, step: int):
  propose = policy.bind(problem)
  samples, cost = core.root(n), core.Cost()
  for r in range(rounds):
    samples, c = propose(samples, r, until="end", max_new_tokens=step)
    cost += c
  return samples, cost


def _best_of_n(policy, problem, n: int, tokens: int):
  return policy.bind(problem)(core.root(n), 0, until="end", max_new_tokens=tokens)


def bench(lengths, n: int, rounds: int, step: int, repeats: int, log=print) -> list[dict]:
  params = model.init(CFG, jax.random.key(0))
  decoder = model.Decoder(CFG)
  rows = []
  for length in lengths:
    problem = long_problem(length)
    for name, fn in (("step search", lambda pol: _steps(pol, problem, n, rounds, step)),
                     ("best-of-N", lambda pol: _best_of_n(pol, problem, n, rounds * step))):
      res = {}
      for share in (True, False):
        pol = core.Policy(params, decoder, ARITHMETIC, temperature=0.0, share_prefix=share,
                          max_len=10 * rounds * step)
        fn(pol)  # compile
        res[share] = bench_lib.best_of(lambda pol=pol: fn(pol), repeats)
      (ts, (ss, cs)), (tr, (sr, cr)) = res[True], res[False]
      row = dict(method=name, prompt_len=length, n=n, rounds=rounds if name != "best-of-N"
                 else 1, new_tokens=cs.tokens, shared_s=ts, reprefill_s=tr, speedup=tr / ts,
                 shared_forward_tokens=cs.forward_tokens,
                 reprefill_forward_tokens=cr.forward_tokens,
                 shared_gflops=cs.flops / 1e9, reprefill_gflops=cr.flops / 1e9,
                 same_tokens=[s.text for s in ss] == [s.text for s in sr])
      log(f"{name} P={length}: shared {ts:.2f}s, re-prefill {tr:.2f}s ({row['speedup']:.2f}x), "
          f"same tokens {row['same_tokens']}")
      rows.append(row)
  return rows


def markdown(rows, info, command) -> str:
  r0 = rows[0]
  lines = ["# Search candidates: shared prompt KV vs re-prefilling", "",
           f"Machine: {info['machine']}, jax {info['jax']}. Command: `{command}`", "",
           f"N = {r0['n']} candidates of one prompt, greedy rows, bench-25m random weights. "
           f"'step search' = {r0['rounds']} propose calls of a step each (what beam / DVTS / "
           "particle filtering issue per step); 'best-of-N' = one call to the end. Shared: the "
           "prompt is prefilled once per problem and every row attends to it "
           "(`model.PrefixCache`); re-prefill: every call prefills prompt + candidate text per "
           "row. Forward tokens = positions the policy processed (prefill + decode).", "",
           "| method | prompt | shared (s) | re-prefill (s) | speedup | forward tokens shared / "
           "re-prefill | GFLOPs shared / re-prefill | same tokens |",
           "|---|---|---|---|---|---|---|---|"]
  for r in rows:
    lines.append(f"| {r['method']} | {r['prompt_len']} | {r['shared_s']:.2f} | "
                 f"{r['reprefill_s']:.2f} | {r['speedup']:.2f}x | {r['shared_forward_tokens']:,}"
                 f" / {r['reprefill_forward_tokens']:,} | {r['shared_gflops']:.1f} / "
                 f"{r['reprefill_gflops']:.1f} | {r['same_tokens']} |")
  return "\n".join(lines) + "\n"


def main():
  lengths = bench_lib.int_list("lengths", _LENGTHS.value, minimum=32)
  for name, flag in (("n", _N), ("rounds", _ROUNDS), ("step_tokens", _STEP),
                     ("repeats", _REPEATS)):
    if flag.value < 1:
      raise ValueError(f"--{name}={flag.value} must be >= 1")
  top = CFG.max_seq_len - 10 * _ROUNDS.value * _STEP.value
  if max(lengths) > top:
    raise ValueError(f"--lengths={lengths}: each must be <= {top} (max_seq_len minus the "
                     "candidates' room)")
  info = bench_lib.machine_info()
  rows = bench(lengths, _N.value, _ROUNDS.value, _STEP.value, _REPEATS.value)
  bench_lib.finish("scripts.bench.search_prefix", FLAG_NAMES, _OUT.value, info,
                   lambda command: ({**info, "rows": rows}, markdown(rows, info, command)))


if __name__ == "__main__":
  cli_lib.run(main)

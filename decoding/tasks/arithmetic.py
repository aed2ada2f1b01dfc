"""Multi-step arithmetic with a scratchpad: a chain of operations applied left to right.

  p = ARITHMETIC.problem(seed=0, index=3, difficulty=(2, 3))
  p.prompt == "70*5-72-81="; p.target == "70*5=350,350-72=278,278-81=197;197\\n"
  ARITHMETIC.is_correct(p, model_text)     # the answer after ';' equals p.answer
  ARITHMETIC.step_labels(p, model_text)    # the oracle PRM's per-step labels

Difficulty is (digits, ops): the first operand and every + / - operand has
1..`digits` digits (uniform in 0 .. 10**digits - 1), a * operand is one digit
2..9 (so results stay short), and there are `ops` operations drawn uniformly from
+ - *. The chain is evaluated strictly left to right (no precedence: the
scratchpad writes each intermediate result), so step k is "acc<op>x=result" and
every step is determined by the problem: the oracle labels a step correct iff it
and every step before it equal the reference's. Results may be negative.
"""

from __future__ import annotations

import numpy as np

from decoding.tasks import base

OPS = "+-*"


class Arithmetic(base.Task):
  """Left-to-right chains of + - * with a scratchpad of intermediate results."""

  name = "arithmetic"
  knobs = ("digits", "ops")
  ranges = ((1, 4), (1, 8))
  default_difficulty = (2, 3)

  def make(self, rng: np.random.Generator, difficulty: tuple[int, ...]) -> base.Problem:
    digits, n_ops = difficulty
    first = int(rng.integers(0, 10**digits))
    ops = [OPS[int(i)] for i in rng.integers(0, len(OPS), size=n_ops)]
    operands = [int(rng.integers(2, 10)) if op == "*" else int(rng.integers(0, 10**digits))
                for op in ops]
    return from_chain(first, tuple(zip(ops, operands, strict=True)), difficulty)

  def step_labels(self, problem: base.Problem, text: str) -> list[bool]:
    return base.prefix_labels(base.segments(text), base.segments(problem.target))

  def max_target_len(self, difficulty=None) -> int:
    digits, n_ops = self.check_difficulty(difficulty)
    widest = 10**digits - 1
    bound, steps = widest, 0
    for _ in range(n_ops):  # |acc| grows at most by the widest operand or a factor 9
      nxt = max(bound + widest, bound * 9)
      steps += len(f"-{bound}") + 1 + max(len(str(widest)), 1) + 1 + len(f"-{nxt}")
      bound = nxt
    return steps + (n_ops - 1) + 1 + len(f"-{bound}") + 1


def from_chain(first: int, chain: tuple[tuple[str, int], ...],
               difficulty: tuple[int, ...] | None = None) -> base.Problem:
  """The problem that starts at `first` and applies (op, operand) pairs left to right."""
  if not chain:
    raise ValueError("chain is empty; give at least one (op, operand) pair")
  acc, steps = int(first), []
  for op, x in chain:
    if op not in OPS:
      raise ValueError(f"op={op!r} must be one of {OPS!r}")
    nxt = acc + x if op == "+" else acc - x if op == "-" else acc * x
    steps.append(f"{acc}{op}{x}={nxt}")
    acc = nxt
  prompt = str(first) + "".join(f"{op}{x}" for op, x in chain) + "="
  target = base.STEP_SEP.join(steps) + base.ANSWER_SEP + str(acc) + base.END
  if difficulty is None:
    difficulty = (max(len(str(abs(v))) for v in (first, *(x for _, x in chain))), len(chain))
  return base.Problem(task="arithmetic", prompt=prompt, target=target, answer=str(acc),
                      difficulty=tuple(difficulty), data=(int(first), tuple(chain)))


ARITHMETIC = Arithmetic()

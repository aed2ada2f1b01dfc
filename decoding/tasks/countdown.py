"""Countdown (as in TinyZero / Stream of Search): reach a target from numbers with + - * /.

  p = COUNTDOWN.problem(seed=0, index=3, difficulty=(4, 25))
  p.prompt == "21 25 16 21 to 26:"; p.target == "21-16=5,25/5=5,21+5=26;26\\n"
  COUNTDOWN.is_correct(p, model_text)     # a complete, valid solution reaching the target
  COUNTDOWN.step_labels(p, model_text)    # the oracle PRM's per-step labels
  solvable((21, 25, 16, 21), 26)          # whether any solution exists (exhaustive search)

Difficulty is (numbers, max_value): `numbers` given ints (2..6) drawn uniformly in
1..`max_value` (5..100). The default (3, 25) (2-step references, lines of about 25-40
bytes) is where the small policy `scripts/train_policy.py` trains in minutes is
partially competent (pass@1 0.305 at temperature 1, greedy 0.365, on 200 held-out
problems); at (4, 25) the same policy solves 3% (the usual 3-4 number setups).

Rules: each step "a<op>b=c" combines two items of the pool (a multiset: the given
numbers plus the results of earlier steps, minus the items already consumed), so each
given number and each intermediate result is used at most once; not every number has
to be used. Every result must be a positive integer: subtraction only when a > b,
division only when exact. The last step is followed by ";" and the target, and its
result must be the target. Operands are canonical decimals (digits only, no sign, no
leading zero); + and * accept either operand order.

The reference solution combines all numbers: it repeatedly joins two random pool items
(bigger one written first) with a random legal op whose result is at most CAP (so every
number of the reference is <= CAP), until one item, the target, is left. A target equal
to a given number is redrawn (with the same rng; after MAX_TRIES draws the reference
is the plain sum, which is never a given number), so generation always terminates.

Oracle labels: step i is True iff steps 0..i are legal and a correct completion is
still possible: the step just written is the final one (";target", result == target),
or some further nonempty sequence of legal steps ends with a result equal to the target
(an exhaustive, memoized search over the pool; intermediate values are not capped).
"""

from __future__ import annotations

import collections
import re

import numpy as np

from decoding.tasks import base

OPS = "+-*/"
CAP = 1000  # the largest number (given, intermediate or target) of a reference solution
MAX_TRIES = 64  # reference draws before falling back to the plain sum
_STEP = re.compile(r"([1-9][0-9]*)([-+*/])([1-9][0-9]*)=([1-9][0-9]*)", re.ASCII)


def apply_op(a: int, op: str, b: int) -> int | None:
  """`a op b` if it is a legal step (a positive integer result), else None."""
  if op == "+":
    return a + b
  if op == "*":
    return a * b
  if op == "-":
    return a - b if a > b else None
  if op == "/":
    return a // b if b > 0 and a % b == 0 else None
  raise ValueError(f"op={op!r} must be one of {OPS!r}")


def _results(a: int, b: int):
  """The legal results of combining pool items a and b (either order), with their ops."""
  hi, lo = (a, b) if a >= b else (b, a)
  for op in OPS:
    c = apply_op(hi, op, lo)
    if c is not None:
      yield op, c


def _combinations(pool: tuple[int, ...]):
  """Every (result, rest) of one legal step on a sorted pool; rest is the sorted new pool."""
  n = len(pool)
  seen = set()
  for i in range(n):
    for j in range(i + 1, n):
      if (pool[i], pool[j]) in seen:
        continue
      seen.add((pool[i], pool[j]))
      others = pool[:i] + pool[i + 1:j] + pool[j + 1:]
      for _, c in _results(pool[i], pool[j]):
        yield c, others


def _reachable_by_step(pool: tuple[int, ...], target: int, memo: dict) -> bool:
  """Whether a nonempty sequence of legal steps on `pool` ends with a result == target."""
  if len(pool) < 2:
    return False
  hit = memo.get(pool)
  if hit is None:
    hit = False
    for c, others in _combinations(pool):
      if c == target or _reachable_by_step(tuple(sorted(others + (c,))), target, memo):
        hit = True
        break
    memo[pool] = hit
  return hit


def solvable(numbers, target: int) -> bool:
  """Whether `target` is the value of an expression over some of `numbers` (each used at
  most once, + - * / with every intermediate a positive integer); a lone number counts."""
  pool = tuple(sorted(int(x) for x in numbers))
  target = int(target)
  return target in pool or _reachable_by_step(pool, target, {})


def _draw_reference(rng: np.random.Generator, numbers: list[int]) -> tuple[list[str], int]:
  """One random solution combining all `numbers` (every result <= CAP) and its target."""
  pool, steps = list(numbers), []
  while len(pool) > 1:
    i, j = (int(k) for k in rng.choice(len(pool), size=2, replace=False))
    a, b = max(pool[i], pool[j]), min(pool[i], pool[j])
    ops = [(op, c) for op, c in _results(a, b) if c <= CAP]  # a/b (a == b) or a-b: never empty
    op, c = ops[int(rng.integers(len(ops)))]
    steps.append(f"{a}{op}{b}={c}")
    pool = [x for k, x in enumerate(pool) if k not in (i, j)] + [c]
  return steps, pool[0]


def _sum_reference(numbers: list[int]) -> tuple[list[str], int]:
  acc, steps = numbers[0], []
  for x in numbers[1:]:
    steps.append(f"{max(acc, x)}+{min(acc, x)}={acc + x}")
    acc += x
  return steps, acc


class Countdown(base.Task):
  """Reach a target from given numbers with + - * / (positive integer intermediates)."""

  name = "countdown"
  knobs = ("numbers", "max_value")
  ranges = ((2, 6), (5, 100))
  default_difficulty = (3, 25)

  def make(self, rng: np.random.Generator, difficulty: tuple[int, ...]) -> base.Problem:
    n, max_value = difficulty
    numbers = [int(x) for x in rng.integers(1, max_value + 1, size=n)]
    for _ in range(MAX_TRIES):
      steps, target = _draw_reference(rng, numbers)
      if target not in numbers and target <= CAP:
        break
    else:
      steps, target = _sum_reference(numbers)  # > every given number, <= 6 * 100 <= CAP
    return from_solution(numbers, steps, target, difficulty)

  def step_labels(self, problem: base.Problem, text: str) -> list[bool]:
    numbers, target = problem.data
    pool = collections.Counter(numbers)
    segs = base.segments(text)
    finished = base.is_finished(text)
    memo: dict = {}
    out, ok = [], True
    for i, seg in enumerate(segs):
      final = finished and i == len(segs) - 1
      body, answer = base.split_answer(seg)
      if ok:
        c = _check_step(body, pool)
        if c is None or final != (answer is not None):  # the answer ends exactly the last step
          ok = False
        elif final:
          ok = answer == str(target) and c == target
        else:
          ok = _reachable_by_step(tuple(sorted(pool.elements())), target, memo)
      out.append(ok)
    return out

  def is_correct(self, problem: base.Problem, text: str) -> bool:
    """Whether the finished output is a complete valid solution ending ";target"."""
    if not base.is_finished(text):
      return False
    labels = self.step_labels(problem, text)
    return bool(labels) and all(labels) and self.extract_answer(text) == problem.answer

  def max_target_len(self, difficulty=None) -> int:
    # Each given number is an operand once (<= len(max_value) digits); each of the n - 1
    # results (<= CAP) is written once as a result and, except the last, once as an
    # operand; each step adds an op and "="; steps are joined by n - 2 commas; then ";",
    # the target (<= CAP) and END.
    n, max_value = self.check_difficulty(difficulty)
    k, w = n - 1, len(str(CAP))
    return n * len(str(max_value)) + (2 * k - 1) * w + 2 * k + (k - 1) + 1 + w + 1


def _check_step(body: str, pool: collections.Counter) -> int | None:
  """The result of step `body` if it is well-formed, legal and its operands are in `pool`
  (which it then updates: operands out, result in); None (pool unchanged) otherwise."""
  m = _STEP.fullmatch(body)
  if m is None:
    return None
  a, op, b, c = int(m[1]), m[2], int(m[3]), int(m[4])
  if apply_op(a, op, b) != c:
    return None
  need = collections.Counter((a, b))
  if any(pool[x] < k for x, k in need.items()):
    return None
  pool.subtract(need)
  pool[c] += 1
  return c


def from_solution(numbers, steps, target: int, difficulty: tuple[int, ...] | None = None
                  ) -> base.Problem:
  """The problem of `numbers` and `target` with the reference solution `steps`."""
  numbers = tuple(int(x) for x in numbers)
  target = int(target)
  prompt = " ".join(str(x) for x in numbers) + " to " + str(target) + ":"
  text = base.STEP_SEP.join(steps) + base.ANSWER_SEP + str(target) + base.END
  if difficulty is None:
    difficulty = (len(numbers), max(numbers))
  return base.Problem(task="countdown", prompt=prompt, target=text, answer=str(target),
                      difficulty=tuple(difficulty), data=(numbers, target))


COUNTDOWN = Countdown()

"""Countdown task: reference solutions, the oracle step labels, the solver, bounds, errors;
and the retrieval tasks behind the `base.Task` interface."""

import functools
import itertools
import re

import numpy as np
import pytest

from decoding.tasks import base, retrieval
from decoding.tasks.countdown import CAP, COUNTDOWN, Countdown, from_solution, solvable

DIFFICULTIES = [(2, 5), (3, 10), (4, 25), (5, 50), (6, 100), (2, 100), (6, 5)]


def _combine(x, y):
  """Independent legal results of two values: + *, a - b > 0, exact a / b (either order)."""
  out = {x + y, x * y}
  for a, b in ((x, y), (y, x)):
    if a - b > 0:
      out.add(a - b)
    if a % b == 0:
      out.add(a // b)
  return out


@functools.cache
def _values(items):
  """Every value of an expression tree using each of `items` exactly once."""
  if len(items) == 1:
    return frozenset(items)
  out = set()
  idx = range(len(items))
  for r in range(1, len(items)):
    for left in itertools.combinations(idx, r):
      if 0 not in left:  # each split once
        continue
      lt = tuple(items[i] for i in left)
      rt = tuple(items[i] for i in idx if i not in left)
      for x in _values(lt):
        for y in _values(rt):
          out |= _combine(x, y)
  return frozenset(out)


def _brute(numbers, target, min_leaves=1):
  """Whether some tree over a sub-multiset of >= min_leaves numbers has value `target`."""
  nums = tuple(sorted(numbers))
  return any(target in _values(tuple(nums[i] for i in s))
             for r in range(min_leaves, len(nums) + 1)
             for s in itertools.combinations(range(len(nums)), r))


def _problem(numbers, target):
  return from_solution(numbers, ["1+1=2"], target)  # the reference is irrelevant to labels


@pytest.mark.parametrize("difficulty", DIFFICULTIES)
def test_reference_solutions_are_correct(difficulty):
  n, max_value = difficulty
  for p in COUNTDOWN.problems(0, 60, difficulty):
    numbers, target = p.data
    assert len(numbers) == n and all(1 <= x <= max_value for x in numbers)
    assert p.task == "countdown" and p.difficulty == difficulty and p.answer == str(target)
    assert target not in numbers and 1 <= target <= CAP
    assert p.prompt == " ".join(map(str, numbers)) + f" to {target}:"
    assert "," not in p.prompt and ";" not in p.prompt
    assert p.target.endswith(f";{target}\n")
    steps = base.segments(p.target)
    assert len(steps) == n - 1  # every number combined
    for s in steps:
      a, op, b, c = re.fullmatch(r"(\d+)([-+*/])(\d+)=(\d+)(?:;\d+)?", s).groups()
      assert int(a) >= int(b) and int(c) <= CAP
    labels = COUNTDOWN.step_labels(p, p.target)
    assert labels == [True] * (n - 1)
    assert COUNTDOWN.is_correct(p, p.target)
    assert COUNTDOWN.extract_answer(p.target) == p.answer
    assert solvable(numbers, target)
    assert not COUNTDOWN.is_correct(p, p.target[:-1])  # unfinished


def test_max_target_len_bounds_every_reference():
  for d in DIFFICULTIES + [(6, 99), (4, 9), (3, 100)]:
    bound = COUNTDOWN.max_target_len(d)
    longest = max(len(p.target.encode()) for p in COUNTDOWN.problems(1, 300, d))
    assert longest <= bound, (d, longest, bound)
  assert COUNTDOWN.max_target_len() == COUNTDOWN.max_target_len((3, 25))
  # the worst case the bound assumes: every intermediate and the target has 4 digits
  worst = ",".join(["99+99=1000"] + ["1000+99=1000"] * 4) + ";1000\n"
  assert len(worst) <= COUNTDOWN.max_target_len((6, 99))


NUMS, TARGET = (3, 5, 7, 10), 22  # e.g. 10+7=17,17+5=22


@pytest.mark.parametrize("text,labels", [
    ("10+7=17,17+5=22;22\n", [True, True]),
    ("5+7=12,12+10=22;22\n", [True, True]),  # smaller operand first is fine for + and *
    ("7+5=12,10+12=22;22\n", [True, True]),
    ("10+7=18,18+4=22;22\n", [False, False]),  # wrong arithmetic
    ("10+7=17,10+5=15,15+7=22;22\n", [True, False, False]),  # 10 reused
    ("10+7=17,17+5=22,22/22=1;22\n", [True, False, False]),  # 22 cannot be made again
    ("10+4=14,14+8=22;22\n", [False, False]),  # 4 is not given
    ("10/3=3,3+5=8;22\n", [False, False]),  # inexact division
    ("7/5=1,10+3=13;22\n", [False, False]),
    ("3-5=2,10+7=17;22\n", [False, False]),  # subtraction must be positive
    ("10-10=0,10+7=17;22\n", [False, False]),
    (" 10+7=17,17+5=22;22\n", [False, False]),  # formatting
    ("+10+7=17,17+5=22;22\n", [False, False]),
    ("010+7=17,17+5=22;22\n", [False, False]),
    ("10+7=17 ,17+5=22;22\n", [False, False]),
    ("10+7=17,17+5=22;23\n", [True, False]),  # wrong answer
    ("10+7=17;22\n", [False]),  # answer is not the step's result
    ("10+7=17,17+5=22\n", [True, False]),  # finished without an answer
    ("10+7=17;17,17+5=22;22\n", [False, False]),  # answer before the last step
    (";22\n", [False]),  # empty step
    ("\n", [False]),
    ("10+7=17,,17+5=22;22\n", [True, False, False]),
    ("10+7=17,17+5=22;22", [True]),  # unfinished: only complete steps are labeled
    ("10+7=17,17+5=22,", [True, False]),  # 22 cannot be derived again from {3, 22}
    ("10+7=17,17+5", [True]),
    ("10+7=1", []),
    ("", []),
])
def test_hand_written_labels(text, labels):
  p = _problem(NUMS, TARGET)
  got = COUNTDOWN.step_labels(p, text)
  assert got == labels, text
  assert len(got) == len(base.segments(text))
  assert COUNTDOWN.is_correct(p, text) == (base.is_finished(text) and bool(got) and all(got))


@pytest.mark.parametrize("text,labels", [
    ("3-2=1,6*4=24,24*1=24;24\n", [True, True, True]),
    ("3-2=1,6*4=24,24/1=24,", [True, True, False]),  # no second 24 can follow from {24}
    ("3-2=1,6*4=24,6*1=6,", [True, True, False]),  # 6 was consumed
    ("3-2=1,4*6=24,1*24=24;24\n", [True, True, True]),
    ("4*3=12,6*2=12,12+12=24;24\n", [True, True, True]),  # a multiset: two 12s
    ("4*3=12,12+6=18,12+12=24;24\n", [True, False, False]),  # dead end, then a reused 12
    ("6-2=4,4*4=16,16+3=19;24\n", [True, False, False]),  # dead end: {3, 16}
    ("6/3=2,2*2=4,4*6=24;24\n", [False, False, False]),  # {2, 2, 4} cannot make 24
])
def test_hand_written_labels_pool(text, labels):
  p = _problem((2, 3, 4, 6), 24)
  assert COUNTDOWN.step_labels(p, text) == labels, text
  assert COUNTDOWN.is_correct(p, text) == (base.is_finished(text) and all(labels))


def test_target_in_pool_needs_a_step_that_produces_it():
  p = _problem((3, 4, 10), 7)
  assert COUNTDOWN.step_labels(p, "4+3=7;7\n") == [True]
  assert COUNTDOWN.step_labels(p, "4+3=7,") == [False]  # 7 cannot be made again from {7, 10}
  q = _problem((3, 4, 1), 7)
  assert COUNTDOWN.step_labels(q, "4+3=7,7*1=7;7\n") == [True, True]
  assert COUNTDOWN.is_correct(q, "4+3=7,7*1=7;7\n")
  assert not COUNTDOWN.is_correct(q, ";7\n")
  assert solvable((3, 7), 7) and not solvable((3, 4), 8)


def test_dead_end_steps_are_false_and_so_is_everything_after():
  found = 0
  for p in COUNTDOWN.problems(2, 40, (4, 10)):
    numbers, target = p.data
    for i, j in itertools.combinations(range(4), 2):
      a, b = max(numbers[i], numbers[j]), min(numbers[i], numbers[j])
      rest = [x for k, x in enumerate(numbers) if k not in (i, j)]
      for op, c in (("+", a + b), ("*", a * b), ("-", a - b), ("/", a // b)):
        if c <= 0 or (op == "/" and a % b) or c == target:
          continue
        step = f"{a}{op}{b}={c}"
        alive = _brute(rest + [c], target, min_leaves=2)
        assert COUNTDOWN.step_labels(p, step + ",") == [alive], (numbers, target, step)
        if not alive:
          found += 1
          # any continuation, even arithmetically valid, stays False
          more = f"{step},{max(rest)}+{min(rest)}={sum(rest)},x;{target}\n"
          assert COUNTDOWN.step_labels(p, more) == [False, False, False]
          assert not COUNTDOWN.is_correct(p, more)
  assert found > 20


def test_solvable_agrees_with_brute_force():
  rng = np.random.default_rng(0)
  hits = 0
  for _ in range(400):
    n = int(rng.integers(1, 5))
    numbers = [int(x) for x in rng.integers(1, 13, size=n)]
    target = int(rng.integers(1, 80))
    want = _brute(numbers, target)
    assert solvable(numbers, target) == want, (numbers, target)
    hits += want
  assert 50 < hits < 350  # both outcomes exercised


def test_problems_are_deterministic_and_distinct():
  assert COUNTDOWN.problem(3, 7) == COUNTDOWN.problem(3, 7) == Countdown().problem(3, 7)
  many = COUNTDOWN.problems(3, 40)
  assert len({p.prompt for p in many}) >= 38
  assert [p.prompt for p in COUNTDOWN.problems(4, 40)] != [p.prompt for p in many]
  assert COUNTDOWN.problem(3, 7, (3, 25)) == COUNTDOWN.problem(3, 7)
  assert COUNTDOWN.problem(3, 7, (5, 25)) != COUNTDOWN.problem(3, 7)
  text = COUNTDOWN.corpus_text(0, 6, [(3, 10), (4, 25)])
  assert text.count("\n") == 6 and text.count(" to ") == 6


@pytest.mark.parametrize("bad", [(1, 25), (7, 25), (4, 4), (4, 101), (4,), (4, 25, 1), 4, "4",
                                 (4.0, 25), (True, 25)])
def test_bad_difficulty_raises(bad):
  with pytest.raises(ValueError, match="difficulty"):
    COUNTDOWN.problem(0, 0, bad)
  with pytest.raises(ValueError, match="difficulty"):
    COUNTDOWN.max_target_len(bad)


@pytest.mark.parametrize("task,kind", [(retrieval.PASSKEY, "passkey"),
                                       (retrieval.KV_RETRIEVAL, "kv")])
def test_retrieval_task_matches_the_module(task, kind):
  for context_len in (retrieval.MIN_CONTEXT, 512, 1000):
    for index in range(5):
      p = task.problem(2, index, context_len)
      q = retrieval.problem(kind, 2, context_len, index)
      assert (p.prompt, p.answer, p.target) == (q.prompt, q.answer, q.answer + "\n")
      assert p.task == task.name and p.difficulty == (context_len,)
      assert len(p.target) <= task.max_target_len(context_len)
      assert task.is_correct(p, p.target) and task.step_labels(p, p.target) == [True]
      assert task.extract_answer(p.target) == p.answer
      assert task.extract_answer(" " + p.answer + " \nmore") == p.answer
      wrong = ("0" if p.answer[0] != "0" else "1") + p.answer[1:] + "\n"
      assert not task.is_correct(p, wrong) and task.step_labels(p, wrong) == [False]
      assert task.step_labels(p, p.answer[:2]) == [] and task.extract_answer(p.answer) is None
  assert task.problem(2, 3) == task.problem(2, 3, 512)
  assert task.make(np.random.default_rng(0), (512,)).prompt == task.make(
      np.random.default_rng(0), (512,)).prompt
  with pytest.raises(ValueError, match="difficulty"):
    task.problem(0, 0, retrieval.MIN_CONTEXT - 1)
  with pytest.raises(ValueError):
    retrieval.RetrievalTask("kv")

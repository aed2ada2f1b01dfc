"""The verifiable-task interface every search method and reward model uses.

A solution is one line of bytes: steps separated by STEP_SEP, then ANSWER_SEP, the
answer and END, e.g. arithmetic "23+45=68,68*2=136;136\\n". `segments(text)` cuts a
(partial) output into its complete steps: every piece ended by STEP_SEP, and the
last piece (which holds ";answer") once END is written. A step-wise proposer
generates until STEP_SEP or END, so one call adds exactly one step.

A task answers, for any text: the extracted answer, whether it is correct, and the
oracle per-step labels (`step_labels`: step i is correct iff steps 0..i keep a
correct solution reachable), which is what the oracle process reward model reports.
Problems are functions of (seed, index, difficulty): training corpora and
evaluation splits come from different seeds.
"""

from __future__ import annotations

import abc
import dataclasses
from collections.abc import Sequence

import numpy as np

from model.tokenizer import ByteTokenizer

STEP_SEP, ANSWER_SEP, END = ",", ";", "\n"


@dataclasses.dataclass(frozen=True)
class Problem:
  """One task instance. `target` is a reference solution (steps; answer; END)."""

  task: str
  prompt: str
  target: str
  answer: str
  difficulty: tuple[int, ...]
  data: tuple = ()  # the task's parameters (operands, numbers ...), hashable


def first_line(text: str) -> str:
  """The output up to (not including) its first END: what the model answered."""
  return text.split(END, 1)[0]


def is_finished(text: str) -> bool:
  """Whether the output has ended (an END was generated)."""
  return END in text


def segments(text: str) -> list[str]:
  """The complete steps of a (partial) output, separators dropped.

  "a,b," -> ["a", "b"]; "a,b" -> ["a"] (b is unfinished); "a,b;7\\n" -> ["a", "b;7"].
  """
  line = first_line(text)
  parts = line.split(STEP_SEP)
  return parts if is_finished(text) else parts[:-1]


def split_answer(step: str) -> tuple[str, str | None]:
  """A final step "x;7" -> ("x", "7"); a step without ANSWER_SEP -> (step, None)."""
  if ANSWER_SEP not in step:
    return step, None
  body, answer = step.rsplit(ANSWER_SEP, 1)
  return body, answer


def extract_answer(text: str) -> str | None:
  """What follows the last ANSWER_SEP of a finished first line ("1+2=3;3\\n" -> "3"), or None
  (unfinished, no ANSWER_SEP, or nothing after it)."""
  if not is_finished(text):
    return None
  steps = segments(text)
  answer = split_answer(steps[-1])[1] if steps else None
  return answer or None


def check_int(value, name: str, lo: int, hi: int) -> int:
  if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or not lo <= value <= hi:
    raise ValueError(f"{name}={value!r} must be an int in {lo}..{hi}")
  return int(value)


class Task(abc.ABC):
  """A seeded problem generator with an exact verifier and step segmentation."""

  name: str
  knobs: tuple[str, ...]  # names of the difficulty knobs, e.g. ("digits", "ops")
  ranges: tuple[tuple[int, int], ...]  # each knob's inclusive range
  default_difficulty: tuple[int, ...]

  def check_difficulty(self, difficulty=None) -> tuple[int, ...]:
    """`difficulty` (None = the default; an int for one-knob tasks) as a checked tuple."""
    if difficulty is None:
      return self.default_difficulty
    if isinstance(difficulty, (int, np.integer)) and not isinstance(difficulty, bool):
      difficulty = (difficulty,)
    if isinstance(difficulty, (str, bytes)) or not isinstance(difficulty, Sequence) or len(
        difficulty) != len(self.knobs):
      raise ValueError(f"difficulty={difficulty!r} for task {self.name!r} must be "
                       f"{len(self.knobs)} ints ({', '.join(self.knobs)})")
    return tuple(check_int(v, f"difficulty.{k}", lo, hi)
                 for v, k, (lo, hi) in zip(difficulty, self.knobs, self.ranges, strict=True))

  @abc.abstractmethod
  def make(self, rng: np.random.Generator, difficulty: tuple[int, ...]) -> Problem:
    """A problem of a checked `difficulty` drawn from `rng`."""

  def problem(self, seed: int, index: int, difficulty=None) -> Problem:
    """Problem `index` under `seed` (independent of every other index)."""
    d = self.check_difficulty(difficulty)
    for name, v in (("seed", seed), ("index", index)):
      if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 0:
        raise ValueError(f"{name}={v!r} must be an int >= 0")
    salt = sum(ord(c) for c in self.name)
    return self.make(np.random.default_rng([int(seed), salt, *d, int(index)]), d)

  def problems(self, seed: int, n: int, difficulty=None, start: int = 0) -> list[Problem]:
    """Problems `start .. start + n - 1` under `seed`."""
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1:
      raise ValueError(f"n={n!r} must be an int >= 1")
    return [self.problem(seed, start + i, difficulty) for i in range(n)]

  def extract_answer(self, text: str) -> str | None:
    """The answer after the last ANSWER_SEP of a finished first line, or None."""
    return extract_answer(text)

  @abc.abstractmethod
  def step_labels(self, problem: Problem, text: str) -> list[bool]:
    """Oracle labels of `segments(text)`: True while steps 0..i keep a correct solution
    reachable (once False, every later label is False)."""

  def is_correct(self, problem: Problem, text: str) -> bool:
    """The exact outcome verifier: the finished output's answer equals the problem's."""
    return self.extract_answer(text) == problem.answer

  def prompt_tokens(self, problem: Problem) -> list[int]:
    """The token ids a policy is given: BOS, then the prompt's bytes."""
    return ByteTokenizer().encode(problem.prompt, add_bos=True)

  def corpus_text(self, seed: int, n: int, difficulties: Sequence) -> str:
    """Training text: `n` problems (prompt + target per line), difficulties in turn."""
    ds = [self.check_difficulty(d) for d in difficulties]
    if not ds:
      raise ValueError("difficulties is empty; give at least one")
    return "".join(p.prompt + p.target for p in (
        self.problem(seed, i // len(ds), ds[i % len(ds)]) for i in range(n)))

  @abc.abstractmethod
  def max_target_len(self, difficulty=None) -> int:
    """The longest reference solution (bytes, END included) at `difficulty`."""


def prefix_labels(steps: Sequence[str], reference: Sequence[str]) -> list[bool]:
  """Labels of steps compared one by one with a unique reference: True while equal."""
  out, ok = [], True
  for i, s in enumerate(steps):
    ok = ok and i < len(reference) and s == reference[i]
    out.append(ok)
  return out

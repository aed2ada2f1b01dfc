"""Pure-python stand-ins for a policy and a PRM, for testing search methods without a model.

  task = FakeTask(depth=3)                      # reference: 3 seeded digits, "4,7,1;471\\n"
  problem = task.problem(0, 0)
  propose = FakePropose(problem, p_correct=0.5)  # writes the reference digit w.p. p_correct
  score = FakeScore(task, problem)               # oracle step labels as 1.0 / 0.0

Tokens are characters. Every random choice is a function of (seed, key, row, prefix text)
through a stable hash, so repeated runs are identical and rows are independent. The fakes
count what they did (`calls`, `rows`, `tokens`, `passes`) so tests can check a method's
`Cost` against them.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence

import jax
import numpy as np

from decoding.cost import Cost
from decoding.search import core
from decoding.tasks import base


class FakeTask(base.Task):
  """`depth` reference digits from `digits`; one digit per step, the answer their string."""

  name = "fake"
  knobs = ("depth",)
  ranges = ((1, 8),)

  def __init__(self, depth: int = 3, digits: str = "0123456789"):
    if len(digits) < 2 or len(set(digits)) != len(digits) or any(
        c in digits for c in (base.STEP_SEP, base.ANSWER_SEP, base.END)):
      raise ValueError(f"digits={digits!r} must be >= 2 distinct non-separator characters")
    self.digits = digits
    self.default_difficulty = (base.check_int(depth, "depth", *self.ranges[0]),)

  def make(self, rng: np.random.Generator, difficulty: tuple[int, ...]) -> base.Problem:
    (depth,) = difficulty
    ref = "".join(self.digits[int(i)] for i in rng.integers(0, len(self.digits), size=depth))
    target = base.STEP_SEP.join(ref) + base.ANSWER_SEP + ref + base.END
    return base.Problem(task=self.name, prompt="fake:", target=target, answer=ref,
                        difficulty=difficulty, data=(self.digits, ref))

  def step_labels(self, problem: base.Problem, text: str) -> list[bool]:
    return base.prefix_labels(base.segments(text), base.segments(problem.target))

  def max_target_len(self, difficulty=None) -> int:
    (depth,) = self.check_difficulty(difficulty)
    return 3 * depth + 1


def _rng(*parts) -> np.random.Generator:
  """A generator seeded by a stable hash of `parts` (str() of each)."""
  h = hashlib.sha256("|".join(str(p) for p in parts).encode()).digest()
  return np.random.default_rng(int.from_bytes(h[:8], "little"))


def key_id(key) -> str:
  """A stable string for an int seed or a jax key (an int seed n means jax.random.key(n))."""
  return np.asarray(jax.random.key_data(core.as_key(key))).tobytes().hex()


class FakePropose:
  """A policy over a FakeTask problem that writes the reference digit w.p. `p_correct`.

  Otherwise it writes a uniformly random other digit. Each step is the digit then
  STEP_SEP; the last step is the digit, ANSWER_SEP, the digits written so far and END.
  The digit's token carries the log-probability of the choice; separators and the
  answer copy are deterministic (logprob 0). A row truncated by `max_new_tokens` is
  resumed deterministically from its partial step by the next call.

  Cost per call with live rows: tokens = characters generated, forward_passes = 1 + the
  longest row extension (one prefill, one pass per token of a batched decode),
  forward_tokens = the live rows' prompt + text lengths (prefill) + rows * longest
  extension. `per_call_passes` lists every call's forward passes.
  """

  def __init__(self, problem: base.Problem, p_correct: float = 0.5, seed: int = 0):
    if not 0.0 <= p_correct <= 1.0:
      raise ValueError(f"p_correct={p_correct!r} must be in [0, 1]")
    self.problem, self.p_correct, self.seed = problem, float(p_correct), seed
    self.digits, self.ref = problem.data
    self.max_len = 3 * len(self.ref) + 1
    self.calls = self.rows = self.tokens = self.passes = self.occurrence = 0
    self.per_call_passes: list[int] = []

  def overhead_passes(self) -> int:
    return 1

  def _choose(self, j: int, rng: np.random.Generator) -> tuple[str, float]:
    """Step j's digit and its logprob (`self.occurrence`: earlier rows of this call with
    the same text, for subclasses that enumerate)."""
    if rng.random() < self.p_correct:
      return self.ref[j], math.log(self.p_correct)
    others = [d for d in self.digits if d != self.ref[j]]
    return others[int(rng.integers(len(others)))], math.log(
        (1.0 - self.p_correct) / len(others))

  def _continue(self, text: str, rng: np.random.Generator, until: str
                ) -> tuple[str, list[float]]:
    """The continuation of `text` (one step or to the end) and each character's logprob."""
    out, lps = "", []
    while True:
      cur = text + out
      if base.is_finished(cur):
        return out, lps
      done = base.segments(cur)
      partial = base.first_line(cur)[len(base.STEP_SEP.join(done)) + bool(done):]
      j = len(done)
      if not partial:
        digit, lp = self._choose(j, rng)
        partial_new = digit
      else:
        digit, partial_new, lp = partial[0], "", 0.0
      written = "".join(s[0] for s in done) + digit
      full = digit + (base.ANSWER_SEP + written + base.END if j == len(self.ref) - 1
                      else base.STEP_SEP)
      piece = partial_new + full[len(partial) + len(partial_new):]
      out += piece
      lps += [lp] + [0.0] * (len(piece) - 1)
      if until == "step":
        return out, lps

  def __call__(self, samples: Sequence[core.Sample], key, *, until: str = "end",
               max_new_tokens: int | None = None) -> tuple[list[core.Sample], Cost]:
    if until not in core.UNTIL:
      raise ValueError(f"until={until!r} must be one of {core.UNTIL}")
    self.calls += 1
    kid = key_id(key)
    out, longest, n_new, prefill, live = list(samples), 0, 0, 0, 0
    seen: dict[str, int] = {}
    for i, s in enumerate(samples):
      if s.finished:
        continue
      self.occurrence = seen.get(s.text, 0)
      seen[s.text] = self.occurrence + 1
      ext, lps = self._continue(s.text, _rng(self.seed, kid, i, s.text), until)
      if max_new_tokens is not None:
        ext, lps = ext[:max_new_tokens], lps[:max_new_tokens]
      lp = float(sum(lps))
      text = s.text + ext
      done = base.is_finished(text) or len(text) >= self.max_len
      out[i] = core.Sample(text=text, tokens=s.tokens + len(ext), logprob=s.logprob + lp,
                           finished=done)
      live += 1
      n_new += len(ext)
      longest = max(longest, len(ext))
      prefill += len(self.problem.prompt) + len(s.text)
    if not live:
      return out, Cost()
    passes = 1 + longest
    self.rows += live
    self.tokens += n_new
    self.passes += passes
    self.per_call_passes.append(passes)
    return out, Cost(tokens=n_new, forward_passes=passes,
                     forward_tokens=prefill + live * longest)


class FakeScore:
  """The oracle PRM of a FakeTask problem: step labels as 1.0 / 0.0, each flipped w.p.
  `noise` (a function of (seed, the text up to that step)). One reward call per sample."""

  def __init__(self, task: base.Task, problem: base.Problem, noise: float = 0.0, seed: int = 0):
    if not 0.0 <= noise <= 1.0:
      raise ValueError(f"noise={noise!r} must be in [0, 1]")
    self.task, self.problem, self.noise, self.seed = task, problem, float(noise), seed
    self.calls = 0

  def __call__(self, samples: Sequence[core.Sample]) -> tuple[list[list[float]], Cost]:
    self.calls += len(samples)
    out = []
    for s in samples:
      labels = self.task.step_labels(self.problem, s.text)
      steps = base.segments(s.text)
      row = []
      for i, ok in enumerate(labels):
        prefix = base.STEP_SEP.join(steps[: i + 1])
        flip = self.noise > 0 and _rng(self.seed, "score", prefix).random() < self.noise
        row.append(float(ok != flip))
      out.append(row)
    return out, Cost(reward_calls=len(samples))

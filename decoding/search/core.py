"""The pieces every search method is built from: candidates, `propose`, `score`, budgets.

  policy = Policy(params, model.Decoder(cfg), ARITHMETIC, temperature=1.0)
  propose = policy.bind(problem)            # (samples, key, until=) -> (samples, Cost)
  score = OraclePRM(ARITHMETIC).bind(problem)  # samples -> (per-step scores, Cost)
  result = best_of_n(propose, score, Budget(16), key=0)

A `Sample` is one candidate: the text generated after the prompt so far and what
it cost. `propose(samples, key, until="step" | "end", max_new_tokens=None)` returns
one extension per input row: up to the next step separator (STEP_SEP or END) or to
the end of the solution; finished rows come back unchanged and cost nothing. To
branch a prefix n ways, pass it n times. Row i uses `fold_in(key, i)`, so a row's
result never depends on the other rows. `score(samples)` returns one list of
per-step scores in [0, 1] per sample (`segments` of its text) and counts one
reward call per sample.

A `Budget` is the method's width `n` (samples, particles or beams) plus optional
hard caps on generated tokens, forward passes and reward calls. A `Meter` adds up
the cost of every call and answers how much room is left; methods stop (and
return their best finished candidate so far) rather than exceed a cap, so
`result.cost` never exceeds the budget.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Sequence
from typing import Protocol

import jax
import jax.numpy as jnp
import numpy as np

from decoding import shared_prefix
from decoding.cost import Cost
from decoding.generate import Finish, generate
from decoding.sampling import Sampler
from decoding.tasks import base
from model.kv_cache import PrefixCache

UNTIL = ("step", "end")


@dataclasses.dataclass(frozen=True)
class Sample:
  """A candidate solution: the text after the prompt so far and its policy statistics."""

  text: str = ""
  tokens: int = 0  # tokens generated for `text`
  logprob: float = 0.0  # sum of log p(token) under the (unprocessed) policy
  finished: bool = False  # END generated, or the length limit reached

  @property
  def steps(self) -> list[str]:
    return base.segments(self.text)

  @property
  def mean_logprob(self) -> float:
    return self.logprob / max(self.tokens, 1)


class Propose(Protocol):
  def __call__(self, samples: Sequence[Sample], key, *, until: str = "end",
               max_new_tokens: int | None = None) -> tuple[list[Sample], Cost]: ...


class Score(Protocol):
  def __call__(self, samples: Sequence[Sample]) -> tuple[list[list[float]], Cost]: ...


@dataclasses.dataclass(frozen=True)
class Budget:
  """A method's width `n` and optional hard caps (None = uncapped)."""

  n: int
  max_tokens: int | None = None
  max_forward_passes: int | None = None
  max_reward_calls: int | None = None

  def __post_init__(self):
    if isinstance(self.n, bool) or not isinstance(self.n, (int, np.integer)) or self.n < 1:
      raise ValueError(f"budget n={self.n!r} must be an int >= 1 (at least one sample)")
    for f in ("max_tokens", "max_forward_passes", "max_reward_calls"):
      v = getattr(self, f)
      if v is not None and (isinstance(v, bool) or not isinstance(v, (int, np.integer))
                            or v < 1):
        raise ValueError(f"budget {f}={v!r} must be None or an int >= 1")


def as_budget(budget) -> Budget:
  """A Budget, or an int n (a budget of n samples and no caps)."""
  if isinstance(budget, Budget):
    return budget
  if isinstance(budget, bool) or not isinstance(budget, (int, np.integer)):
    raise ValueError(f"budget={budget!r} must be a Budget or an int >= 1 (samples)")
  return Budget(int(budget))


@dataclasses.dataclass(frozen=True)
class SearchResult:
  """A method's answer, the chosen candidate, every final candidate and the total cost."""

  answer: str | None
  sample: Sample | None  # the chosen candidate (None if nothing finished)
  cost: Cost
  candidates: tuple[Sample, ...] = ()
  info: dict = dataclasses.field(default_factory=dict)

  @property
  def text(self) -> str:
    return "" if self.sample is None else self.sample.text


class Meter:
  """Adds up a search's cost against its budget; answers the room left per cap."""

  def __init__(self, budget: Budget):
    self.budget = budget
    self.cost = Cost()
    self.t0 = time.perf_counter()

  def add(self, cost: Cost) -> None:
    self.cost = self.cost + cost.replace(wall_time_s=0.0)

  def total(self) -> Cost:
    return self.cost.replace(wall_time_s=time.perf_counter() - self.t0)

  def tokens_per_row(self, rows: int, want: int | None, overhead: int = 1) -> int | None:
    """The per-row max_new_tokens a call over `rows` rows may use without passing a cap
    (`want` None = no own limit), given the proposer's `overhead` forward passes per
    call; None if uncapped and no `want`; 0 if no room."""
    room = want
    b = self.budget
    if b.max_tokens is not None:
      left = (b.max_tokens - self.cost.tokens) // max(rows, 1)
      room = left if room is None else min(room, left)
    if b.max_forward_passes is not None:
      left = b.max_forward_passes - self.cost.forward_passes - overhead
      room = left if room is None else min(room, left)
    return None if room is None else max(room, 0)

  def reward_room(self) -> int | None:
    b = self.budget
    return None if b.max_reward_calls is None else max(
        b.max_reward_calls - self.cost.reward_calls, 0)


def call_propose(propose: Propose, meter: Meter, samples: Sequence[Sample], key, *,
                 until: str, max_new_tokens: int | None = None, **options
                 ) -> list[Sample] | None:
  """`propose` under the meter's caps; None (nothing spent) when the caps leave no room."""
  rows = sum(not s.finished for s in samples)
  if not rows:
    return list(samples)
  overhead = getattr(propose, "overhead_passes", lambda: 1)()
  m = meter.tokens_per_row(rows, max_new_tokens, overhead)
  if m == 0:
    return None
  out, cost = propose(samples, key, until=until, max_new_tokens=m, **options)
  meter.add(cost)
  return out


def call_score(score: Score, meter: Meter, samples: Sequence[Sample]
               ) -> list[list[float]] | None:
  """`score` under the reward-call cap; None (nothing spent) when it leaves no room."""
  room = meter.reward_room()
  if not samples:
    return []
  if room is not None and room < len(samples):
    return None
  scores, cost = score(samples)
  meter.add(cost)
  return scores


def aggregate(step_scores: Sequence[float], how: str = "last") -> float:
  """One score from per-step PRM scores: "last", "min" or "prod" (0 for no steps)."""
  if how not in AGGREGATES:
    raise ValueError(f"aggregate={how!r} must be one of {AGGREGATES}")
  if not len(step_scores):
    return 0.0
  s = np.asarray(step_scores, np.float64)
  return float(s[-1] if how == "last" else s.min() if how == "min" else s.prod())


AGGREGATES = ("last", "min", "prod")


def as_key(key) -> jax.Array:
  """A PRNG key from a key or an int seed."""
  if isinstance(key, (int, np.integer)) and not isinstance(key, bool):
    return jax.random.key(int(key))
  return key


def fold(key, i: int) -> jax.Array:
  return jax.random.fold_in(as_key(key), i)


_END_ID, _SEP_ID = ord(base.END), ord(base.STEP_SEP)


def _text(ids) -> str:
  """Byte ids as text, one character per byte (latin-1), so a candidate's text re-encodes
  to exactly the tokens generated (invalid UTF-8 included); special ids are dropped."""
  return bytes(int(i) for i in ids if 0 <= int(i) < 256).decode("latin-1")


def _bucket_rows(n: int) -> int:
  return 1 << max(0, n - 1).bit_length()


@dataclasses.dataclass(frozen=True)
class Policy:
  """A sparq model as a proposer: `bind(problem)` gives the problem's `propose`.

  Sampling is temperature / top-k / top-p as `decoding.sampling`; `max_len` caps a
  candidate's text (default: twice the task's longest reference solution), after
  which it counts as finished (and wrong unless it ended). `share_prefix` keeps
  one prefilled KV of the prompt per problem that every row attends to
  (`model.PrefixCache`); False re-prefills the whole prompt in every call.
  Rows are padded to a power of two (fewer compilations); the padding rows'
  compute is in the FLOPs / bytes, never in `tokens`.
  """

  params: object
  decoder: object  # a model.Decoder
  task: base.Task
  temperature: float = 1.0
  top_k: int = 0
  top_p: float = 1.0
  max_len: int | None = None
  share_prefix: bool = True

  def bind(self, problem: base.Problem) -> PolicyPropose:
    return PolicyPropose(self, problem)

  def sampler(self, rows: int) -> Sampler:
    return Sampler.create(rows, temperature=self.temperature, top_k=self.top_k,
                          top_p=self.top_p)


class PolicyPropose:
  """`Policy.bind(problem)`: the model extending candidates of one problem."""

  def __init__(self, policy: Policy, problem: base.Problem):
    self.policy, self.problem = policy, problem
    self.prompt = policy.task.prompt_tokens(problem)
    self.max_len = policy.max_len or 2 * policy.task.max_target_len(problem.difficulty)
    self._prefix = None  # (prefix cache, last prompt token), made on the first call
    self.vocab_size = policy.decoder.vocab_size
    self.answer = lambda text: policy.task.extract_answer(text)

  def overhead_passes(self) -> int:
    """Forward passes a call spends beyond one per generated token: the suffix prefill,
    plus the prompt's prefill on the first shared-prefix call."""
    return 1 + (self.policy.share_prefix and self._prefix is None)

  supports_stop_after = True  # first-finish decodes in one call (generate's stop_after)

  def __call__(self, samples: Sequence[Sample], key, *, until: str = "end",
               max_new_tokens: int | None = None, stop_after: int | None = None
               ) -> tuple[list[Sample], Cost]:
    """One extension per row; `stop_after=m`: the call ends once m of its rows have stopped
    (the others come back cut off, unfinished); rows are then not padded."""
    if until not in UNTIL:
      raise ValueError(f"until={until!r} must be one of {UNTIL}")
    pol = self.policy
    t0 = time.perf_counter()
    live = [i for i, s in enumerate(samples) if not s.finished]
    out = list(samples)
    if not live:
      return out, Cost()
    room = min(self.max_len - samples[i].tokens for i in live)
    m = max(1, room if max_new_tokens is None else min(room, max_new_tokens))
    cost = Cost()
    texts = [list(samples[i].text.encode("latin-1")) for i in live]
    if pol.share_prefix:
      if self._prefix is None:
        cache, last, c = shared_prefix.prefill_prefix(pol.decoder.cfg, pol.params, self.prompt)
        self._prefix = (cache, last)
        cost += c
      prefix, last = self._prefix
      rows = [[last, *t] for t in texts]
      cache = lambda b, n: PrefixCache(prefix=prefix, suffix=pol.decoder.init_cache(b, n))
    else:
      rows = [[*self.prompt, *t] for t in texts]
      cache = None
    b = len(rows) if stop_after is not None else _bucket_rows(len(rows))
    rows = rows + [rows[0]] * (b - len(rows))
    keys = jnp.stack([fold(key, i) for i in live] + [fold(key, 0)] * (b - len(live)))
    res = generate(pol.params, rows, pol.decoder, sampler=pol.sampler(b), max_new_tokens=m,
                   cache=cache, key=keys, eos_id=_END_ID, stop_after=stop_after,
                   stop_sequences=[[_SEP_ID]] if until == "step" else ())
    toks, lps = np.asarray(res.tokens), np.asarray(res.logprobs)
    lens, reasons = np.asarray(res.lengths), np.asarray(res.finish_reason)
    n_new = 0
    for r, i in enumerate(live):
      s, n = samples[i], int(lens[r])
      n_new += n
      total = s.tokens + n
      done = reasons[r] == Finish.EOS or total >= self.max_len
      out[i] = Sample(text=s.text + _text(toks[r, :n]), tokens=total,
                      logprob=s.logprob + float(lps[r, :n].sum()), finished=bool(done))
    cost += res.cost.replace(tokens=n_new)
    return out, cost.replace(wall_time_s=time.perf_counter() - t0)


answer_of = base.extract_answer  # the default answer extractor


def answer_fn_for(propose, answer_fn=None):
  """`answer_fn`, else the bound task's extractor (`propose.answer`), else `answer_of`."""
  return answer_fn or getattr(propose, "answer", None) or answer_of


def check_vocab_sizes(propose_vocab: int | None, score_vocab: int | None) -> None:
  """ValueError when a policy and a reward model read different vocabularies (None = any)."""
  if propose_vocab is not None and score_vocab is not None and propose_vocab != score_vocab:
    raise ValueError(f"reward model vocab_size={score_vocab} differs from the policy's "
                     f"vocab_size={propose_vocab}; they must share one tokenizer")


def check_vocab(propose, score) -> None:
  """`check_vocab_sizes` of the proposer's and the scorer's `vocab_size` attributes (a
  search method's first check, before any compute)."""
  check_vocab_sizes(getattr(propose, "vocab_size", None), getattr(score, "vocab_size", None))


def root(n: int) -> list[Sample]:
  """n empty candidates (the search's start)."""
  return [Sample() for _ in range(n)]


def finished_best(samples: Sequence[Sample], values: Sequence[float]
                  ) -> tuple[Sample | None, int]:
  """The highest-valued finished sample (ties: the lowest index), or (None, -1)."""
  best, idx = None, -1
  for i, (s, v) in enumerate(zip(samples, values, strict=True)):
    if s.finished and (best is None or v > values[idx]):
      best, idx = s, i
  return best, idx

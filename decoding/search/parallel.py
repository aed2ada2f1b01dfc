"""Methods over N independent complete samples: repeated sampling, voting, RPC, best-of-N,
first-finish.

Every method draws `budget.n` samples of the whole solution in one batched
`propose(..., until="end")` call (row i uses fold(key, i), so the same key gives
the same N samples to every method: they are compared on identical draws), then
selects an answer:

- `repeated_sampling`: the first sample the verifier (`score`, outcome) accepts:
  coverage, the Large Language Monkeys setting; `pass_at_k` estimates it.
- `majority_vote`: the most frequent extracted answer (self-consistency).
- `weighted_vote`: answers weighted by the reward model's aggregated score.
- `rpc`: Reasoning-Pruning Perplexity Consistency (Zhou et al., 2025): each
  distinct reasoning path adds its model probability to its answer's score,
  after pruning paths that a two-component Weibull mixture puts in the
  low-probability component (and below the mean).
- `best_of_n`: the highest aggregated reward (outcome, or PRM last / min / prod).
- `weighted_best_of_n`: the answer with the highest summed reward (search-and-learn's
  weighted BoN), returned through its best sample.
- `first_finish`: short-m@k (Hassid et al., 2025): decode k samples in lockstep
  and stop once m have finished; majority vote among those m (ties: the shortest).

Ties are deterministic: the answer (or sample) reached first in row order wins.
Unfinished samples (token cap or length limit) have no answer and never win.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Sequence

import numpy as np

from decoding.search import core
from decoding.search.core import Budget, Meter, Sample, SearchResult


def sample_n(propose, meter: Meter, n: int, key) -> list[Sample]:
  """n complete samples in one call under the meter's caps (unfinished if capped)."""
  out = core.call_propose(propose, meter, core.root(n), key, until="end")
  return core.root(n) if out is None else out


def vote(answers: Sequence[str | None], weights: Sequence[float] | None = None
         ) -> tuple[str | None, dict]:
  """The answer with the largest total weight (default 1 each); ties: first seen. None
  answers are skipped. Returns (answer, {answer: total})."""
  totals: dict = {}
  for i, a in enumerate(answers):
    if a is not None:
      totals[a] = totals.get(a, 0.0) + (1.0 if weights is None else float(weights[i]))
  if not totals:
    return None, totals
  best = max(totals.values())
  return next(a for a, t in totals.items() if t == best), totals


def _pick(samples, answers, answer) -> Sample | None:
  return next((s for s, a in zip(samples, answers, strict=True) if a == answer), None)


def _result(answer, samples, answers, meter, info) -> SearchResult:
  return SearchResult(answer=answer, sample=_pick(samples, answers, answer), cost=meter.total(),
                      candidates=tuple(samples), info=info)


def repeated_sampling(propose, score, budget, *, key=0,
                      answer_fn: Callable | None = None) -> SearchResult:
  """N samples; the answer is the first one the verifier `score` accepts (outcome score
  >= 0.5; with score=None, the first finished sample's)."""
  budget, meter = core.as_budget(budget), Meter(core.as_budget(budget))
  answer_fn = core.answer_fn_for(propose, answer_fn)
  samples = sample_n(propose, meter, budget.n, key)
  answers = [answer_fn(s.text) for s in samples]
  chosen = None
  if score is None:
    chosen = next((i for i, a in enumerate(answers) if a is not None), None)
  else:
    scores = core.call_score(score, meter, samples)
    if scores is not None:
      chosen = next((i for i, (s, v) in enumerate(zip(samples, scores, strict=True))
                     if s.finished and core.aggregate(v, "last") >= 0.5), None)
  answer = None if chosen is None else answers[chosen]
  return SearchResult(answer=answer, sample=None if chosen is None else samples[chosen],
                      cost=meter.total(), candidates=tuple(samples),
                      info={"answers": answers})


def majority_vote(propose, score, budget, *, key=0,
                  answer_fn: Callable | None = None) -> SearchResult:
  """Self-consistency: the most frequent answer among N samples (`score` is unused)."""
  budget, meter = core.as_budget(budget), Meter(core.as_budget(budget))
  answer_fn = core.answer_fn_for(propose, answer_fn)
  samples = sample_n(propose, meter, budget.n, key)
  answers = [answer_fn(s.text) for s in samples]
  answer, totals = vote(answers)
  return _result(answer, samples, answers, meter, {"votes": totals})


def _rewards(score, meter, samples, aggregate: str) -> list[float] | None:
  scores = core.call_score(score, meter, samples)
  if scores is None:
    return None
  return [core.aggregate(v, aggregate) if s.finished else 0.0
          for s, v in zip(samples, scores, strict=True)]


def weighted_vote(propose, score, budget, *, key=0, aggregate: str = "last",
                  answer_fn: Callable | None = None) -> SearchResult:
  """Answers weighted by the aggregated reward of their samples."""
  budget, meter = core.as_budget(budget), Meter(core.as_budget(budget))
  core.check_vocab(propose, score)
  answer_fn = core.answer_fn_for(propose, answer_fn)
  samples = sample_n(propose, meter, budget.n, key)
  answers = [answer_fn(s.text) for s in samples]
  rewards = _rewards(score, meter, samples, aggregate)
  answer, totals = vote(answers, rewards)  # rewards None (cap): a plain vote
  return _result(answer, samples, answers, meter, {"votes": totals, "rewards": rewards})


def best_of_n(propose, score, budget, *, key=0, aggregate: str = "last",
              answer_fn: Callable | None = None) -> SearchResult:
  """The finished sample with the highest aggregated reward (ties: the first)."""
  budget, meter = core.as_budget(budget), Meter(core.as_budget(budget))
  core.check_vocab(propose, score)
  answer_fn = core.answer_fn_for(propose, answer_fn)
  samples = sample_n(propose, meter, budget.n, key)
  rewards = _rewards(score, meter, samples, aggregate)
  rewards = [0.0] * len(samples) if rewards is None else rewards
  best, i = core.finished_best(samples, rewards)
  return SearchResult(answer=None if best is None else answer_fn(best.text), sample=best,
                      cost=meter.total(), candidates=tuple(samples),
                      info={"rewards": rewards, "index": i})


def weighted_best_of_n(propose, score, budget, *, key=0, aggregate: str = "last",
                       answer_fn: Callable | None = None) -> SearchResult:
  """The answer with the highest summed reward, returned through its best-scored sample."""
  r = weighted_vote(propose, score, budget, key=key, aggregate=aggregate, answer_fn=answer_fn)
  rewards, answers = r.info["rewards"], [core.answer_fn_for(propose, answer_fn)(s.text)
                                         for s in r.candidates]
  if rewards is None or r.answer is None:
    return r
  idx = max((i for i, a in enumerate(answers) if a == r.answer), key=lambda i: (rewards[i], -i))
  return SearchResult(answer=r.answer, sample=r.candidates[idx], cost=r.cost,
                      candidates=r.candidates, info=r.info)


def _weibull_logpdf(x, k, lam):
  with np.errstate(over="ignore"):  # far tails: -inf log-density is the right limit
    return np.log(k / lam) + (k - 1) * np.log(x / lam) - (x / lam) ** k


def weibull_mixture(x: np.ndarray) -> tuple[float, float, float, float, float]:
  """(w_high, k_high, lam_high, k_low, lam_low): a two-component Weibull mixture fitted by
  maximum likelihood (w in [0.2, 0.8], as the RPC reference), the first component the one
  with the larger mean."""
  from scipy import optimize, special

  x = np.clip(np.asarray(x, np.float64), 1e-6, None)

  def nll(p):
    w, k1, l1, k2, l2 = p
    a = np.log(w) + _weibull_logpdf(x, k1, l1)
    b = np.log1p(-w) + _weibull_logpdf(x, k2, l2)
    v = -float(np.logaddexp(a, b).sum())
    return v if np.isfinite(v) else 1e300  # far outside the data: a wall, not a nan

  with np.errstate(all="ignore"), warnings.catch_warnings():
    warnings.simplefilter("ignore", RuntimeWarning)  # finite differences at the wall
    res = optimize.minimize(nll, [0.5, 1.0, 1.0, 1.5, 2.0],
                            bounds=[(0.2, 0.8)] + [(0.01, None)] * 4)
  w, k1, l1, k2, l2 = (float(v) for v in res.x)
  mean = lambda k, lam: lam * special.gamma(1 + 1 / k)
  if mean(k1, l1) < mean(k2, l2):
    w, k1, l1, k2, l2 = 1 - w, k2, l2, k1, l1
  return w, k1, l1, k2, l2


def rpc_select(answers: Sequence[str | None], texts: Sequence[str],
               path_probs: Sequence[float], *, prune: bool = True) -> tuple[str | None, dict]:
  """RPC's answer from extracted answers, path texts and path probabilities.

  Reasoning pruning (with `prune` and >= 3 answered paths): a path is dropped when the
  fitted mixture gives it a higher low-component membership and its probability is
  below the mean. Perplexity consistency: an answer's score is the sum of the
  probabilities of its distinct remaining paths (a repeated path counts once).
  Returns (answer, {"scores": {answer: score}, "pruned": n}).
  """
  keep = [a is not None for a in answers]
  probs = np.asarray(path_probs, np.float64)
  pruned = 0
  if prune and sum(keep) >= 3:
    idx = [i for i, k in enumerate(keep) if k]
    w, k1, l1, k2, l2 = weibull_mixture(probs[idx])
    mean = probs[idx].mean()
    for i in idx:
      x = max(probs[i], 1e-6)
      hi = np.log(w) + _weibull_logpdf(x, k1, l1)
      lo = np.log1p(-w) + _weibull_logpdf(x, k2, l2)
      if lo > hi and probs[i] < mean:
        keep[i] = False
        pruned += 1
  scores: dict = {}
  seen: set = set()
  for i, a in enumerate(answers):
    if keep[i] and texts[i] not in seen:
      seen.add(texts[i])
      scores[a] = scores.get(a, 0.0) + float(probs[i])
  if not scores:  # everything pruned (cannot happen with the mean rule) or unanswered
    return None, {"scores": scores, "pruned": pruned}
  best = max(scores.values())
  return next(a for a, s in scores.items() if s == best), {"scores": scores, "pruned": pruned}


def rpc(propose, score, budget, *, key=0, prune: bool = True,
        answer_fn: Callable | None = None) -> SearchResult:
  """RPC over N samples (`score` is unused). A path's probability is
  exp(mean token log-prob): byte-level paths differ in length, and raw sequence
  probabilities of ~30 bytes are too small to compare or fit (our choice; the
  reference uses the path's log-probability as its sampler reports it)."""
  budget, meter = core.as_budget(budget), Meter(core.as_budget(budget))
  answer_fn = core.answer_fn_for(propose, answer_fn)
  samples = sample_n(propose, meter, budget.n, key)
  answers = [answer_fn(s.text) for s in samples]
  probs = [math.exp(s.mean_logprob) for s in samples]
  answer, info = rpc_select(answers, [s.text for s in samples], probs, prune=prune)
  return _result(answer, samples, answers, meter, info)


def first_finish(propose, score, budget, *, m: int = 1, chunk: int = 4, key=0,
                 answer_fn: Callable | None = None) -> SearchResult:
  """short-m@k with k = budget.n: decode k samples in lockstep and stop once m have
  finished; vote among the first m to finish (finish time = tokens, then row order;
  vote ties go to the shortest). `score` is unused. Tokens still count for the rows
  that were cut off. A proposer with `supports_stop_after` (the model's) does it in
  one call; others are called `chunk` tokens at a time until m rows finished."""
  budget = core.as_budget(budget)
  if isinstance(m, bool) or not isinstance(m, int) or not 1 <= m <= budget.n:
    raise ValueError(f"m={m!r} must be an int in 1..budget.n={budget.n}")
  if isinstance(chunk, bool) or not isinstance(chunk, int) or chunk < 1:
    raise ValueError(f"chunk={chunk!r} must be an int >= 1")
  meter = Meter(budget)
  answer_fn = core.answer_fn_for(propose, answer_fn)
  samples = core.root(budget.n)
  rounds = 0
  if getattr(propose, "supports_stop_after", False):  # one lockstep call that stops at m
    nxt = core.call_propose(propose, meter, samples, key, until="end", stop_after=m)
    samples, rounds = (samples, 0) if nxt is None else (nxt, 1)
  while not getattr(propose, "supports_stop_after", False) and sum(
      s.finished for s in samples) < m:
    nxt = core.call_propose(propose, meter, samples, key, until="end", max_new_tokens=chunk)
    if nxt is None:
      break
    samples, rounds = nxt, rounds + 1
  done = sorted((i for i, s in enumerate(samples) if s.finished),
                key=lambda i: (samples[i].tokens, i))[:m]
  answers = [answer_fn(samples[i].text) for i in done]
  _, totals = vote(answers)
  answer = None
  if totals:
    top = max(totals.values())
    answer = next(a for a in answers if a is not None and totals[a] == top)  # shortest first
  chosen = next((samples[i] for i, a in zip(done, answers, strict=True) if a == answer), None)
  return SearchResult(answer=answer, sample=chosen, cost=meter.total(),
                      candidates=tuple(samples),
                      info={"first": done, "rounds": rounds, "votes": totals})


METHODS_PARALLEL = {"repeated_sampling": repeated_sampling, "majority_vote": majority_vote,
                    "weighted_vote": weighted_vote, "rpc": rpc, "best_of_n": best_of_n,
                    "weighted_best_of_n": weighted_best_of_n, "first_finish": first_finish}

__all__ = ["Budget", "best_of_n", "first_finish", "majority_vote", "repeated_sampling", "rpc",
           "rpc_select", "sample_n", "vote", "weibull_mixture", "weighted_best_of_n",
           "weighted_vote"]

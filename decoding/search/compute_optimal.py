"""Compute-optimal test-time allocation (Snell et al., 2024): pick the method per difficulty.

A problem's difficulty is estimated from a few probe samples without the answer:
1 - the mean outcome score the reward model gives them ("model-predicted
difficulty"). `fit_allocation` takes per-problem results of several methods at one
budget on a training split, bins the estimated difficulty at its quantiles and
keeps, per bin, the method with the best accuracy. `compute_optimal` then spends
`probe` samples on the estimate and runs the bin's method with the remaining
`budget.n - probe` samples; the probe's cost is part of the result's.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence

import numpy as np

from decoding.search import core
from decoding.search.core import Budget, Meter, SearchResult


def estimate_difficulty(propose, score, meter: Meter, probe: int, key
                        ) -> tuple[float, list[core.Sample]]:
  """1 - mean outcome reward of `probe` samples (1.0 when the caps leave no room)."""
  samples = core.call_propose(propose, meter, core.root(probe), core.fold(key, 1 << 20),
                              until="end")
  if samples is None:
    return 1.0, []
  scores = core.call_score(score, meter, samples)
  if scores is None:
    return 1.0, samples
  rewards = [core.aggregate(v, "last") if s.finished else 0.0
             for s, v in zip(samples, scores, strict=True)]
  return 1.0 - float(np.mean(rewards)), samples


@dataclasses.dataclass(frozen=True)
class Allocation:
  """Difficulty bin edges (ascending, len = bins - 1) and the method name chosen per bin."""

  edges: tuple[float, ...]
  methods: tuple[str, ...]
  accuracy: tuple[tuple[float, ...], ...] = ()  # per bin, per candidate method (fit data)
  candidates: tuple[str, ...] = ()

  def __post_init__(self):
    if len(self.methods) != len(self.edges) + 1:
      raise ValueError(f"Allocation has {len(self.edges)} edges, so needs "
                       f"{len(self.edges) + 1} methods, got {len(self.methods)}")

  def method_for(self, difficulty: float) -> str:
    return self.methods[int(np.searchsorted(self.edges, difficulty, side="right"))]

  def to_dict(self) -> dict:
    return dataclasses.asdict(self)


def fit_allocation(difficulties: Sequence[float], correct: Mapping[str, Sequence[bool]], *,
                   bins: int = 4) -> Allocation:
  """Per-bin best method from a training split.

  Args:
    difficulties: the estimated difficulty of each training problem.
    correct: method name -> per-problem correctness (same order), all at one budget.
    bins: quantile bins of the difficulty (fewer when values repeat).
  Ties go to the method listed first.
  """
  d = np.asarray(difficulties, np.float64)
  if not len(d):
    raise ValueError("difficulties is empty; give one estimate per training problem")
  if not correct:
    raise ValueError("correct is empty; give per-problem results of at least one method")
  for name, c in correct.items():
    if len(c) != len(d):
      raise ValueError(f"correct[{name!r}] has {len(c)} results for {len(d)} problems")
  if isinstance(bins, bool) or not isinstance(bins, int) or bins < 1:
    raise ValueError(f"bins={bins!r} must be an int >= 1")
  edges = tuple(np.unique(np.quantile(d, np.arange(1, bins) / bins)).tolist())
  names = tuple(correct)
  which = np.searchsorted(edges, d, side="right")
  methods, acc = [], []
  for b in range(len(edges) + 1):
    sel = which == b
    row = tuple(float(np.mean(np.asarray(correct[n])[sel])) if sel.any() else 0.0 for n in names)
    acc.append(row)
    methods.append(names[int(np.argmax(row))])
  return Allocation(edges=edges, methods=tuple(methods), accuracy=tuple(acc), candidates=names)


def compute_optimal(propose, score, budget, *, allocation: Allocation,
                    methods: Mapping[str, Callable], probe: int = 4, key=0,
                    answer_fn: Callable | None = None) -> SearchResult:
  """Estimate the difficulty with `probe` samples, then run the allocated method with the
  rest of the budget (`budget.n - probe` samples, at least 1; the caps cover both parts)."""
  budget = core.as_budget(budget)
  if isinstance(probe, bool) or not isinstance(probe, int) or not 1 <= probe < budget.n:
    raise ValueError(f"probe={probe!r} must be an int in 1..budget.n - 1 = {budget.n - 1}")
  missing = [m for m in allocation.methods if m not in methods]
  if missing:
    raise ValueError(f"allocation names methods {missing} not in methods ({sorted(methods)})")
  core.check_vocab(propose, score)
  meter = Meter(budget)
  difficulty, _ = estimate_difficulty(propose, score, meter, probe, key)
  name = allocation.method_for(difficulty)
  spent = meter.cost
  rest = Budget(budget.n - probe, **{
      f: None if getattr(budget, f) is None else max(getattr(budget, f) - getattr(spent, c), 1)
      for f, c in (("max_tokens", "tokens"), ("max_forward_passes", "forward_passes"),
                   ("max_reward_calls", "reward_calls"))})
  if any(getattr(budget, f) is not None and getattr(budget, f) <= getattr(spent, c)
         for f, c in (("max_tokens", "tokens"), ("max_forward_passes", "forward_passes"),
                      ("max_reward_calls", "reward_calls"))):
    return SearchResult(answer=None, sample=None, cost=meter.total(),
                        info={"difficulty": difficulty, "method": None})
  r = methods[name](propose, score, rest, key=key, answer_fn=answer_fn)
  cost = r.cost.replace(wall_time_s=0.0) + meter.total()
  return dataclasses.replace(r, cost=cost, info={**r.info, "difficulty": difficulty,
                                                 "method": name})

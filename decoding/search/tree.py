"""Step-level tree search over PRM scores: beam search, DVTS and lookahead search.

  result = beam_search(propose, score, Budget(16), beam_width=4, key=0)
  result = dvts(propose, score, Budget(16), beam_width=4, key=0)
  result = lookahead(propose, score, Budget(16), beam_width=4, depth=1, key=0)

These follow huggingface/search-and-learn (Snell et al., "Scaling LLM Test-Time
Compute Optimally"; Beeching et al., the HF blog). `budget.n` = N is the number of
rows generated per step. Beam search keeps N / beam_width beams; each step every
survivor is copied beam_width times (N rows, survivors in turn, as search-and-learn
duplicates its active beams up to N), each copy gets one step (`until="step"`), the
PRM scores every child (`aggregate` of its step scores, default the last), finished
children join a completed pool and the top N / beam_width unfinished children
survive. It stops when no unfinished child is left or after `max_steps` steps; the
last step generates to the end (`until="end"`), as search-and-learn's last
iteration does. The answer is the completed candidate with the highest aggregate
score. Ties: higher score first, then lower row index (stable sort), so runs repeat.

DVTS keeps N / beam_width independent subtrees; each step each unfinished subtree
copies its leaf beam_width times, extends each copy by one step and keeps its best
child. A subtree ends when its leaf finishes. The candidates are the finished
children of every subtree's last expansion (search-and-learn returns all of a
subtree's last children), the answer the best of them.

Lookahead search is beam search where a child is ranked by the PRM score of a
`depth`-step rollout from it (search-and-learn's `lookahead`), while the tree keeps
the child itself. search-and-learn rolls out greedily (temperature 0); here the
rollout uses `rollout_propose`, by default the same proposer (and so its
temperature): pass a greedy policy's `propose` for the search-and-learn behaviour.

Every call goes through `core.call_propose` / `core.call_score`; when a cap leaves
no room the method stops and returns the best candidate completed so far (children
generated but not yet scored are dropped), so `result.cost` never exceeds the budget.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

from decoding.search import core

STOPS = ("done", "max_steps", "budget", "pool_full")


answer_of = core.answer_of  # the default answer extractor (`base.extract_answer`)


def check_width(n: int, beam_width: int) -> int:
  """N / beam_width, or a ValueError naming both when beam_width does not divide n."""
  if isinstance(beam_width, bool) or not isinstance(beam_width, (int, np.integer)) or (
      beam_width < 1):
    raise ValueError(f"beam_width={beam_width!r} must be an int >= 1")
  if n < beam_width or n % beam_width:
    raise ValueError(f"budget n={n} must be a multiple of beam_width={beam_width} "
                     f"(and >= it)")
  return n // beam_width


def check_positive_int(value, name: str, lo: int = 1) -> int:
  if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < lo:
    raise ValueError(f"{name}={value!r} must be an int >= {lo}")
  return int(value)


def rank(values: Sequence[float]) -> list[int]:
  """Indices by value, highest first; ties keep the lower index first."""
  return sorted(range(len(values)), key=lambda i: -values[i])


def result(pool: Sequence[core.Sample], values: Sequence[float], meter: core.Meter,
           answer_fn: Callable[[str], str | None], info: dict) -> core.SearchResult:
  """The SearchResult of the highest-valued finished candidate of `pool`."""
  best, _ = core.finished_best(pool, values)
  return core.SearchResult(answer=None if best is None else answer_fn(best.text), sample=best,
                           cost=meter.total(), candidates=tuple(pool),
                           info={**info, "scores": [float(v) for v in values]})


def _beam(propose: core.Propose, score: core.Score, budget, *, beam_width: int,
          max_steps: int, key, aggregate: str, answer_fn, depth: int,
          rollout_propose: core.Propose | None, filter_duplicates: bool,
          early_stop: bool) -> core.SearchResult:
  b = core.as_budget(budget)
  core.check_vocab(propose, score)
  answer_fn = core.answer_fn_for(propose, answer_fn)
  keep = check_width(b.n, beam_width)
  max_steps = check_positive_int(max_steps, "max_steps")
  depth = check_positive_int(depth, "depth", 0)
  core.aggregate([], aggregate)  # checks the name
  rollout = propose if rollout_propose is None else rollout_propose
  meter = core.Meter(b)
  pool, pool_values = [], []
  survivors = core.root(1)
  steps, stop = 0, "max_steps"
  for t in range(max_steps):
    rows = [survivors[i % len(survivors)] for i in range(b.n)]
    until = "end" if t == max_steps - 1 else "step"
    kt = core.fold(key, t)
    children = core.call_propose(propose, meter, rows, core.fold(kt, 0), until=until)
    if children is None:
      stop = "budget"
      break
    evals = children
    if depth and until == "step":
      for r in range(depth):
        evals = core.call_propose(rollout, meter, evals, core.fold(kt, r + 1), until="step")
        if evals is None:
          break
      if evals is None:
        stop = "budget"
        break
    scores = core.call_score(score, meter, evals)
    if scores is None:
      stop = "budget"
      break
    steps += 1
    values = [core.aggregate(s, aggregate) for s in scores]
    live, live_values, seen = [], [], set()
    for c, v in zip(children, values, strict=True):
      if c.finished:
        pool.append(c)
        pool_values.append(v)
      elif not (filter_duplicates and c.text in seen):
        seen.add(c.text)
        live.append(c)
        live_values.append(v)
    if not live:
      stop = "done"
      break
    if early_stop and len(pool) >= b.n:
      stop = "pool_full"
      break
    survivors = [live[i] for i in rank(live_values)[:keep]]
  return result(pool, pool_values, meter, answer_fn, {"steps": steps, "stop": stop})


def beam_search(propose: core.Propose, score: core.Score, budget, *, beam_width: int = 4,
                max_steps: int = 40, key=0, aggregate: str = "last",
                answer_fn: Callable[[str], str | None] | None = None,
                filter_duplicates: bool = False, early_stop: bool = False
                ) -> core.SearchResult:
  """PRM-guided step-level beam search (search-and-learn's `beam_search`).

  Args:
    propose: the policy (`core.Propose`).
    score: the PRM (`core.Score`).
    budget: a `core.Budget` (or int N): N rows per step, N / beam_width beams kept.
    beam_width: children per beam; must divide N.
    max_steps: the most expansion steps; the last one generates to the end.
    key: a PRNG key or int seed; step t uses fold(fold(key, t), 0).
    aggregate: how a candidate's step scores make one score ("last", "min", "prod").
    answer_fn: the answer of a finished text.
    filter_duplicates: drop unfinished children whose text repeats (search-and-learn's
      `filter_duplicates`, off by default as there).
    early_stop: also stop once the completed pool holds N candidates (not in
      search-and-learn, which runs until no beam is active).

  Returns:
    A `core.SearchResult`: candidates = the completed pool in completion order,
    info = {"steps": expansion steps scored, "stop": one of STOPS, "scores": the
    pool's aggregate scores}.
  """
  return _beam(propose, score, budget, beam_width=beam_width, max_steps=max_steps, key=key,
               aggregate=aggregate, answer_fn=answer_fn, depth=0, rollout_propose=None,
               filter_duplicates=filter_duplicates, early_stop=early_stop)


def lookahead(propose: core.Propose, score: core.Score, budget, *, beam_width: int = 4,
              depth: int = 1, max_steps: int = 40, key=0, aggregate: str = "last",
              answer_fn: Callable[[str], str | None] | None = None,
              rollout_propose: core.Propose | None = None, filter_duplicates: bool = False,
              early_stop: bool = False) -> core.SearchResult:
  """Beam search whose children are ranked by the PRM score of a `depth`-step rollout.

  Each unfinished child is extended `depth` more steps (`until="step"` calls of
  `rollout_propose`, default `propose` itself, with key fold(fold(key, t), r + 1)); the
  rollout is scored and thrown away, the child is kept. A finished child is its own
  rollout. No rollout on the last step (it generates to the end). Arguments, returns
  and info as `beam_search`; depth=0 is beam search.
  """
  return _beam(propose, score, budget, beam_width=beam_width, max_steps=max_steps, key=key,
               aggregate=aggregate, answer_fn=answer_fn, depth=depth,
               rollout_propose=rollout_propose, filter_duplicates=filter_duplicates,
               early_stop=early_stop)


def dvts(propose: core.Propose, score: core.Score, budget, *, beam_width: int = 4,
         max_steps: int = 40, key=0, aggregate: str = "last",
         answer_fn: Callable[[str], str | None] | None = None) -> core.SearchResult:
  """Diverse verifier tree search: N / beam_width independent greedy-on-PRM subtrees.

  Args:
    propose, score, budget, beam_width, max_steps, key, aggregate, answer_fn: as
      `beam_search` (N rows per step while every subtree is live).

  Returns:
    A `core.SearchResult`: candidates = the finished children of each subtree's last
    expansion (subtree order, then child order), info = {"steps", "stop", "scores"
    (the candidates' scores), "leaves": each subtree's final leaf text}.
  """
  b = core.as_budget(budget)
  core.check_vocab(propose, score)
  answer_fn = core.answer_fn_for(propose, answer_fn)
  n_trees = check_width(b.n, beam_width)
  max_steps = check_positive_int(max_steps, "max_steps")
  core.aggregate([], aggregate)
  meter = core.Meter(b)
  leaves = core.root(n_trees)
  last: list[tuple[list[core.Sample], list[float]]] = [([], []) for _ in range(n_trees)]
  steps, stop = 0, "max_steps"
  for t in range(max_steps):
    live = [j for j in range(n_trees) if not leaves[j].finished]
    if not live:
      stop = "done"
      break
    rows = [leaves[j] for j in live for _ in range(beam_width)]
    until = "end" if t == max_steps - 1 else "step"
    children = core.call_propose(propose, meter, rows, core.fold(core.fold(key, t), 0),
                                 until=until)
    if children is None:
      stop = "budget"
      break
    scores = core.call_score(score, meter, children)
    if scores is None:
      stop = "budget"
      break
    steps += 1
    values = [core.aggregate(s, aggregate) for s in scores]
    for a, j in enumerate(live):
      ch = children[a * beam_width:(a + 1) * beam_width]
      vs = values[a * beam_width:(a + 1) * beam_width]
      leaves[j] = ch[rank(vs)[0]]
      last[j] = (ch, vs)
  else:
    if all(leaf.finished for leaf in leaves):
      stop = "done"
  pool = [c for ch, _ in last for c in ch if c.finished]
  values = [v for ch, vs in last for c, v in zip(ch, vs, strict=True) if c.finished]
  return result(pool, values, meter, answer_fn, {"steps": steps, "stop": stop,
                                                 "leaves": [leaf.text for leaf in leaves]})

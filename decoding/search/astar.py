"""A*-decoding: best-first search over partial solutions with PRM-derived costs.

  result = astar(propose, score, Budget(16, max_tokens=2000), expand=4, key=0)

After Chatziveroglou (2025), "A*-Decoding: Token-Efficient Inference Scaling": states
are partial solutions, a priority queue is ordered by f = g + h, the best state is
popped, `expand` successors of `steps_per_expand` steps each are sampled from the
policy, scored by the PRM and pushed; the search ends at the first finished state
popped (the A* goal test). The paper's exact g and h were not at hand; this module
uses, with r_1..r_k the PRM's step scores of a state and eps = 1e-6,

  g(s) = sum_i -log(max(r_i, eps))          (path cost: -log of the steps' success odds)
  h(s) = h_weight * -log(max(r_k, eps))     (cost-to-go: the PRM's belief the last step
                                             keeps a correct solution reachable)

(the empty root has f = 0). h is not admissible in any formal sense; h_weight=0 gives
uniform-cost search on g. A state whose text was already pushed is not pushed again.
`budget.n` bounds the expansions (default `max_expansions`); the width is `expand`.
When `max_expansions` stops the search before any state finished, the best open
state is completed in one call (`until="end"`) and scored; when a cap or an empty
queue stops it, the answer is the finished state with the lowest f pushed so far
(None if none).
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Callable, Sequence

from decoding.search import core
from decoding.search.tree import check_positive_int

EPS = 1e-6


def path_cost(step_scores: Sequence[float], h_weight: float = 1.0) -> float:
  """f = g + h of a state with these PRM step scores (0 for no steps)."""
  if not len(step_scores):
    return 0.0
  g = sum(-math.log(max(float(r), EPS)) for r in step_scores)
  return g + h_weight * -math.log(max(float(step_scores[-1]), EPS))


def astar(propose: core.Propose, score: core.Score, budget, *, expand: int = 4,
          steps_per_expand: int = 1, max_expansions: int | None = None, h_weight: float = 1.0,
          key=0, answer_fn: Callable[[str], str | None] | None = None) -> core.SearchResult:
  """Best-first (A*) search over partial solutions, f = g + h from the PRM (module doc).

  Args:
    propose: the policy (`core.Propose`).
    score: the PRM (`core.Score`).
    budget: a `core.Budget` (or int N) and its caps; N bounds the expansions unless
      `max_expansions` is given.
    expand: successors sampled per expansion.
    steps_per_expand: steps each successor adds (`until="step"` calls; finished rows free).
    max_expansions: the most expansions (pops of an unfinished state); None = budget.n.
    h_weight: the heuristic's weight (>= 0).
    key: a PRNG key or int seed; expansion e, step r uses fold(fold(key, e), r).
    answer_fn: the answer of a finished text.

  Returns:
    A `core.SearchResult`: candidates = every finished state pushed (push order), info =
    {"expansions", "stop": "goal" | "exhausted" | "max_expansions" | "budget", "f": the
    chosen state's f (None if none), "scores": the candidates' f values, "pushed":
    states pushed}.
  """
  b = core.as_budget(budget)
  core.check_vocab(propose, score)
  answer_fn = core.answer_fn_for(propose, answer_fn)
  expand = check_positive_int(expand, "expand")
  steps_per_expand = check_positive_int(steps_per_expand, "steps_per_expand")
  max_expansions = check_positive_int(b.n if max_expansions is None else max_expansions,
                                      "max_expansions")
  if not h_weight >= 0:
    raise ValueError(f"h_weight={h_weight!r} must be >= 0")
  meter = core.Meter(b)
  heap: list[tuple[float, int, core.Sample]] = [(0.0, 0, core.Sample())]
  seen, count = {""}, 1
  finished, finished_f = [], []
  chosen, chosen_f, expansions, stop = None, None, 0, "exhausted"
  while heap:
    f, _, s = heapq.heappop(heap)
    if s.finished:
      chosen, chosen_f, stop = s, f, "goal"
      break
    if expansions >= max_expansions:
      stop = "max_expansions"
      if not finished:  # nothing reached the goal: finish the best open state greedily
        done = core.call_propose(propose, meter, [s], core.fold(key, expansions), until="end")
        if done is not None and done[0].finished:
          sc = core.call_score(score, meter, done)
          if sc is not None:
            finished.append(done[0])
            finished_f.append(path_cost(sc[0], h_weight))
      break
    ke = core.fold(key, expansions)
    rows = [s] * expand
    for r in range(steps_per_expand):
      rows = core.call_propose(propose, meter, rows, core.fold(ke, r), until="step")
      if rows is None:
        break
    if rows is None:
      stop = "budget"
      break
    new = [c for c in rows if c.text not in seen]
    new = [c for i, c in enumerate(new) if c.text not in {x.text for x in new[:i]}]
    scores = core.call_score(score, meter, new)
    if scores is None:
      stop = "budget"
      break
    expansions += 1
    for c, sc in zip(new, scores, strict=True):
      fc = path_cost(sc, h_weight)
      seen.add(c.text)
      heapq.heappush(heap, (fc, count, c))
      count += 1
      if c.finished:
        finished.append(c)
        finished_f.append(fc)
  if chosen is None and finished:
    i = min(range(len(finished)), key=lambda j: finished_f[j])
    chosen, chosen_f = finished[i], finished_f[i]
  return core.SearchResult(
      answer=None if chosen is None else answer_fn(chosen.text), sample=chosen,
      cost=meter.total(), candidates=tuple(finished),
      info={"expansions": expansions, "stop": stop, "f": chosen_f, "scores": finished_f,
            "pushed": count})

"""Test-time-compute search over `(propose, score, budget)`, every method returning a `Cost`.

  policy = core.Policy(params, model.Decoder(cfg), ARITHMETIC, temperature=1.0)
  propose, score = policy.bind(problem), NoisyPRM(ARITHMETIC, fp=0.2, fn=0.2).bind(problem)
  r = particle_filtering(propose, score, Budget(16), key=0)  # r.answer, r.cost, r.candidates
  r = search("beam_search", propose, score, 16, beam_width=4)  # by name

Methods: repeated sampling (`pass_at_k`, `fit_coverage_law`), majority vote,
reward-weighted vote, RPC, best-of-N (outcome or PRM last / min / prod), weighted
best-of-N, first-finish / short-m@k (`parallel`); PRM beam search, DVTS, lookahead
(`tree`); particle filtering with multinomial / systematic resampling and entropic
annealing (`particle`); A* decoding (`astar`); compute-optimal allocation by estimated
difficulty (`compute_optimal`). Reward models: `OraclePRM`, `NoisyPRM`, `LearnedPRM`
(`reward`).
"""

from decoding.search import astar as astar_lib
from decoding.search import compute_optimal as compute_optimal_lib
from decoding.search import core, parallel, particle, passk, reward, tree
from decoding.search.astar import astar
from decoding.search.compute_optimal import (
    Allocation,
    compute_optimal,
    estimate_difficulty,
    fit_allocation,
)
from decoding.search.core import Budget, Meter, Policy, Sample, SearchResult, aggregate
from decoding.search.parallel import (
    best_of_n,
    first_finish,
    majority_vote,
    repeated_sampling,
    rpc,
    vote,
    weighted_best_of_n,
    weighted_vote,
)
from decoding.search.particle import multinomial_resample, particle_filtering, systematic_resample
from decoding.search.passk import CoverageFit, coverage, fit_coverage_law, pass_at_k
from decoding.search.reward import LearnedPRM, NoisyPRM, OraclePRM
from decoding.search.tree import beam_search, dvts, lookahead

METHODS = {
    "repeated_sampling": repeated_sampling, "majority_vote": majority_vote,
    "weighted_vote": weighted_vote, "rpc": rpc, "best_of_n": best_of_n,
    "weighted_best_of_n": weighted_best_of_n, "first_finish": first_finish,
    "beam_search": beam_search, "dvts": dvts, "lookahead": lookahead,
    "particle_filtering": particle_filtering, "astar": astar,
}
# Methods that extend candidates step by step (one propose + score call per step).
STEP_METHODS = ("beam_search", "dvts", "lookahead", "particle_filtering", "astar")
_WIDTH = {"beam_search": 4, "dvts": 4, "lookahead": 4}


def valid_budget(method: str, n: int, options: dict | None = None) -> bool:
  """Whether `method` (with `options`) accepts a budget of n samples: beam methods need
  beam_width to divide n, first-finish needs m <= n."""
  options = options or {}
  if method in _WIDTH:
    w = options.get("beam_width", _WIDTH[method])
    return n >= w and n % w == 0
  if method == "first_finish":
    return options.get("m", 1) <= n
  return n >= 1


def search(method: str, propose, score, budget, **options) -> SearchResult:
  """Runs the method called `method` (a key of METHODS) with `options`."""
  if method not in METHODS:
    raise ValueError(f"unknown method {method!r}; valid: {', '.join(METHODS)}")
  return METHODS[method](propose, score, budget, **options)


__all__ = ["Allocation", "Budget", "CoverageFit", "LearnedPRM", "METHODS", "Meter",
           "NoisyPRM", "OraclePRM", "Policy", "STEP_METHODS", "Sample", "SearchResult",
           "aggregate", "astar", "astar_lib", "beam_search", "best_of_n", "compute_optimal",
           "compute_optimal_lib", "core", "coverage", "dvts", "estimate_difficulty",
           "first_finish", "fit_allocation", "fit_coverage_law", "lookahead", "majority_vote",
           "multinomial_resample", "parallel", "particle", "particle_filtering", "pass_at_k",
           "passk", "repeated_sampling", "reward", "rpc", "search", "systematic_resample",
           "tree", "valid_budget", "vote", "weighted_best_of_n", "weighted_vote"]

"""Particle filtering over PRM scores, with optional entropic annealing.

  result = particle_filtering(propose, score, Budget(16), key=0)
  result = particle_filtering(propose, score, Budget(16), anneal=0.5)  # entropic annealing
  idx = systematic_resample(key, weights, n)  # int indices, E[count_i] = n * w_i

After Puri et al., "A Probabilistic Inference Approach to Inference-Time Scaling of
LLMs using Particle-Based Monte Carlo Methods", as its_hub's `ParticleFiltering`
implements it: N = `budget.n` particles start empty; each round every unfinished
particle gets one step (`until="step"`) and is scored by the PRM; the weights are a
softmax over ALL N particles (a finished particle keeps its final score) of the log
weight over `temperature`; N particles are resampled (multinomial as its_hub, or
systematic) and copied, finished ones unchanged. Rounds end when every particle has
finished (no resampling after the round that finishes them: it could only drop
candidates) or after `max_steps`. The answer is its_hub's default (`ARGMAX`): the
finished particle with the highest score (ties: the lowest index).

`log_weight="logit"` (its_hub) takes logit(clip(r, 1e-7, 1 - 1e-7)) of the PRM's
aggregate score r; `"score"` takes r itself. Entropic annealing (Entropic Particle
Filtering): when the normalized entropy H(w) / log N of a round's weights is below
`anneal`, that round's temperature is doubled until it is >= `anneal` or the
temperature reaches `max_temperature`; the next round starts from `temperature`
again. Budget caps as every method here (`core.call_propose` / `core.call_score`).
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import numpy as np

from decoding.search import core
from decoding.search.tree import check_positive_int, result

RESAMPLING = ("multinomial", "systematic")
LOG_WEIGHTS = ("logit", "score")
_CLIP = 1e-7


def _rng(key) -> np.random.Generator:
  """A NumPy generator seeded by a jax key's data (or an int seed's key)."""
  data = np.asarray(jax.random.key_data(core.as_key(key))).ravel()
  return np.random.default_rng([int(x) for x in data.astype(np.uint64)])


def _weights(weights) -> np.ndarray:
  w = np.asarray(weights, np.float64)
  if w.ndim != 1 or not len(w) or not np.all(np.isfinite(w)) or np.any(w < 0) or w.sum() <= 0:
    raise ValueError("weights must be a non-empty 1-D array of finite values >= 0 with a "
                     "positive sum")
  return w / w.sum()


def multinomial_resample(key, weights, n: int) -> np.ndarray:
  """n i.i.d. indices drawn with probabilities `weights` (normalized): E[count_i] = n w_i."""
  w = _weights(weights)
  n = check_positive_int(n, "n")
  return _rng(key).choice(len(w), size=n, p=w).astype(np.int64)


def systematic_resample(key, weights, n: int) -> np.ndarray:
  """n sorted indices at positions (u + j) / n, u ~ U[0, 1), of the weights' CDF.

  Unbiased (E[count_i] = n w_i) and low-variance: count_i is floor or ceil of n w_i.
  """
  w = _weights(weights)
  n = check_positive_int(n, "n")
  cdf = np.cumsum(w)
  cdf[-1] = 1.0
  pos = (_rng(key).random() + np.arange(n)) / n
  return np.minimum(np.searchsorted(cdf, pos, side="right"), len(w) - 1).astype(np.int64)


_RESAMPLERS = {"multinomial": multinomial_resample, "systematic": systematic_resample}


def normalized_entropy(w: np.ndarray) -> float:
  """H(w) / log(len(w)) in [0, 1] (1 for a single particle)."""
  if len(w) < 2:
    return 1.0
  nz = w[w > 0]
  return float(-(nz * np.log(nz)).sum() / np.log(len(w)))


def softmax(x: np.ndarray) -> np.ndarray:
  z = np.exp(x - x.max())
  return z / z.sum()


def particle_filtering(propose: core.Propose, score: core.Score, budget, *,
                       temperature: float = 1.0, resampling: str = "multinomial",
                       anneal: float | None = None, max_temperature: float = 1e4,
                       log_weight: str = "logit", max_steps: int = 40, key=0,
                       aggregate: str = "last",
                       answer_fn: Callable[[str], str | None] | None = None
                       ) -> core.SearchResult:
  """Particle filtering with `budget.n` particles (its_hub's `ParticleFiltering`).

  Args:
    propose: the policy (`core.Propose`).
    score: the PRM (`core.Score`).
    budget: a `core.Budget` (or int N): N particles.
    temperature: divides the log weights (> 0; toward 0: keep only the best-scored).
    resampling: "multinomial" (its_hub) or "systematic".
    anneal: None, or a target normalized entropy in (0, 1] (entropic annealing).
    max_temperature: the cap annealing raises the temperature to.
    log_weight: "logit" (its_hub: logit of the PRM score) or "score".
    max_steps: the most rounds.
    key: a PRNG key or int seed; round t proposes with fold(fold(key, t), 0) and
      resamples with fold(fold(key, t), 1).
    aggregate: how a particle's step scores make its score ("last" as its_hub).
    answer_fn: the answer of a finished text.

  Returns:
    A `core.SearchResult`: candidates = the final particles (finished or not), info =
    {"steps": rounds, "stop": "done" | "max_steps" | "budget", "scores": the final
    particles' scores, "temperatures": each resampling round's temperature,
    "entropies": its normalized weight entropy (after annealing), "ancestors": each
    round's resampled indices}.
  """
  b = core.as_budget(budget)
  core.check_vocab(propose, score)
  answer_fn = core.answer_fn_for(propose, answer_fn)
  if not isinstance(temperature, (int, float, np.floating)) or not temperature > 0:
    raise ValueError(f"temperature={temperature!r} must be a number > 0")
  if resampling not in RESAMPLING:
    raise ValueError(f"resampling={resampling!r} must be one of {RESAMPLING}")
  if log_weight not in LOG_WEIGHTS:
    raise ValueError(f"log_weight={log_weight!r} must be one of {LOG_WEIGHTS}")
  if anneal is not None and not 0 < anneal <= 1:
    raise ValueError(f"anneal={anneal!r} must be None or a normalized entropy in (0, 1]")
  if not max_temperature >= temperature:
    raise ValueError(f"max_temperature={max_temperature!r} must be >= "
                     f"temperature={temperature!r}")
  max_steps = check_positive_int(max_steps, "max_steps")
  core.aggregate([], aggregate)
  meter = core.Meter(b)
  particles, values = core.root(b.n), [0.0] * b.n
  temps, entropies, ancestors = [], [], []
  steps, stop = 0, "max_steps"
  for t in range(max_steps):
    if all(p.finished for p in particles):
      stop = "done"
      break
    kt = core.fold(key, t)
    new = core.call_propose(propose, meter, particles, core.fold(kt, 0), until="step")
    if new is None:
      stop = "budget"
      break
    live = [i for i, p in enumerate(particles) if not p.finished]
    scores = core.call_score(score, meter, [new[i] for i in live])
    if scores is None:
      stop = "budget"
      break
    steps += 1
    particles, values = new, list(values)
    for i, s in zip(live, scores, strict=True):
      values[i] = core.aggregate(s, aggregate)
    if all(p.finished for p in particles):
      stop = "done"
      break
    v = np.asarray(values, np.float64)
    logw = np.log(np.clip(v, _CLIP, 1 - _CLIP) / (1 - np.clip(v, _CLIP, 1 - _CLIP))) if (
        log_weight == "logit") else v
    temp = float(temperature)
    w = softmax(logw / temp)
    h = normalized_entropy(w)
    while anneal is not None and h < anneal and temp < max_temperature:
      temp = min(2.0 * temp, float(max_temperature))
      w = softmax(logw / temp)
      h = normalized_entropy(w)
    idx = _RESAMPLERS[resampling](core.fold(kt, 1), w, b.n)
    temps.append(temp)
    entropies.append(h)
    ancestors.append([int(i) for i in idx])
    particles = [particles[i] for i in idx]
    values = [values[i] for i in idx]
  else:
    if all(p.finished for p in particles):
      stop = "done"
  return result(particles, values, meter, answer_fn,
                {"steps": steps, "stop": stop, "temperatures": temps, "entropies": entropies,
                 "ancestors": ancestors})

"""Repeated-sampling statistics: the unbiased pass@k estimator and the coverage law.

pass@k (Chen et al., 2021) from n samples of which c are correct is
1 - C(n - c, k) / C(n, k), computed as a product (no large binomials). Large
Language Monkeys (Brown et al., 2024) model coverage (the fraction of problems
solved by at least one of k samples) as c(k) = exp(a * k**b), i.e.
log(-log c) = log(-a) + b log k, a line in log k; `fit_coverage_law` fits it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np


def _count(name: str, v, lo: int) -> int:
  if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < lo:
    raise ValueError(f"{name}={v!r} must be an int >= {lo}")
  return int(v)


def pass_at_k(n: int, c: int, k: int) -> float:
  """The unbiased pass@k of one problem with `c` correct among `n` samples (1 <= k <= n)."""
  n, c, k = _count("n", n, 1), _count("c", c, 0), _count("k", k, 1)
  if c > n:
    raise ValueError(f"c={c} must be <= n={n} (correct samples among n)")
  if k > n:
    raise ValueError(f"k={k} must be <= n={n}: pass@k needs at least k samples")
  if n - c < k:
    return 1.0
  i = np.arange(n - c + 1, n + 1, dtype=np.float64)
  return float(1.0 - np.prod(1.0 - k / i))


def coverage(correct_counts: Sequence[int], n: int, ks: Sequence[int]) -> np.ndarray:
  """Mean pass@k over problems for each k in `ks` (each problem has n samples)."""
  if not len(correct_counts):
    raise ValueError("correct_counts is empty; give one count per problem")
  return np.array([np.mean([pass_at_k(n, int(c), int(k)) for c in correct_counts])
                   for k in ks])


@dataclasses.dataclass(frozen=True)
class CoverageFit:
  """c(k) = exp(a * k**b) fitted by least squares on log(-log c) vs log k."""

  a: float
  b: float
  r2: float  # of the linear fit in (log k, log(-log c))

  def predict(self, k) -> np.ndarray:
    return np.exp(self.a * np.asarray(k, np.float64) ** self.b)


def fit_coverage_law(ks: Sequence[int], cov: Sequence[float]) -> CoverageFit:
  """Fits the coverage law on the points with 0 < coverage < 1 (needs at least two)."""
  ks, cov = np.asarray(ks, np.float64), np.asarray(cov, np.float64)
  if ks.shape != cov.shape:
    raise ValueError(f"ks has shape {ks.shape}, coverage {cov.shape}; give one coverage per k")
  keep = (cov > 0) & (cov < 1) & (ks >= 1)
  if keep.sum() < 2:
    raise ValueError(f"coverage={cov.tolist()} has fewer than two values strictly in (0, 1); "
                     "the law log(-log c) = log(-a) + b log k needs two")
  x, y = np.log(ks[keep]), np.log(-np.log(cov[keep]))
  b, intercept = np.polyfit(x, y, 1)
  pred = intercept + b * x
  ss = float(((y - y.mean()) ** 2).sum())
  r2 = 1.0 - float(((y - pred) ** 2).sum()) / ss if ss > 0 else 1.0
  return CoverageFit(a=-float(np.exp(intercept)), b=float(b), r2=r2)

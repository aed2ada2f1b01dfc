"""Per-layer sparsity distributions for sparse training: uniform and Erdos-Renyi-Kernel.

ERK (Evci et al. 2020, RigL) gives layer l a density proportional to
(sum of its dims) / (product of its dims), i.e. (n_in + n_out) / (n_in * n_out)
for a kernel, scaled by one factor eps so that the total number of non-zeros
equals (1 - sparsity) * total. A layer whose density eps * ratio would exceed 1 is
made dense and eps is re-solved for the rest, repeatedly (the RigL procedure).
Densities are floats; `prune_counts` turns them into exact per-layer counts.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

from sparsity import masks as masks_lib
from sparsity import rules as rules_lib

DISTRIBUTIONS = ("uniform", "erk")

Shapes = Mapping[str, tuple[int, ...]]


def _check(shapes: Shapes, sparsity: float) -> float:
  if not shapes:
    raise ValueError("shapes must name at least one prunable param (got none)")
  for path, shape in shapes.items():
    if not shape or any(int(d) < 1 for d in shape):
      raise ValueError(f"shape {tuple(shape)} of {path!r} must have >= 1 dims, each >= 1")
  return rules_lib.check_sparsity(sparsity)


def uniform_densities(shapes: Shapes, sparsity: float) -> dict[str, float]:
  """Every layer at density 1 - sparsity."""
  sparsity = _check(shapes, sparsity)
  return {path: 1.0 - sparsity for path in shapes}


def erk_densities(shapes: Shapes, sparsity: float, *, power: float = 1.0) -> dict[str, float]:
  """ERK density per path (1.0 for capped layers); `power` < 1 softens the ratios."""
  sparsity = _check(shapes, sparsity)
  if sparsity == 0.0:
    return {path: 1.0 for path in shapes}
  sizes = {p: math.prod(int(d) for d in s) for p, s in shapes.items()}
  raw = {p: (sum(int(d) for d in s) / sizes[p]) ** power for p, s in shapes.items()}
  dense: set[str] = set()
  while True:
    # Non-zeros left for the scaled layers once the dense ones are paid for.
    budget = (1.0 - sparsity) * sum(sizes.values()) - sum(sizes[p] for p in dense)
    divisor = sum(raw[p] * sizes[p] for p in shapes if p not in dense)
    eps = budget / divisor
    free = [p for p in shapes if p not in dense]
    top = max(raw[p] for p in free)
    if top * eps <= 1.0:
      break
    dense.update(p for p in free if raw[p] == top)
  return {p: 1.0 if p in dense else eps * raw[p] for p in shapes}


def densities(name: str, shapes: Shapes, sparsity: float) -> dict[str, float]:
  """`uniform_densities` or `erk_densities` by name."""
  if name not in DISTRIBUTIONS:
    raise ValueError(f"distribution={name!r} is not valid; choose one of {DISTRIBUTIONS}")
  fn = erk_densities if name == "erk" else uniform_densities
  return fn(shapes, sparsity)


def prune_counts(shapes: Shapes, dens: Mapping[str, float]) -> dict[str, int]:
  """Entries pruned per path at the given densities (`masks.n_pruned`, nearest integer)."""
  return {p: masks_lib.n_pruned(min(max(1.0 - dens[p], 0.0), 1.0), math.prod(s))
          for p, s in shapes.items()}

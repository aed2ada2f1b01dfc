"""Static plans of training-time sparsity: a method's settings and per-step prune counts.

A `Spec` holds a method's hashable settings; `make_plan(spec, params)` resolves the
pruning rules and the per-layer distribution once per params structure (cached)
into a `TrainPlan`: which leaves are masked and, for every scheduled mask update, the
exact number of entries each leaf (or the global pool) has pruned. Counts are
computed in float64 Python from `schedules.polynomial_sparsity` and
`masks.n_pruned`, so a jitted update indexes exact integers.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from model.tree import flatten
from sparsity import distributions as dist_lib
from sparsity import masks as masks_lib
from sparsity import rules as rules_lib
from sparsity import schedules


@dataclasses.dataclass(frozen=True)
class Spec:
  """A method's static settings (hashable; see the public constructors for meanings)."""

  name: str
  sparsity: float  # final (target) sparsity
  initial: float = 0.0  # sparsity of the initial masks
  begin_step: int = 0
  end_step: int = 0
  every: int = 1
  power: float = 3.0
  scope: str = "layerwise"
  distribution: str = "uniform"
  drop_fraction: float = 0.0
  seed: int = 0
  rules: tuple = ()
  init: str = "magnitude"  # initial masks: "magnitude" | "random"
  scheduled: bool = True  # prune counts follow the polynomial schedule


@dataclasses.dataclass(frozen=True)
class TrainPlan:
  """Static facts about a params tree under a `Spec`: which leaves are pruned, and how much."""

  treedef: Any
  shapes: tuple[tuple[int, ...], ...]  # every leaf, flatten order
  prunable: tuple[int, ...]  # indices of masked leaves
  pooled: tuple[bool, ...]  # per prunable leaf: ranked in the global pool
  init_row: tuple[int, ...]  # the prune counts (like a table row) at the initial sparsity
  table: np.ndarray  # [scheduled updates, prunable + 1] prune counts (last: pool total)


def _check_choice(name: str, value, valid: tuple) -> None:
  if value not in valid:
    raise ValueError(f"{name}={value!r} is not valid; choose one of {valid}")


def check_spec(spec: Spec) -> Spec:
  """Validates every field (ValueError naming it) and returns `spec` with rules as a tuple."""
  rules_lib.check_sparsity(spec.sparsity, "sparsity")
  rules_lib.check_sparsity(spec.initial, "initial")
  if spec.initial > spec.sparsity:
    raise ValueError(f"initial={spec.initial} must not exceed the target sparsity "
                     f"{spec.sparsity} (valid: [0, {spec.sparsity}])")
  schedules.check_steps(begin_step=spec.begin_step, end_step=spec.end_step, every=spec.every,
                        aligned=spec.scheduled)
  if spec.scheduled:
    schedules.polynomial_sparsity(0, initial=spec.initial, final=spec.sparsity,
                                  begin_step=spec.begin_step, end_step=spec.end_step,
                                  every=spec.every, power=spec.power)
  _check_choice("scope", spec.scope, masks_lib.SCOPES)
  _check_choice("distribution", spec.distribution, dist_lib.DISTRIBUTIONS)
  if spec.scope == "global" and spec.distribution != "uniform":
    raise ValueError(f"distribution={spec.distribution!r} sets per-layer sparsities; it "
                     "needs scope='layerwise' (global scope ranks all layers together)")
  schedules.cosine_drop_fraction(0, initial=spec.drop_fraction, end_step=max(spec.end_step, 1))
  if isinstance(spec.seed, bool) or not isinstance(spec.seed, int):
    raise ValueError(f"seed={spec.seed!r} must be an integer")
  rules = tuple((rx, s) for rx, s in spec.rules)
  return dataclasses.replace(spec, rules=rules)


def _levels(spec: Spec, paths: list, target: dict, rule_spec: dict, shapes: dict,
            level: float) -> list[int]:
  """Per prunable leaf layerwise prune counts, then the pooled total, at sparsity `level`."""
  sizes = {p: int(np.prod(shapes[p])) for p in paths}
  shared = {p: shapes[p] for p in paths if rule_spec[p] == rules_lib.PRUNE}
  dens = dist_lib.densities(spec.distribution, shared, level) if shared else {}
  out = []
  for p in paths:
    if p in shared:
      s = 1.0 - dens[p]
    else:  # a per-rule override scales with the schedule, reaching its own target at the end
      s = target[p] * level / spec.sparsity if spec.sparsity else 0.0
    out.append(masks_lib.n_pruned(min(max(s, 0.0), 1.0), sizes[p]))
  return out + [masks_lib.n_pruned(level, sum(sizes[p] for p in shared))]


@functools.lru_cache(maxsize=64)
def _make_plan(spec: Spec, treedef, shapes: tuple, dtypes: tuple) -> TrainPlan:
  tree = jax.tree_util.tree_unflatten(
      treedef, [jax.ShapeDtypeStruct(s, d) for s, d in zip(shapes, dtypes, strict=True)])
  paths, _, _, target, rule_spec = masks_lib.plan(tree, spec.sparsity, spec.rules)
  prunable = tuple(i for i, p in enumerate(paths) if target[p] is not None)
  if not prunable:
    raise ValueError(f"no param is prunable under rules={list(spec.rules)} and the default "
                     "rules (only 2-D .../kernel leaves by default)")
  ppaths = [paths[i] for i in prunable]
  pshapes = {paths[i]: shapes[i] for i in prunable}
  pooled = tuple(spec.scope == "global" and rule_spec[p] == rules_lib.PRUNE for p in ppaths)
  levels = functools.partial(_levels, spec, ppaths, target, rule_spec, pshapes)
  steps = schedules.update_steps(begin_step=spec.begin_step, end_step=spec.end_step,
                                 every=spec.every) if spec.scheduled else []
  rows = [levels(schedules.polynomial_sparsity(
      step, initial=spec.initial, final=spec.sparsity, begin_step=spec.begin_step,
      end_step=spec.end_step, every=spec.every, power=spec.power)) for step in steps]
  rows = rows or [levels(spec.sparsity)]
  return TrainPlan(treedef, shapes, prunable, pooled, tuple(levels(spec.initial)),
                np.asarray(rows, np.int32))


def make_plan(spec: Spec, params) -> TrainPlan:
  """The (cached) `TrainPlan` of a params tree (arrays or ShapeDtypeStructs)."""
  _, leaves, treedef = flatten(params)
  return _make_plan(spec, treedef, tuple(tuple(x.shape) for x in leaves),
                 tuple(jnp.dtype(x.dtype).name for x in leaves))

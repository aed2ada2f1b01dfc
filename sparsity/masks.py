"""Mask trees and exact top-k pruning criteria (magnitude, random).

A mask tree has the params' structure: a boolean array (True = keep) for every
pruned leaf and `None` for dense leaves. Masks are exact: a leaf at sparsity s
with n entries has exactly `n_pruned(s, n)` False entries. Scores are ranked
with a stable sort, so ties go to the lower flat index (it is pruned first);
a global ranking orders leaves by tree-flatten (sorted path) order.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
from jaxtyping import Array, Bool

from model.nm_array import is_nmarray
from model.qarray import is_qarray
from model.tree import flatten, is_weight_leaf
from sparsity import rules as rules_lib

SCOPES = ("layerwise", "global")


def n_pruned(sparsity: float, size: int) -> int:
  """Number of entries pruned at `sparsity` out of `size` (nearest integer, halves up)."""
  return min(size, math.floor(sparsity * size + 0.5))


def _rank(score: Array) -> Array:
  """Position of each entry (along the last axis) in a stable ascending sort."""
  order = jnp.argsort(score, axis=-1, stable=True)
  return jnp.argsort(order, axis=-1, stable=True)


@functools.partial(jax.jit, static_argnames="axis")
def _keep(score: Array, k: Array, axis: int | None) -> Array:
  # k is traced: one compile per (shape, axis), reused across sparsities.
  if axis is None:
    return (_rank(score.reshape(-1)) >= k).reshape(score.shape)
  return jnp.moveaxis(_rank(jnp.moveaxis(score, axis, -1)) >= k, -1, axis)


def keep_mask(score: Array, sparsity: float, *, axis: int | None = None) -> Bool[Array, "..."]:
  """True for all but the `n_pruned(sparsity, n)` lowest scores.

  Args:
    score: importance per entry (higher = keep).
    sparsity: fraction to prune, in [0, 1).
    axis: None ranks over all entries; an int ranks along that axis separately
      for every slice (e.g. axis=0 of an [in, out] kernel: per output unit).
  """
  sparsity = rules_lib.check_sparsity(sparsity)
  score = jnp.asarray(score, jnp.float32)
  n = score.size if axis is None else score.shape[axis]
  return _keep(score, n_pruned(sparsity, n), axis)


def global_keep_masks(scores: Sequence[Array], sparsity: float) -> list[Array]:
  """Masks pruning the `n_pruned(sparsity, total)` lowest scores over all arrays jointly."""
  sparsity = rules_lib.check_sparsity(sparsity)
  flat = jnp.concatenate([jnp.asarray(s, jnp.float32).reshape(-1) for s in scores])
  keep = _keep(flat, n_pruned(sparsity, flat.size), None)
  out, start = [], 0
  for s in scores:
    out.append(keep[start:start + s.size].reshape(s.shape))
    start += s.size
  return out


def plan(params, sparsity: float, rules: rules_lib.Rules = ()):
  """(paths, leaves, treedef, per-path target sparsity or None, per-path rule spec)."""
  sparsity = rules_lib.check_sparsity(sparsity)
  paths, leaves, treedef = flatten(params)
  spec = rules_lib.resolve(paths, rules)
  target = rules_lib.targets(spec, sparsity)
  for path, leaf in zip(paths, leaves, strict=True):
    if target[path] is not None and is_qarray(leaf):
      raise ValueError(f"param {path} is already quantized; prune before quantizing")
    if target[path] is not None and is_nmarray(leaf):
      raise ValueError(f"param {path} is already N:M compressed; prune before compressing")
  return paths, leaves, treedef, target, spec


def masks_from_scores(params, score_fn, sparsity: float, *, rules: rules_lib.Rules = (),
                      scope: str = "layerwise"):
  """Mask tree from per-leaf scores `score_fn(path, leaf, index) -> score`.

  With scope="global", all leaves at the recipe's sparsity (rule spec PRUNE)
  share one ranking; leaves with a per-rule sparsity override are ranked alone.
  """
  if scope not in SCOPES:
    raise ValueError(f"scope={scope!r} is not valid; choose one of {SCOPES}")
  paths, leaves, treedef, target, spec = plan(params, sparsity, rules)
  out: list[Array | None] = [None] * len(leaves)
  shared = []
  for i, (path, leaf) in enumerate(zip(paths, leaves, strict=True)):
    if target[path] is None:
      continue
    if scope == "global" and spec[path] == rules_lib.PRUNE:
      shared.append(i)
    else:
      out[i] = keep_mask(score_fn(path, leaf, i), target[path])
  if shared:
    scores = [score_fn(paths[i], leaves[i], i) for i in shared]
    for i, m in zip(shared, global_keep_masks(scores, sparsity), strict=True):
      out[i] = m
  return jax.tree_util.tree_unflatten(treedef, out)


def magnitude_masks(params, sparsity: float, *, rules: rules_lib.Rules = (),
                    scope: str = "layerwise"):
  """Keeps the largest |w|: per tensor (layerwise) or over all selected tensors (global)."""
  return masks_from_scores(params, lambda path, w, i: jnp.abs(w), sparsity, rules=rules,
                           scope=scope)


def random_masks(params, sparsity: float, *, key: Array, rules: rules_lib.Rules = ()):
  """Uniformly random masks, exactly `sparsity` per tensor; leaf i uses fold_in(key, i)."""
  if key is None:
    raise ValueError("random pruning needs key= (a jax.random key); got None")
  score = lambda path, w, i: _uniform(key, i, w.shape)
  return masks_from_scores(params, score, sparsity, rules=rules)


@functools.partial(jax.jit, static_argnums=2)
def _uniform(key: Array, i: int, shape: tuple[int, ...]) -> Array:
  return jax.random.uniform(jax.random.fold_in(key, i), shape)


def apply_masks(params, masks):
  """Zeros the pruned entries (mask False); dense leaves (mask None) pass through."""

  def one(p, m):
    if m is None:
      return p
    if tuple(m.shape) != tuple(p.shape):
      raise ValueError(f"mask shape {tuple(m.shape)} does not match param shape "
                       f"{tuple(p.shape)}")
    return jnp.where(m, p, jnp.zeros((), p.dtype))

  return jax.tree.map(one, params, masks, is_leaf=is_weight_leaf)


def mask_sparsity(masks) -> float:
  """Fraction of False entries over all masked leaves (0.0 when nothing is masked)."""
  ms = [m for m in jax.tree.leaves(masks)]
  total = sum(int(m.size) for m in ms)
  return 1.0 - sum(int(jnp.sum(m)) for m in ms) / total if total else 0.0

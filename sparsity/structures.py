"""Structured keep masks from a score array: N:M groups and b_in x b_out tiles (exact counts).

N:M follows the paper convention: at most n NON-ZEROS are kept in every group
of m consecutive entries along `axis` (2:4 keeps 2 of 4, 1:4 keeps 1 of 4 = 75%
sparse; n == m keeps everything). For an `[in, out]` kernel the groups run
along axis 0, the input axis, separately for every output. Scores are ranked
with a stable sort, so among equal scores the lower index is pruned first (the
same rule as `sparsity.masks`). Masks are boolean, True = keep.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Bool

from sparsity import masks as masks_lib
from sparsity import rules as rules_lib


def _is_int(value) -> bool:
  return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def check_nm(n, m, size: int | None = None, *, what: str = "the grouped axis") -> tuple[int, int]:
  """Returns (n, m) as ints, or raises ValueError unless 1 <= n <= m and m divides `size`."""
  if not _is_int(m) or m < 1:
    raise ValueError(f"m={m!r} must be a positive int (the N:M group size)")
  if not _is_int(n) or not 1 <= n <= m:
    raise ValueError(f"n={n!r} must be an int in the range [1, m={m}] (entries kept per group)")
  if size is not None and size % m:
    raise ValueError(f"m={m} must divide {what} (length {size})")
  return int(n), int(m)


def _check_score(score, name: str = "score", ndim: int | None = None) -> Array:
  score = jnp.asarray(score)
  if not (jnp.issubdtype(score.dtype, jnp.floating) or jnp.issubdtype(score.dtype, jnp.integer)):
    raise ValueError(f"{name} must be a real numeric array, got dtype {score.dtype}")
  if score.ndim < 1 or (ndim is not None and score.ndim != ndim):
    want = f"{ndim}-D" if ndim is not None else "at least 1-D"
    raise ValueError(f"{name} must be {want}, got shape {tuple(score.shape)}")
  if jnp.issubdtype(score.dtype, jnp.floating) and bool(_any_nan(score)):
    raise ValueError(f"{name} contains NaN values")
  return score.astype(jnp.float32)


@jax.jit
def _any_nan(x: Array) -> Array:
  return jnp.any(jnp.isnan(x))


def _check_axis(axis, ndim: int) -> int:
  if not _is_int(axis) or not -ndim <= axis < ndim:
    raise ValueError(f"axis={axis!r} must be an int in the range [{-ndim}, {ndim - 1}]")
  return int(axis) % ndim


def stable_rank(x: Array) -> Array:
  """Position of each entry (along the last axis) in a stable ascending sort."""
  order = jnp.argsort(x, axis=-1, stable=True)
  return jnp.argsort(order, axis=-1, stable=True)


@functools.partial(jax.jit, static_argnames=("m", "axis"))
def _nm_keep(score: Array, n: Array, m: int, axis: int) -> Array:
  # n is traced: one compile per (shape, m, axis) serves every n.
  s = jnp.moveaxis(score, axis, -1)
  groups = s.reshape(*s.shape[:-1], s.shape[-1] // m, m)
  keep = (stable_rank(groups) >= m - n).reshape(s.shape)
  return jnp.moveaxis(keep, -1, axis)


def nm_mask(score: Array, n: int, m: int, *, axis: int = 0) -> Bool[Array, "..."]:
  """Keeps the n highest scores of every group of m consecutive entries along `axis`.

  Exactly n entries are kept per group (ties: the lower index is pruned first);
  n == m keeps everything. m must divide `score.shape[axis]`.
  """
  score = _check_score(score)
  axis = _check_axis(axis, score.ndim)
  n, m = check_nm(n, m, score.shape[axis], what=f"score.shape[{axis}]")
  return _nm_keep(score, jnp.int32(n), m, axis)


def is_nm(mask: Array, n: int, m: int, axis: int = 0) -> bool:
  """True iff every group of m consecutive entries along `axis` has at most n non-zeros.

  `mask` may be a boolean keep mask or a pruned weight (non-zero = kept).
  """
  mask = np.asarray(mask)
  if mask.ndim < 1:
    raise ValueError(f"mask must be at least 1-D, got shape {tuple(mask.shape)}")
  axis = _check_axis(axis, mask.ndim)
  n, m = check_nm(n, m, mask.shape[axis], what=f"mask.shape[{axis}]")
  kept = np.moveaxis(mask != 0, axis, -1)
  counts = kept.reshape(*kept.shape[:-1], kept.shape[-1] // m, m).sum(-1)
  return bool(np.all(counts <= n))


@functools.partial(jax.jit, static_argnames=("bi", "bo"))
def _block_keep(score: Array, k: Array, bi: int, bo: int) -> Array:
  rows, cols = score.shape
  tiles = score.reshape(rows // bi, bi, cols // bo, bo).sum(axis=(1, 3))
  keep = (stable_rank(tiles.reshape(-1)) >= k).reshape(tiles.shape)
  return jnp.repeat(jnp.repeat(keep, bi, axis=0), bo, axis=1)


def block_mask(score: Array, sparsity: float, block: tuple[int, int]) -> Bool[Array, "r c"]:
  """Prunes the `n_pruned(sparsity, n_tiles)` whole b_in x b_out tiles with the lowest score sum.

  A tile's score is the sum of `score` over it; tiles are ranked in row-major
  tile order with a stable sort (ties: the earlier tile is pruned first).
  `block = (b_in, b_out)` must divide `score`'s two dims.
  """
  score = _check_score(score, ndim=2)
  sparsity = rules_lib.check_sparsity(sparsity)
  if (not isinstance(block, (tuple, list)) or len(block) != 2
      or not all(_is_int(b) and b >= 1 for b in block)):
    raise ValueError(f"block={block!r} must be a pair of positive ints (b_in, b_out)")
  rows, cols = score.shape
  bi, bo = int(block[0]), int(block[1])
  if rows % bi or cols % bo:
    raise ValueError(f"block={tuple(block)} must divide the score shape {(rows, cols)}")
  k = masks_lib.n_pruned(sparsity, (rows // bi) * (cols // bo))
  return _block_keep(score, jnp.int32(k), bi, bo)

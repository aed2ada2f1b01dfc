"""N:M and block keep masks: exact counts, stable tie-breaking, validity check, bad inputs."""

from __future__ import annotations

import numpy as np
import pytest

from sparsity import structures
from sparsity.masks import n_pruned


def _oracle_nm(score, n, m, axis=0):
  """Brute force: in each group prune the m - n lowest, ties to the lower index (lexsort)."""
  s = np.moveaxis(np.asarray(score, np.float32), axis, -1)
  keep = np.ones(s.shape, bool)
  for idx in np.ndindex(*s.shape[:-1]):
    for g in range(0, s.shape[-1], m):
      grp = s[idx][g:g + m]
      order = np.lexsort((np.arange(m), grp))
      for j in order[:m - n]:
        keep[idx + (g + j,)] = False
  return np.moveaxis(keep, -1, axis)


@pytest.mark.parametrize("n,m", [(2, 4), (1, 4), (4, 8), (3, 3), (1, 1)])
def test_nm_mask_keeps_exactly_n_per_group(n, m):
  score = np.random.default_rng(0).standard_normal((24, 5))
  keep = np.asarray(structures.nm_mask(score, n, m))
  assert keep.dtype == bool and keep.shape == score.shape
  np.testing.assert_array_equal(keep.reshape(24 // m, m, 5).sum(1), n)
  np.testing.assert_array_equal(keep, _oracle_nm(score, n, m))
  assert structures.is_nm(keep, n, m)


def test_nm_mask_keeps_the_highest_scores():
  score = np.array([[0.1, 5.0], [0.4, -1.0], [0.3, 2.0], [0.2, 3.0]])
  keep = np.asarray(structures.nm_mask(score, 2, 4))
  np.testing.assert_array_equal(keep, [[False, True], [True, False], [True, False],
                                       [False, True]])


def test_nm_mask_ties_prune_the_lower_index_first():
  score = np.random.default_rng(1).integers(0, 3, (16, 7)).astype(np.float32)
  keep = np.asarray(structures.nm_mask(score, 2, 4))
  np.testing.assert_array_equal(keep, _oracle_nm(score, 2, 4))
  np.testing.assert_array_equal(np.asarray(structures.nm_mask(np.ones((4, 1)), 1, 4))[:, 0],
                                [False, False, False, True])


@pytest.mark.parametrize("axis", [1, -1])
def test_nm_mask_along_another_axis(axis):
  score = np.random.default_rng(2).standard_normal((3, 8))
  keep = np.asarray(structures.nm_mask(score, 1, 4, axis=axis))
  np.testing.assert_array_equal(keep, _oracle_nm(score, 1, 4, axis=1))
  assert structures.is_nm(keep, 1, 4, axis=axis) and structures.is_nm(keep.T, 1, 4, axis=0)
  assert not structures.is_nm(~keep, 1, 4, axis=axis)


def test_is_nm():
  mask = np.array([[1, 0], [1, 0], [0, 1], [0, 0]], bool)
  assert structures.is_nm(mask, 2, 4) and structures.is_nm(mask, 3, 4)
  assert not structures.is_nm(mask, 1, 4) and structures.is_nm(mask, 1, 2) is False
  pruned = np.array([[0.5, 0.0], [-2.0, 0.0], [0.0, 0.0], [0.0, 3.0]])
  assert structures.is_nm(pruned, 2, 4) and not structures.is_nm(pruned, 1, 2)


@pytest.mark.parametrize("s", [0.0, 0.25, 0.5, 0.6, 0.9])
def test_block_mask_prunes_exact_tile_counts(s):
  score = np.abs(np.random.default_rng(3).standard_normal((12, 8)))
  keep = np.asarray(structures.block_mask(score, s, (3, 2)))
  tiles = keep.reshape(4, 3, 4, 2).transpose(0, 2, 1, 3).reshape(16, 6)
  assert np.all(tiles.all(1) | ~tiles.any(1)), "a tile is partly pruned"
  assert (~tiles.all(1)).sum() == n_pruned(s, 16)
  # The pruned tiles are those with the lowest score sums (ties: earlier tile first).
  sums = score.reshape(4, 3, 4, 2).sum((1, 3)).reshape(-1)
  order = np.lexsort((np.arange(16), sums))
  want = np.ones(16, bool)
  want[order[:n_pruned(s, 16)]] = False
  np.testing.assert_array_equal(tiles.all(1), want)


def test_block_mask_ties_and_hand_example():
  score = np.array([[1.0, 1.0, 5.0, 0.0], [0.0, 1.0, 0.0, 0.0]])  # tile sums: 3, 5
  np.testing.assert_array_equal(np.asarray(structures.block_mask(score, 0.5, (2, 2))),
                                [[False, False, True, True], [False, False, True, True]])
  keep = np.asarray(structures.block_mask(np.ones((2, 4)), 0.5, (1, 2)))  # equal sums
  np.testing.assert_array_equal(keep, [[False, False, False, False], [True, True, True, True]])


@pytest.mark.parametrize("kwargs,match", [
    (dict(n=3, m=2), "n=3"), (dict(n=0, m=4), "n=0"), (dict(n=2, m=0), "m=0"),
    (dict(n=True, m=4), "n=True"), (dict(n=2.0, m=4), "n=2.0"), (dict(n=1, m=3), "m=3"),
    (dict(n=1, m=4, axis=2), "axis=2"),
])
def test_nm_mask_rejects_bad_arguments(kwargs, match):
  with pytest.raises(ValueError, match=match):
    structures.nm_mask(np.ones((8, 2)), **kwargs)
  if "axis" not in kwargs:
    with pytest.raises(ValueError, match=match):
      structures.is_nm(np.ones((8, 2), bool), **kwargs)


def test_masks_reject_bad_scores():
  with pytest.raises(ValueError, match="score contains NaN"):
    structures.nm_mask(np.array([[np.nan], [1.0]]), 1, 2)
  with pytest.raises(ValueError, match="score must be"):
    structures.nm_mask(np.float32(1.0), 1, 1)
  with pytest.raises(ValueError, match="score must be 2-D"):
    structures.block_mask(np.ones(8), 0.5, (2, 2))


@pytest.mark.parametrize("sparsity,block,match", [
    (1.0, (2, 2), "sparsity=1.0"), (-0.1, (2, 2), "sparsity=-0.1"), ("0.5", (2, 2), "sparsity"),
    (0.5, (3, 2), r"block=\(3, 2\)"), (0.5, (2, 3), r"block=\(2, 3\)"),
    (0.5, (0, 2), r"block=\(0, 2\)"), (0.5, (2,), r"block=\(2,\)"),
])
def test_block_mask_rejects_bad_arguments(sparsity, block, match):
  with pytest.raises(ValueError, match=match):
    structures.block_mask(np.ones((4, 4)), sparsity, block)

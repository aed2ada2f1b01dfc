"""ERK densities vs the closed form (with capping); uniform; exact per-layer counts."""

import math

import pytest

from sparsity import distributions as dist

SHAPES = {"a/kernel": (64, 64), "b/kernel": (64, 256), "c/kernel": (256, 64), "d/kernel": (8, 4)}


def _total_density(shapes, dens):
  n = {p: math.prod(s) for p, s in shapes.items()}
  return sum(dens[p] * n[p] for p in shapes) / sum(n.values())


def test_erk_closed_form_without_capping():
  shapes = {k: v for k, v in SHAPES.items() if k != "d/kernel"}
  dens = dist.erk_densities(shapes, 0.8)
  ratio = {p: sum(s) / math.prod(s) for p, s in shapes.items()}
  eps = 0.2 * sum(math.prod(s) for s in shapes.values()) / sum(
      ratio[p] * math.prod(s) for p, s in shapes.items())
  for p in shapes:
    assert dens[p] == pytest.approx(eps * ratio[p], rel=1e-12)
  assert _total_density(shapes, dens) == pytest.approx(0.2, rel=1e-12)
  assert dens["b/kernel"] == pytest.approx(dens["c/kernel"])  # (n_in + n_out) is symmetric
  assert dens["a/kernel"] / dens["b/kernel"] == pytest.approx((128 / 4096) / (320 / 16384))


def test_erk_caps_small_layers_and_rescales_the_rest():
  dens = dist.erk_densities(SHAPES, 0.8)
  # The 8x4 layer's ratio (12/32) times eps would exceed 1: it is dense.
  assert dens["d/kernel"] == 1.0
  rest = {k: v for k, v in SHAPES.items() if k != "d/kernel"}
  budget = 0.2 * sum(math.prod(s) for s in SHAPES.values()) - 32
  ratio = {p: sum(s) / math.prod(s) for p, s in rest.items()}
  eps = budget / sum(ratio[p] * math.prod(s) for p, s in rest.items())
  for p in rest:
    assert dens[p] == pytest.approx(eps * ratio[p], rel=1e-12) and dens[p] < 1
  assert _total_density(SHAPES, dens) == pytest.approx(0.2, rel=1e-12)


def test_erk_iterates_until_every_density_fits():
  shapes = {"tiny/kernel": (2, 2), "small/kernel": (4, 8), "big/kernel": (512, 512)}
  dens = dist.erk_densities(shapes, 0.5)
  assert dens["tiny/kernel"] == dens["small/kernel"] == 1.0
  assert 0 < dens["big/kernel"] < 1
  assert _total_density(shapes, dens) == pytest.approx(0.5, rel=1e-12)
  assert dist.erk_densities(shapes, 0.0) == {p: 1.0 for p in shapes}


def test_counts_hit_the_target_within_rounding():
  for s in (0.5, 0.8, 0.9, 0.95):
    for name in dist.DISTRIBUTIONS:
      dens = dist.densities(name, SHAPES, s)
      pruned = dist.prune_counts(SHAPES, dens)
      total = sum(math.prod(v) for v in SHAPES.values())
      assert abs(sum(pruned.values()) - s * total) <= len(SHAPES) / 2
  assert dist.uniform_densities(SHAPES, 0.25) == {p: 0.75 for p in SHAPES}


def test_bad_input():
  with pytest.raises(ValueError, match="sparsity=1.0 is outside the valid range"):
    dist.erk_densities(SHAPES, 1.0)
  with pytest.raises(ValueError, match="distribution='normal' is not valid"):
    dist.densities("normal", SHAPES, 0.5)
  with pytest.raises(ValueError, match="at least one prunable"):
    dist.erk_densities({}, 0.5)

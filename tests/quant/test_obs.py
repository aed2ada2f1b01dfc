"""The OBS column solver: damped inverse Cholesky (dead channels, retry), the blocked sweep."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from quant import obs

IN, OUT = 32, 16


def _layer(seed=0, dead=()):
  """Kernel [in, out] and correlated inputs X [tokens, in], float32, fixed seed."""
  rng = np.random.default_rng(seed)
  mix = np.eye(IN) + 0.7 * rng.standard_normal((IN, IN)) / np.sqrt(IN)
  x = rng.standard_normal((128, 3)) @ rng.standard_normal((3, IN)) + rng.standard_normal(
      (128, IN)) @ mix
  x[:, list(dead)] = 0.0
  return rng.standard_normal((IN, OUT)).astype(np.float32), x.astype(np.float32)


def _err(w, w_hat, x):
  return float(np.linalg.norm(np.asarray(x, np.float64) @ (
      np.asarray(w, np.float64) - np.asarray(w_hat, np.float64))))


def _rtn(scale, row, i):
  """Symmetric int4 fake quantization of one input row, per-output scales."""
  return jnp.clip(jnp.round(row / scale), -8, 7) * scale


def _int4(w):
  scale = np.abs(w).max(0) / 7
  return jax.tree_util.Partial(_rtn, jnp.asarray(scale, jnp.float32)), scale


def _on_grid(values, scale):
  codes = values / scale
  return np.all(np.abs(codes - np.round(codes)) < 1e-3) and np.all((codes > -8.01)
                                                                    & (codes < 7.01))


# ----------------------------------------------------------------------------- factor


def test_factor_is_the_upper_cholesky_of_the_damped_inverse():
  w, x = _layer()
  h = x.T @ x
  fac = obs.damped_inverse_cholesky(h, percdamp=0.05)
  u = np.asarray(fac.hinv_upper, np.float64)
  np.testing.assert_array_equal(np.tril(u, -1), 0.0)
  assert np.all(np.diag(u) > 0) and not np.asarray(fac.dead).any()
  damp = 0.05 * np.mean(np.diag(h.astype(np.float64)))
  assert fac.percdamp == 0.05 and fac.damp == pytest.approx(damp, rel=1e-5)
  want = np.linalg.inv(h.astype(np.float64) + damp * np.eye(IN))
  np.testing.assert_allclose(u.T @ u, want, atol=1e-4 * np.abs(want).max())


def test_dead_channels_are_decoupled_and_zeroed():
  w, x = _layer(dead=(3, 17))
  fac = obs.damped_inverse_cholesky(x.T @ x)
  np.testing.assert_array_equal(np.flatnonzero(fac.dead), [3, 17])
  u = np.asarray(fac.hinv_upper)
  np.testing.assert_allclose(u[3, 3], 1 / np.sqrt(1 + fac.damp), rtol=1e-5)
  np.testing.assert_array_equal(u[3, 4:], 0.0)
  res = obs.obs_sweep(w, fac.hinv_upper, blocksize=8, dead=fac.dead)
  got = np.asarray(res.kernel)
  np.testing.assert_array_equal(got[[3, 17]], 0.0)
  np.testing.assert_allclose(np.delete(got, [3, 17], 0), np.delete(w, [3, 17], 0), atol=1e-5)
  extra = obs.damped_inverse_cholesky(x.T @ x, dead=np.arange(IN) == 5)  # marked dead as well
  np.testing.assert_array_equal(np.flatnonzero(extra.dead), [3, 5, 17])


def test_singular_hessian_succeeds_after_retry():
  h = np.ones((4, 4), np.float32)  # rank 1, positive diagonal: singular at tiny damping
  fac = obs.damped_inverse_cholesky(h, percdamp=1e-9)
  assert fac.percdamp > 1e-9 and np.all(np.isfinite(np.asarray(fac.hinv_upper)))
  tries = np.log10(fac.percdamp / 1e-9)
  assert tries == pytest.approx(round(tries)) and 1 <= round(tries) <= 4
  with pytest.raises(ValueError, match=r"hessian \(4x4\) stays singular after 0 damping retries"):
    obs.damped_inverse_cholesky(h, percdamp=1e-9, max_retries=0)


def test_never_factorisable_hessian_raises():
  with pytest.raises(ValueError, match=r"stays singular after 4 damping retries \(percdamp up to "
                                       r"100"):
    obs.damped_inverse_cholesky(-np.eye(4, dtype=np.float32))


@pytest.mark.parametrize("hessian,kw,match", [
    (np.ones(4), {}, "hessian must be a square"), (np.ones((4, 3)), {}, "hessian must be a square"),
    (np.diag([1.0, np.nan, 1.0, 1.0]), {}, "hessian contains NaN"),
    (np.diag([1.0, np.inf, 1.0, 1.0]), {}, "hessian contains NaN or Inf"),
    (np.eye(4), dict(percdamp=0.0), "percdamp=0.0"), (np.eye(4), dict(percdamp=-0.1), "percdamp"),
    (np.eye(4), dict(percdamp=float("nan")), "percdamp=nan"),
    (np.eye(4), dict(percdamp=True), "percdamp=True"),
    (np.eye(4), dict(max_retries=-1), "max_retries=-1"),
    (np.eye(4), dict(dead=np.zeros(3, bool)), "dead must be"),
    (np.eye(4), dict(dead=np.zeros(4)), "dead must be"),
])
def test_factor_rejects_bad_arguments(hessian, kw, match):
  with pytest.raises(ValueError, match=match):
    obs.damped_inverse_cholesky(hessian, **kw)


# ----------------------------------------------------------------------------- sweep


@pytest.fixture(scope="module")
def layer():
  w, x = _layer(1)
  return w, x, obs.damped_inverse_cholesky(x.T @ x)


def test_sweep_without_pruning_or_quantizing_is_the_identity(layer):
  w, _, fac = layer
  res = obs.obs_sweep(w, fac.hinv_upper, blocksize=8)
  np.testing.assert_allclose(res.kernel, w, atol=1e-5)
  assert bool(res.keep.all()) and float(res.loss) == 0.0


def test_quantize_only_sweep_is_blocking_invariant_and_beats_rtn(layer):
  """GPTQ-style use: no pruning; lazy batching is exact, so the block size (with a padded last
  block) does not change the result, and the OBS updates beat plain rounding."""
  w, x, fac = layer
  quantize, scale = _int4(w)
  small = obs.obs_sweep(w, fac.hinv_upper, blocksize=5, quantize=quantize)
  whole = obs.obs_sweep(w, fac.hinv_upper, blocksize=IN, quantize=quantize)
  assert _on_grid(np.asarray(small.kernel), scale)
  # Near-halfway rounding may flip a few codes between the two float orders.
  same = np.isclose(np.asarray(small.kernel), np.asarray(whole.kernel), atol=1e-4)
  assert same.mean() >= 0.99
  assert _err(w, small.kernel, x) < 0.9 * _err(w, np.asarray(_rtn(scale, w, 0)), x)


def test_quantize_accepts_a_plain_function(layer):
  w, _, fac = layer
  quantize, scale = _int4(w)
  plain = obs.obs_sweep(w, fac.hinv_upper, blocksize=5, quantize=lambda r, i: quantize(r, i))
  part = obs.obs_sweep(w, fac.hinv_upper, blocksize=5, quantize=quantize)
  np.testing.assert_allclose(plain.kernel, part.kernel, atol=1e-6)


def test_joint_prune_and_quantize(layer):
  w, x, fac = layer
  quantize, scale = _int4(w)
  prune = obs.Prune.unstructured(0.5)
  joint = obs.obs_sweep(w, fac.hinv_upper, blocksize=8, prune=prune, quantize=quantize)
  kern, keep = np.asarray(joint.kernel), np.asarray(joint.keep)
  np.testing.assert_array_equal(kern[~keep], 0.0)
  assert _on_grid(kern[keep], np.broadcast_to(scale, kern.shape)[keep])
  assert (~keep).sum() == IN * OUT // 2
  pruned = obs.obs_sweep(w, fac.hinv_upper, blocksize=8, prune=prune)
  separate = np.where(pruned.keep, _rtn(scale, pruned.kernel, 0), 0.0)
  assert _err(w, kern, x) < _err(w, separate, x)
  # The summed loss is half the damped-Hessian error of the whole sweep (exact decomposition).
  d = w.astype(np.float64) - kern
  hd = x.T.astype(np.float64) @ x + fac.damp * np.eye(IN)
  np.testing.assert_allclose(float(joint.loss), 0.5 * np.einsum("io,ij,jo->", d, hd, d),
                             rtol=1e-3)


def test_nm_sweep_masks(layer):
  w, _, fac = layer
  res = obs.obs_sweep(w, fac.hinv_upper, blocksize=16, prune=obs.Prune.nm(1, 4))
  keep, kern = np.asarray(res.keep), np.asarray(res.kernel)
  np.testing.assert_array_equal(keep.reshape(IN // 4, 4, OUT).sum(1), 1)
  np.testing.assert_array_equal(kern[~keep], 0.0)
  assert np.all(kern[keep] != 0)


@pytest.mark.parametrize("kw,match", [
    (dict(kernel=np.ones(IN)), "kernel must be a 2-D"),
    (dict(kernel=np.full((IN, OUT), np.nan)), "kernel contains NaN"),
    (dict(hinv_upper=np.eye(IN - 1)), r"hinv_upper shape \(31, 31\)"),
    (dict(hinv_upper=np.full((IN, IN), np.inf)), "hinv_upper contains NaN or Inf"),
    (dict(blocksize=0), "blocksize=0"), (dict(blocksize=4.0), "blocksize=4.0"),
    (dict(prune=0.5), "prune=0.5"), (dict(quantize="int4"), "quantize='int4'"),
    (dict(prune=obs.Prune.nm(2, 3)), "m=3 must divide"),
    (dict(prune=obs.Prune.nm(2, 4), blocksize=6), "blocksize=6 must be a multiple of m=4"),
    (dict(dead=np.zeros(IN)), "dead must be"),
])
def test_sweep_rejects_bad_arguments(kw, match):
  args = dict(kernel=np.ones((IN, OUT), np.float32), hinv_upper=np.eye(IN, dtype=np.float32))
  args.update(kw)
  with pytest.raises(ValueError, match=match):
    obs.obs_sweep(args.pop("kernel"), args.pop("hinv_upper"), **args)


@pytest.mark.parametrize("kw,match", [
    (dict(sparsity=1.0), "sparsity=1.0"), (dict(sparsity=-0.5), "sparsity=-0.5"),
    (dict(sparsity="half"), "sparsity='half'"), (dict(), "exactly one"),
    (dict(sparsity=0.5, n=2, m=4), "exactly one"), (dict(n=5, m=4), "n=5"),
    (dict(n=0, m=4), "n=0"), (dict(n=2, m=0), "m=0"), (dict(n=2), "m=None"),
])
def test_prune_spec_rejects_bad_arguments(kw, match):
  with pytest.raises(ValueError, match=match):
    obs.Prune(**kw)


def test_unstructured_ties_prune_the_lower_flat_index_first():
  """All scores equal (identity factor, no updates): each block prunes its first rows."""
  res = obs.obs_sweep(np.ones((IN, OUT), np.float32), np.eye(IN, dtype=np.float32), blocksize=8,
                      prune=obs.Prune.unstructured(0.5))
  want = np.tile(np.arange(8) >= 4, IN // 8)[:, None].repeat(OUT, 1)
  np.testing.assert_array_equal(res.keep, want)
  np.testing.assert_array_equal(res.kernel, want.astype(np.float32))
  res = obs.obs_sweep(np.ones((IN, OUT), np.float32), np.eye(IN, dtype=np.float32), blocksize=8,
                      prune=obs.Prune.unstructured(0.3))  # int(128 * 0.3) = 38 per block
  keep = np.asarray(res.keep).reshape(IN // 8, 8 * OUT)
  np.testing.assert_array_equal(keep, np.arange(8 * OUT)[None].repeat(IN // 8, 0) >= 38)


def test_padded_rows_do_not_reach_the_quantizer_loss():
  """A quantizer with quantize(0) != 0: the padded rows of a short last block add no loss."""
  shift = lambda r, i: r + 1.0
  a = obs.obs_sweep(np.zeros((IN, OUT), np.float32), np.eye(IN, dtype=np.float32), blocksize=5,
                    quantize=shift)
  np.testing.assert_allclose(a.kernel, 1.0)
  assert float(a.loss) == pytest.approx(0.5 * IN * OUT)

"""PDP soft masks: quantile threshold, exact hardening, gradients through the mask."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import model
import sparsity
from sparsity import pdp

CFG = model.get_preset("test")


def test_soft_mask_threshold_is_the_target_quantile():
  w = jax.random.normal(jax.random.key(0), (40, 25))
  for s in (0.3, 0.5, 0.9):
    m = np.asarray(pdp.soft_mask(w, s, tau=0.05))
    k = sparsity.n_pruned(s, w.size)
    assert (m < 0.5).sum() == k  # exactly the k smallest w^2 fall below one half
    small = np.argsort(np.asarray(w).reshape(-1) ** 2, kind="stable")[:k]
    assert (m.reshape(-1)[small] < 0.5).all()
  assert (np.asarray(pdp.soft_mask(w, 0.0, tau=0.05)) == 1).all()
  sharp, soft = pdp.soft_mask(w, 0.5, tau=1e-3), pdp.soft_mask(w, 0.5, tau=1.0)
  assert float(jnp.mean(jnp.minimum(sharp, 1 - sharp))) < float(jnp.mean(
      jnp.minimum(soft, 1 - soft)))


def test_harden_gives_exact_sparsity(params):
  hard, masks = pdp.harden(params, 0.6)
  paths, ms, _ = model.flatten(masks, is_leaf=lambda x: x is None)
  ws = model.flatten(hard)[1]
  assert sum(m is not None for m in ms) == 14  # the 2-D kernels of both layers
  for path, m, w in zip(paths, ms, ws, strict=True):
    if m is not None:
      assert int((~np.asarray(m)).sum()) == sparsity.n_pruned(0.6, m.size), path
      assert (np.asarray(w)[~np.asarray(m)] == 0).all()
  assert hard["embed"]["embedding"] is params["embed"]["embedding"]  # dense leaves untouched
  # The hard mask keeps exactly the entries whose soft mask is >= 1/2.
  q = params["layers_0"]["attn"]["q"]["kernel"]
  np.testing.assert_array_equal(np.asarray(pdp.soft_mask(q, 0.6, tau=0.1) >= 0.5),
                                np.asarray(masks["layers_0"]["attn"]["q"]["kernel"]))


def test_gradients_flow_through_the_soft_mask():
  k = jax.random.split(jax.random.key(1), 4)
  params = {"l0": {"kernel": jax.random.normal(k[0], (8, 16))},
            "l1": {"kernel": jax.random.normal(k[1], (16, 4))},
            "norm": {"scale": jnp.ones(16)}}
  batch = {"x": jax.random.normal(k[2], (32, 8)), "y": jax.random.normal(k[3], (32, 4))}

  def mse(cfg, p, b):
    h = jnp.tanh(b["x"] @ p["l0"]["kernel"]) * p["norm"]["scale"]
    return jnp.mean((h @ p["l1"]["kernel"] - b["y"]) ** 2), {}

  loss_fn = pdp.pdp_loss(mse, sparsity=0.5, tau=0.1)
  grad = jax.jit(jax.value_and_grad(lambda p, f: f(None, p, batch)[0]), static_argnums=1)
  loss, grads = grad(params, loss_fn)
  dense_loss, dense_grads = grad(params, mse)
  assert np.isfinite(float(loss)) and float(loss) != float(dense_loss)
  g = np.asarray(grads["l0"]["kernel"])
  assert np.isfinite(g).all() and (g != 0).mean() > 0.9  # pruned-side weights get gradients
  assert not np.allclose(g, np.asarray(dense_grads["l0"]["kernel"]))
  assert (np.asarray(grads["norm"]["scale"]) != 0).all()
  assert 0.3 < pdp.soft_density(params, 0.5, tau=0.1) < 0.7


def test_bad_input():
  with pytest.raises(ValueError, match="tau=0 must be a finite number > 0"):
    pdp.pdp_loss(lambda *a: None, sparsity=0.5, tau=0)
  with pytest.raises(ValueError, match="sparsity=1.5 is outside"):
    pdp.pdp_loss(lambda *a: None, sparsity=1.5)

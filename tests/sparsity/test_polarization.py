"""Polarization gates: folding is exact, the regularizer polarizes, hardening shrinks exactly."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import model
from sparsity import polarization

CFG = model.get_preset("test")


def _logits(cfg, params, tokens):
  return model.apply(cfg, params, tokens)[0]


def test_fold_is_the_gated_model(params):
  tokens = jnp.arange(12)[None] % CFG.vocab_size
  gated = polarization.with_gates(CFG, params)
  np.testing.assert_allclose(_logits(CFG, polarization.fold(gated), tokens),
                             _logits(CFG, params, tokens), atol=1e-6)
  g = jax.random.uniform(jax.random.key(1), (CFG.ffn_dim,))
  gated[polarization.GATES]["layers_1"] = g
  manual = jax.tree.map(lambda x: x, params)
  manual["layers_1"]["mlp"]["down"]["kernel"] = params["layers_1"]["mlp"]["down"]["kernel"] * g[
      :, None]
  np.testing.assert_allclose(_logits(CFG, polarization.fold(gated), tokens),
                             _logits(CFG, manual, tokens), atol=1e-6)


def test_regularizer_splits_gates_into_zero_and_one():
  g = {"layers_0": jax.random.uniform(jax.random.key(0), (64,), minval=0.3, maxval=0.7)}
  grad = jax.jit(jax.grad(lambda g: polarization.regularizer(g, t=0.5)))
  for _ in range(400):
    g = jax.tree.map(lambda x, d: jnp.clip(x - 2.0 * d, 0.0, 1.0), g, grad(g))
  x = np.asarray(g["layers_0"])
  assert ((x < 0.05) | (x > 0.95)).all()
  assert 0 < (x < 0.05).sum() < x.size  # two groups, not a collapse
  # t >= 1 only shrinks: every gate goes down.
  h = {"layers_0": jnp.full((8,), 0.5).at[0].set(0.9)}
  d = jax.grad(lambda g: polarization.regularizer(g, t=2.0))(h)["layers_0"]
  assert (np.asarray(d) > 0).all()


def test_harden_shrinks_to_the_largest_gates(params):
  gated = polarization.with_gates(CFG, params)
  g = jax.random.uniform(jax.random.key(2), (CFG.ffn_dim,))
  gated[polarization.GATES] = {f"layers_{i}": g for i in range(CFG.n_layers)}
  small_cfg, small, report = polarization.harden(CFG, gated, 0.5)
  assert small_cfg.ffn_dim == CFG.ffn_dim // 2 == report["ffn_dim_after"]
  kept = np.argsort(-np.asarray(g))[:CFG.ffn_dim // 2]
  zeroed = jnp.zeros_like(g).at[kept].set(g[kept])
  masked = dict(gated, **{polarization.GATES: {k: zeroed for k in gated[polarization.GATES]}})
  tokens = jnp.arange(10)[None] % CFG.vocab_size
  np.testing.assert_allclose(_logits(small_cfg, small, tokens),
                             _logits(CFG, polarization.fold(masked), tokens), atol=1e-5)


def test_loss_trains_gates_and_bad_input(params):
  def nll(cfg, p, batch):
    logits = model.apply(cfg, p, batch)[0]
    return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(
        logits[:, :-1], batch[:, 1:])), {}

  loss_fn = polarization.polarization_loss(nll, strength=0.1, t=0.5)
  gated = polarization.with_gates(CFG, params)
  tokens = jax.random.randint(jax.random.key(3), (2, 16), 0, CFG.vocab_size)
  (loss, metrics), grads = jax.value_and_grad(lambda p: loss_fn(CFG, p, tokens),
                                              has_aux=True)(gated)
  assert np.isfinite(loss) and "polarization" in metrics
  assert float(jnp.abs(grads[polarization.GATES]["layers_0"]).sum()) > 0
  with pytest.raises(ValueError, match="t=0"):
    polarization.polarization_loss(nll, t=0)
  with pytest.raises(ValueError, match="no 'neuron_gates'"):
    polarization.fold(params)
  with pytest.raises(ValueError, match="already hold"):
    polarization.with_gates(CFG, gated)
  with pytest.raises(ValueError, match="sparsity"):
    polarization.harden(CFG, gated, 1.0)

"""Masked optimizer: pruned weights stay exactly zero; masks checkpoint with the state."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest

import model
import sparsity

CFG = model.get_preset("test")
STEPS = 6


@pytest.fixture(scope="module")
def setup(params):
  pruned, masks, _ = sparsity.prune_with_masks(params, "magnitude:0.5")
  tokens = jax.random.randint(jax.random.key(1), (2, 17), 0, CFG.vocab_size)
  return params, pruned, masks, tokens


def _loss(params, tokens):
  logits = model.apply(CFG, params, tokens[:, :-1])[0]
  return optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:]).mean()


def _trainer(opt, tokens):
  """A jitted k-step loop (one compile), run from several starting (params, state)."""

  @jax.jit
  def train(params, state):
    def step(carry, _):
      params, state = carry
      loss, grads = jax.value_and_grad(_loss)(params, tokens)
      updates, state = opt.update(grads, state, params)
      return (optax.apply_updates(params, updates), state), loss

    (params, state), losses = jax.lax.scan(step, (params, state), length=STEPS)
    return params, state, losses

  return train


def _pairs(params, masks):
  flat_m = jax.tree_util.tree_flatten_with_path(masks, is_leaf=lambda x: x is None)[0]
  flat_p = jax.tree.leaves(params)
  return [(np.asarray(p), None if m is None else np.asarray(m))
          for (_, m), p in zip(flat_m, flat_p, strict=True)]


def test_masked_adamw_keeps_pruned_weights_exactly_zero(setup):
  params, pruned, masks, tokens = setup
  # Large lr and weight decay: any leak into pruned entries would show.
  adamw = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(3e-2, weight_decay=0.5))
  opt = sparsity.masked(adamw, masks)
  train = _trainer(opt, tokens)
  # From pruned params, and from dense ones (the first update zeroes the pruned entries).
  for start in (pruned, params):
    trained, state, losses = train(start, opt.init(start))
    assert losses[-1] < losses[0]
    assert isinstance(state, sparsity.MaskedState)
    for (w, m), (w0, _) in zip(_pairs(trained, masks), _pairs(pruned, masks), strict=True):
      if m is None:
        assert (w != w0).any()  # dense leaves train
      else:
        assert (w[~m] == 0).all()
        assert (w[m] != w0[m]).mean() > 0.9  # kept weights train
  # Control (same compiled loop): all-True masks in the state let AdamW move the
  # pruned weights off zero, so the checks above can fail.
  state = opt.init(pruned)
  state = state._replace(masks=jax.tree.map(jnp.ones_like, state.masks))
  trained, _, _ = train(pruned, state)
  leaked = [(w[~m] != 0).mean() for w, m in _pairs(trained, masks) if m is not None]
  assert min(leaked) > 0.5


def test_masks_checkpoint_with_orbax(setup, tmp_path):
  params, pruned, masks, _ = setup
  opt = sparsity.masked(optax.adamw(1e-3), masks)
  state = opt.init(pruned)
  ckptr = ocp.StandardCheckpointer()
  ckptr.save(tmp_path / "opt", state)
  ckptr.wait_until_finished()
  target = jax.eval_shape(opt.init, pruned)
  restored = ckptr.restore(tmp_path / "opt", target)
  assert isinstance(restored, sparsity.MaskedState)
  got = sparsity.masks_from_state(restored)
  for (_, m), (_, g) in zip(_pairs(pruned, masks), _pairs(pruned, got), strict=True):
    if m is None:
      assert g is None
    else:
      assert g.dtype == bool
      np.testing.assert_array_equal(g, m)
  with pytest.raises(ValueError, match="MaskedState"):
    sparsity.masks_from_state(optax.adamw(1e-3).init(params))


def test_masked_init_is_abstract_friendly(setup):
  """`jax.eval_shape(opt.init, abstract_params)` (as the trainer does) gives bool masks."""
  _, _, masks, _ = setup
  opt = sparsity.masked(optax.adamw(1e-3), masks)
  state = jax.eval_shape(opt.init, model.param_shapes(CFG))
  q = state.masks["layers_0"]["attn"]["q"]["kernel"]
  assert q.shape == (64, 64) and q.dtype == jnp.bool_
  assert state.masks["embed"]["embedding"].shape == ()


def test_masked_rejects_wrong_mask_shape(setup):
  params, _, masks, _ = setup
  bad = jax.tree.map(lambda m: m, masks)
  bad["layers_0"]["attn"]["q"]["kernel"] = jnp.ones((3, 3), bool)
  with pytest.raises(ValueError, match="mask shape"):
    sparsity.masked(optax.sgd(0.1), bad).init(params)

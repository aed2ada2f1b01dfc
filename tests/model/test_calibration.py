"""Calibration capture: statistics equal hand-computed ones; sequential sees compressed blocks."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import model
from model import calibration

CFG = model.get_preset("test")


@pytest.fixture(scope="module")
def params():
  return model.init(CFG, jax.random.key(0))


def _tokens(seed, b=2, t=16):
  return jax.random.randint(jax.random.key(seed), (b, t), 0, CFG.vocab_size)


def _rms(x, scale):
  x = x.astype(jnp.float32)
  return scale * x * jax.lax.rsqrt(jnp.mean(x * x, -1, keepdims=True) + CFG.norm_eps)


def test_every_kernel_has_statistics(params):
  stats = calibration.calibrate(CFG, params, [_tokens(0)])
  kernels = [p for p in model.flatten(params)[0] if p.endswith("/kernel")]
  assert sorted(stats) == sorted(kernels)
  for p, s in stats.items():
    n_in = s.sq_norm.shape[0]
    assert s.xtx.shape == (n_in, n_in)
    np.testing.assert_allclose(np.diag(s.xtx), s.sq_norm, rtol=1e-5)
    np.testing.assert_allclose(s.xtx, s.xtx.T, rtol=1e-5, atol=1e-6)
    assert int(s.count) == 32


def test_first_layer_inputs_equal_hand_computation(params):
  tokens = _tokens(1)
  stats = calibration.calibrate(CFG, params, [tokens])
  x = jnp.take(params["embed"]["embedding"], tokens, axis=0)
  xq = _rms(x, params["layers_0"]["attn_norm"]["scale"]).reshape(-1, CFG.d_model)
  for name in ("q", "k", "v"):
    s = stats[f"layers_0/attn/{name}/kernel"]
    np.testing.assert_allclose(s.xtx, xq.T @ xq, rtol=1e-4, atol=1e-4)
  np.testing.assert_allclose(stats["layers_0/attn/q/kernel"].x_norm,
                             jnp.linalg.norm(xq, axis=0), rtol=1e-5)


def test_inputs_equal_flax_captured_intermediates(params):
  """q/k/v see attn_norm's output, gate/up mlp_norm's, down silu(gate) * up (Flax capture)."""
  tokens = _tokens(2)
  stats = calibration.calibrate(CFG, params, [tokens])
  _, inter = model.Transformer(CFG).apply({"params": params}, tokens,
                                          capture_intermediates=True, mutable=["intermediates"])
  inter = inter["intermediates"]

  def xtx(x):
    x = x.reshape(-1, x.shape[-1])
    return x.T @ x

  for i in range(CFG.n_layers):
    layer = inter[f"layers_{i}"]
    attn_in = layer["attn_norm"]["__call__"][0]
    mlp_in = layer["mlp_norm"]["__call__"][0]
    gate = layer["mlp"]["gate"]["__call__"][0]
    up = layer["mlp"]["up"]["__call__"][0]
    expect = {"attn/q": xtx(attn_in), "attn/v": xtx(attn_in), "mlp/up": xtx(mlp_in),
              "mlp/down": xtx(jax.nn.silu(gate) * up)}
    for name, ref in expect.items():
      np.testing.assert_allclose(stats[f"layers_{i}/{name}/kernel"].xtx, ref, rtol=1e-4,
                                 atol=1e-4)


def test_lm_head_or_tied_input_is_final_norm():
  cfg = CFG.replace(tie_embeddings=False)
  params = model.init(cfg, jax.random.key(3))
  tokens = _tokens(3)
  stats = calibration.calibrate(cfg, params, [tokens])
  h, _ = model.hidden_states(cfg, params, tokens)
  x = _rms(h, params["final_norm"]["scale"]).reshape(-1, cfg.d_model)
  np.testing.assert_allclose(stats["lm_head/kernel"].xtx, x.T @ x, rtol=1e-4, atol=1e-4)


def test_batches_add_and_paths_filter(params):
  a, b = _tokens(4), _tokens(5)
  both = calibration.calibrate(CFG, params, [a, b])
  joint = calibration.calibrate(CFG, params, [jnp.concatenate([a, b])])
  for p in both:
    np.testing.assert_allclose(both[p].xtx, joint[p].xtx, rtol=1e-4, atol=1e-4)
    assert int(both[p].count) == int(joint[p].count) == 64
  only = calibration.calibrate(CFG, params, [a], paths=["layers_1/mlp/up/kernel"],
                               hessian=False)
  assert list(only) == ["layers_1/mlp/up/kernel"] and only["layers_1/mlp/up/kernel"].xtx is None


def test_padding_segments_are_excluded(params):
  short = _tokens(6, t=10)
  padded = jnp.concatenate([short, jnp.zeros((2, 6), jnp.int32)], axis=1)
  seg = jnp.concatenate([jnp.ones((2, 10), jnp.int32), jnp.zeros((2, 6), jnp.int32)], axis=1)
  ref = calibration.calibrate(CFG, params, [short])
  got = calibration.calibrate(CFG, params, [{"tokens": padded, "segment_ids": seg}])
  for p in ref:
    np.testing.assert_allclose(got[p].xtx, ref[p].xtx, rtol=1e-4, atol=1e-4)
    assert int(got[p].count) == 20


def test_sequential_identity_equals_one_pass(params):
  batches = [_tokens(7), _tokens(8)]
  ref = calibration.calibrate(CFG, params, batches)
  seen = {}

  def keep(layer, block, stats):
    seen.update(stats)
    return block

  out = calibration.calibrate_sequential(CFG, params, batches, keep)
  assert sorted(seen) == sorted(p for p in ref if p.startswith("layers_"))
  for p, s in seen.items():
    np.testing.assert_allclose(s.xtx, ref[p].xtx, rtol=1e-4, atol=1e-4)
  jax.tree.map(np.testing.assert_array_equal, out, params)


def test_sequential_sees_the_compressed_earlier_blocks(params):
  batches = [_tokens(9)]

  def zero_mlp(layer, block, stats):
    del stats
    block = jax.tree.map(lambda x: x, block)
    if layer == 0:
      block["mlp"]["down"]["kernel"] = jnp.zeros_like(block["mlp"]["down"]["kernel"])
    return block

  seen = {}

  def record_then_zero(layer, block, stats):
    seen.update(stats)
    return zero_mlp(layer, block, stats)

  out = calibration.calibrate_sequential(CFG, params, batches, record_then_zero)
  assert float(jnp.abs(out["layers_0"]["mlp"]["down"]["kernel"]).max()) == 0.0
  ref = calibration.calibrate(CFG, out, batches)  # one pass over the compressed model
  orig = calibration.calibrate(CFG, params, batches)
  p = "layers_1/attn/q/kernel"
  np.testing.assert_allclose(seen[p].xtx, ref[p].xtx, rtol=1e-4, atol=1e-4)
  assert not np.allclose(seen[p].xtx, orig[p].xtx, rtol=1e-3)


def test_check_stats_and_bad_input(params):
  with pytest.raises(ValueError, match="batches"):
    calibration.calibrate(CFG, params, None)
  with pytest.raises(ValueError, match="at least one batch"):
    calibration.calibrate(CFG, params, [])
  with pytest.raises(ValueError, match="vocabulary"):
    calibration.calibrate(CFG, params, [jnp.full((1, 4), CFG.vocab_size)])
  with pytest.raises(ValueError, match="integer array"):
    calibration.calibrate(CFG, params, [jnp.zeros((4,), jnp.int32)])
  with pytest.raises(ValueError, match="not param paths"):
    calibration.calibrate(CFG, params, [_tokens(0)], paths=["nope/kernel"])
  stats = calibration.calibrate(CFG, params, [_tokens(0)], hessian=False)
  with pytest.raises(ValueError, match="no X\\^T X"):
    calibration.check_stats(stats, ["layers_0/attn/q/kernel"], hessian=True)
  with pytest.raises(ValueError, match="no entry"):
    calibration.check_stats(stats, ["layers_9/attn/q/kernel"])
  bad = {"a": calibration.KernelStats(None, jnp.array([jnp.nan]), jnp.array(3))}
  with pytest.raises(ValueError, match="NaN"):
    calibration.check_stats(bad, ["a"])

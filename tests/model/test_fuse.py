"""Fused decode-time projections (q / k / v -> qkv, gate / up -> gate_up) are exact."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import model
from model.nm_array import compress_nm
from model.nm_array import decompress as decompress_nm
from model.qarray import dequantize
from quant.rtn import quantize_tensor

BASE = model.get_preset("test").replace(n_layers=1)
FAMILIES = {
    "gqa": BASE,
    "mqa": BASE.replace(n_kv_heads=1),
    "qwen2-biases": BASE.replace(qkv_bias=True),
    "qwen3-qk-norm": BASE.replace(qk_norm=True, n_kv_heads=4),
}


def _randomize_biases(params, key):
  """Non-zero q/k/v biases (init leaves them at zero, which would hide a misplaced one)."""
  def f(path, x):
    name = jax.tree_util.keystr(path)
    return jax.random.normal(jax.random.fold_in(key, hash(name) % 2**31), x.shape) * 0.1 \
        if "bias" in name else x
  return jax.tree_util.tree_map_with_path(f, params)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_fused_equals_unfused_logits_and_greedy_tokens(family):
  cfg = FAMILIES[family]
  params = _randomize_biases(model.init(cfg, jax.random.key(0)), jax.random.key(1))
  fused = model.fuse_projections(params)
  fcfg = cfg.replace(fused_projections=True)
  attn = fused["layers_0"]["attn"]
  assert set(attn) >= {"qkv", "o"} and not set(attn) & {"q", "k", "v"}
  assert ("bias" in attn["qkv"]) == cfg.qkv_bias
  assert fused["layers_0"]["mlp"]["gate_up"]["kernel"].shape == (cfg.d_model, 2 * cfg.ffn_dim)
  tokens = jax.random.randint(jax.random.key(2), (2, 9), 0, cfg.vocab_size)
  want = model.apply(cfg, params, tokens)[0]
  got = model.apply(fcfg, fused, tokens)[0]
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)

  def greedy(c, p, n=6):
    cache = model.init_cache(c, 2, 16)
    step = jax.jit(lambda p, t, cache: model.apply(c, p, t, cache=cache))
    logits, cache = step(p, tokens[:, :5], cache)
    out = []
    for _ in range(n):
      nxt = jnp.argmax(logits[:, -1], axis=-1)[:, None]
      out.append(nxt)
      logits, cache = step(p, nxt, cache)
    return np.asarray(jnp.concatenate(out, 1))

  np.testing.assert_array_equal(greedy(fcfg, fused), greedy(cfg, params))


@pytest.mark.parametrize("kw", [
    dict(bits=8), dict(bits=4, group_size=16), dict(bits=4, group_size=16, symmetric=False),
    dict(bits=8, axis=(0, 1)), dict(fmt="nf4", group_size=16), dict(fmt="e4m3"),
])
def test_fused_qarrays_dequantize_to_the_fused_float_kernel(kw):
  rng = np.random.default_rng(0)
  parts = [jnp.asarray(rng.normal(size=(64, n)), jnp.float32) for n in (32, 16, 16)]
  q = [quantize_tensor(w, **kw) for w in parts]
  fused = model.fuse.concat_columns(q, "test")
  assert fused.shape == (64, 64)
  want = jnp.concatenate([dequantize(x) for x in q], axis=1)
  np.testing.assert_array_equal(dequantize(fused), want)


def test_fused_w8a8_dot_is_exact_and_mixed_zero_points_fill_zeros():
  rng = np.random.default_rng(1)
  parts = [jnp.asarray(rng.normal(size=(32, n)), jnp.float32) for n in (24, 8)]
  q = [quantize_tensor(w, bits=8, axis=(0, 1)) for w in parts]  # per-tensor scales
  q = [dataclasses.replace(x, act_bits=8) for x in q]
  fused = model.fuse.concat_columns(q, "w8a8")
  x = jnp.asarray(rng.normal(size=(3, 32)), jnp.float32)
  want = jnp.concatenate([model.ops.dot(x, w) for w in q], axis=1)
  np.testing.assert_array_equal(model.ops.dot(x, fused), want)
  mixed = [quantize_tensor(parts[0], bits=4, group_size=8, symmetric=False),
           quantize_tensor(parts[1], bits=4, group_size=8)]
  fm = model.fuse.concat_columns(mixed, "mixed")
  np.testing.assert_array_equal(
      dequantize(fm), jnp.concatenate([dequantize(x) for x in mixed], axis=1))


def test_fused_nm_arrays_and_masks():
  rng = np.random.default_rng(2)
  parts = []
  for n in (16, 8):
    w = rng.normal(size=(32, n)).astype(np.float32)
    w.reshape(8, 4, n)[:, :2] = 0  # 2:4 along the input axis
    parts.append(compress_nm(jnp.asarray(w), 2, 4))
  fused = model.fuse.concat_columns(parts, "nm")
  np.testing.assert_array_equal(
      decompress_nm(fused), jnp.concatenate([decompress_nm(p) for p in parts], axis=1))
  cfg = BASE
  params = model.init(cfg, jax.random.key(0))
  masks = jax.tree.map(lambda x: (jnp.abs(x) > 0.05) if x.ndim == 2 else None, params)
  fused_masks = model.fuse_projections(masks)
  np.testing.assert_array_equal(
      fused_masks["layers_0"]["attn"]["qkv"]["kernel"],
      jnp.concatenate([masks["layers_0"]["attn"][p]["kernel"] for p in "qkv"], axis=1))


def test_fuse_errors():
  cfg = BASE
  params = model.init(cfg, jax.random.key(0))
  fused = model.fuse_projections(params)
  with pytest.raises(ValueError, match="already fused"):
    model.fuse_projections(fused)
  tokens = jnp.zeros((1, 3), jnp.int32)
  with pytest.raises(ValueError, match="fused_projections=True"):
    model.apply(cfg, fused, tokens)
  with pytest.raises(ValueError, match="model.fuse_projections"):
    model.apply(cfg.replace(fused_projections=True), params, tokens)
  mixed = [quantize_tensor(jnp.ones((32, 8)), bits=8), quantize_tensor(jnp.ones((32, 8)), bits=4)]
  with pytest.raises(ValueError, match="must share format, bits"):
    model.fuse.concat_columns(mixed, "layers_0/attn/kernel")
  with pytest.raises(ValueError, match="cannot fuse leaves of types"):
    model.fuse.concat_columns([mixed[0], jnp.ones((32, 8))], "x")


def test_decode_params_follows_the_measured_pick_per_backend():
  cfg = FAMILIES["gqa"]
  params = model.init(cfg, jax.random.key(0))
  assert model.ops.pick_projection_layout(1, "cpu") == "separate"
  assert model.ops.pick_projection_layout(32, "gpu") == "fused"
  same_cfg, same = model.decode_params(cfg, params, rows=8, backend="cpu")
  assert same_cfg is cfg and same is params
  fcfg, fused = model.decode_params(cfg, params, rows=8, backend="gpu")
  assert fcfg.fused_projections and "qkv" in fused["layers_0"]["attn"]
  tokens = jnp.arange(12, dtype=jnp.int32).reshape(2, 6) % cfg.vocab_size
  np.testing.assert_allclose(model.apply(fcfg, fused, tokens)[0],
                             model.apply(cfg, params, tokens)[0], rtol=2e-5, atol=2e-5)
  assert model.decode_params(fcfg, fused, rows=1, layout="fused")[1] is fused
  with pytest.raises(ValueError, match="already fused"):
    model.decode_params(fcfg, fused, rows=1, layout="separate")
  with pytest.raises(ValueError, match="layout='halves'"):
    model.decode_params(cfg, params, rows=1, layout="halves")
  with pytest.raises(ValueError, match="rows=0"):
    model.ops.pick_projection_layout(0)

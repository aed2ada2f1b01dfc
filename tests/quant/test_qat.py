"""QAT fake quantization: RTN-exact forward, straight-through gradient, QAT == PTQ, act quant."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import model
import quant
from quant import qat

CFG = model.get_preset("test")
TOKENS = jax.random.randint(jax.random.key(1), (2, 16), 0, CFG.vocab_size)
_apply = jax.jit(lambda p, t: model.apply(CFG, p, t)[0])


@pytest.mark.parametrize("kw", [dict(bits=8), dict(bits=4), dict(bits=2),
                                dict(bits=4, group_size=16), dict(bits=4, axis=None),
                                dict(bits=8, axis=1)])
def test_forward_is_quantize_tensor_then_dequantize_bit_for_bit(kw):
  w = jax.random.normal(jax.random.key(0), (64, 24)) * jnp.linspace(0.1, 3.0, 24)
  got = np.asarray(qat.fake_quant(w, **kw))
  want = np.asarray(quant.dequantize(quant.quantize_tensor(w, **kw)))
  np.testing.assert_array_equal(got, want)
  assert len(np.unique(got[:16, 0])) <= 2 ** kw["bits"] - 1


def test_activation_forward_matches_numpy_grid():
  x = np.asarray(jax.random.normal(jax.random.key(2), (5, 40)) * 2, np.float32)
  got = np.asarray(qat.fake_quant(jnp.asarray(x), bits=4, bounds=1.5))
  s = np.float32(1.5) / np.float32(7)
  np.testing.assert_array_equal(got, np.clip(np.round(x / s), -7, 7) * s)
  got_u = np.asarray(qat.fake_quant(jnp.asarray(x), bits=4, bounds=1.5, signed=False))
  s_u = np.float32(1.5) / np.float32(15)
  np.testing.assert_array_equal(got_u, np.clip(np.round(x / s_u), 0, 15) * s_u)


@pytest.mark.parametrize("signed", [True, False])
def test_ste_gradient_is_identity_inside_and_zero_outside(signed):
  x = jnp.linspace(-3.0, 3.0, 61)
  bound = 1.7
  g = np.asarray(jax.grad(lambda v: qat.fake_quant(v, bits=8, bounds=bound,
                                                   signed=signed).sum())(x))
  lo = -bound if signed else 0.0
  inside = (np.asarray(x) >= lo) & (np.asarray(x) <= bound)
  assert 0 < inside.sum() < len(inside)
  np.testing.assert_array_equal(g, inside.astype(np.float32))
  # A general cotangent passes through unchanged inside, is dropped outside.
  ct = jax.random.normal(jax.random.key(3), x.shape)
  _, vjp = jax.vjp(lambda v: qat.fake_quant(v, bits=4, bounds=bound, signed=signed), x)
  np.testing.assert_array_equal(np.asarray(vjp(ct)[0]), np.where(inside, np.asarray(ct), 0))


def test_ste_weight_gradient_is_identity_with_per_array_bounds():
  w = jax.random.normal(jax.random.key(4), (32, 8))
  np.testing.assert_array_equal(
      np.asarray(jax.grad(lambda v: qat.fake_quant(v, bits=2).sum())(w)), np.ones((32, 8)))
  b = jnp.full((1, 8), 0.5)  # per-channel activation bounds broadcast
  g = np.asarray(jax.grad(lambda v: qat.fake_quant(v, bits=8, bounds=b).sum())(w))
  np.testing.assert_array_equal(g, (np.abs(np.asarray(w)) <= 0.5).astype(np.float32))


@pytest.mark.parametrize("recipe", ["int4", "int4:g32", "int2", "int8:tensor"])
def test_qat_forward_equals_ptq_forward(params, recipe):
  rules = qat.first_last_rules(CFG.n_layers, "int8")[:1] if recipe == "int4" else ()
  fq = qat.fake_quant_params(params, recipe, rules=rules)
  qparams, report = quant.quantize(params, recipe, rules=rules)
  assert {p for p, _ in qat.qat_plan(params, recipe, rules=rules)} == set(report["layers"])
  deq = jax.tree.map(lambda x: quant.dequantize(x) if quant.is_qarray(x) else x, qparams,
                     is_leaf=quant.is_qarray)
  jax.tree.map(np.testing.assert_array_equal, fq, deq)  # the same weights, bit for bit
  a, b = np.asarray(_apply(fq, TOKENS)), np.asarray(_apply(qparams, TOKENS))
  # Per-channel QArrays scale the f32 accumulator instead of the weights: reassociation only.
  np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
  assert np.abs(a - np.asarray(_apply(params, TOKENS))).max() > 1e-4


def test_first_last_rules_put_the_outer_blocks_at_8_bits(params):
  cfg4 = CFG.replace(n_layers=4)
  p4 = model.init(cfg4, jax.random.key(0))
  plan = dict(qat.qat_plan(p4, "int4", rules=qat.first_last_rules(4)))
  assert {p.split("/")[0] for p, s in plan.items() if s.bits == 8} == {"layers_0", "layers_3"}
  assert {p.split("/")[0] for p, s in plan.items() if s.bits == 4} == {"layers_1", "layers_2"}
  assert len(qat.first_last_rules(1)) == 1
  assert "embed/embedding" not in plan


def test_act_ranges_match_an_independent_capture(params):
  ranges = qat.act_ranges(CFG, params, [TOKENS], ["layers_0/attn/q/kernel",
                                                  "layers_0/mlp/down/kernel"])
  x = np.asarray(params["embed"]["embedding"])[np.asarray(TOKENS)]
  normed = x / np.sqrt((x * x).mean(-1, keepdims=True) + CFG.norm_eps)
  normed = normed * np.asarray(params["layers_0"]["attn_norm"]["scale"])
  assert ranges["layers_0/attn/q/kernel"] == pytest.approx(float(np.abs(normed).max()), rel=1e-5)
  assert ranges["layers_0/mlp/down/kernel"] > 0
  with pytest.raises(ValueError, match="not Dense kernels"):
    qat.act_ranges(CFG, params, [TOKENS], ["embed/embedding"])


def test_act_interceptor_quantizes_only_selected_inputs(params):
  ranges = qat.act_ranges(CFG, params, [TOKENS], ["layers_0/attn/q/kernel"])

  def logits(p, r, bits):
    with nn.intercept_methods(qat.act_quant_interceptor(r, bits)):
      return model.apply(CFG, p, TOKENS)[0]

  ref = np.asarray(model.apply(CFG, params, TOKENS)[0])
  a8 = np.asarray(logits(params, ranges, 8))
  a2 = np.asarray(logits(params, ranges, 2))
  err8, err2 = np.abs(a8 - ref).max(), np.abs(a2 - ref).max()
  assert 0 < err8 < err2
  # Tiny bounds clip every q / k / v input of block 0, the only consumers of its
  # attn_norm: the STE must then stop every gradient into that norm's scale.
  tiny = {f"layers_0/attn/{n}/kernel": 1e-6 for n in "qkv"}
  g = jax.grad(lambda p: logits(p, tiny, 8).sum())(params)
  np.testing.assert_array_equal(np.asarray(g["layers_0"]["attn_norm"]["scale"]), 0.0)
  assert np.abs(np.asarray(g["layers_0"]["mlp_norm"]["scale"])).max() > 0
  g_open = jax.grad(lambda p: logits(p, ranges, 8).sum())(params)
  assert np.abs(np.asarray(g_open["layers_0"]["attn_norm"]["scale"])).max() > 0


@pytest.mark.parametrize("kw,match", [
    (dict(bits=9), r"bits=9; valid: \[2, 3, 4, 5, 6, 7, 8\]"),
    (dict(bits=True), "bits=True"),
    (dict(bits=4, group_size=5), "group_size=5 needs axis=0 and must divide"),
    (dict(bits=4, group_size=0), "group_size=0; valid: a positive int"),
    (dict(bits=4, signed=False), "signed=False needs bounds="),
    (dict(bits=4, axis=3), "axis=3 out of range for rank 2"),
])
def test_bad_fake_quant_arguments(kw, match):
  with pytest.raises(ValueError, match=match):
    qat.fake_quant(jnp.ones((8, 4)), **kw)
  with pytest.raises(ValueError, match="x must be floating"):
    qat.fake_quant(jnp.ones((8, 4), jnp.int32), bits=4)


@pytest.mark.parametrize("recipe,match", [
    ("int4:asym", "QAT spec 'int4:asym'"), ("fp8", "QAT spec 'fp8'"),
    ("w8a8", "QAT spec 'w8a8'"), ("int4:clip=mse", "QAT spec 'int4:clip=mse'"),
])
def test_bad_qat_specs(params, recipe, match):
  with pytest.raises(ValueError, match=match):
    qat.fake_quant_params(params, recipe)
  with pytest.raises(ValueError, match="n_layers=0"):
    qat.first_last_rules(0)
  with pytest.raises(ValueError, match="already quantized"):
    qat.fake_quant_params(quant.quantize(params, "int8")[0], "int4")

"""Matryoshka quantization: the paper's slicing, exact QArrays, the multi-bit loss gradient."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import model
import quant
from quant import matryoshka as mq
from scripts import qat_lib

CFG = model.get_preset("test")
TOKENS = jax.random.randint(jax.random.key(1), (2, 16), 0, CFG.vocab_size)


def _paper(w, r, c=8):
  """NumPy transcription of MatQuant eqs. 1 and 6 (range through 0, integer zero point)."""
  w = np.asarray(w, np.float32)
  lo, hi = np.minimum(w.min(0, keepdims=True), 0), np.maximum(w.max(0, keepdims=True), 0)
  alpha = (hi - lo) / np.float32(2 ** c - 1)
  z = np.clip(np.round(-lo / alpha), 0, 2 ** c - 1)
  q = np.clip(np.round(w / alpha + z), 0, 2 ** c - 1)
  s = np.clip(np.round(q / 2 ** (c - r)), 0, 2 ** r - 1) * 2 ** (c - r)
  return q, s, (s - z) * alpha


@pytest.fixture(scope="module")
def w():
  return jax.random.normal(jax.random.key(0), (64, 16)) * jnp.linspace(0.2, 2.0, 16) + 0.1


@pytest.mark.parametrize("r", [8, 4, 2])
def test_slicing_matches_the_paper_formula(w, r):
  q_np, s_np, w_np = _paper(w, r)
  q, _, _ = mq.int8_codes(w)
  np.testing.assert_array_equal(np.asarray(q), q_np)
  np.testing.assert_array_equal(np.asarray(mq.slice_codes(q, r)), s_np)
  np.testing.assert_allclose(np.asarray(mq.sliced_weight(w, r)), w_np, rtol=1e-6, atol=1e-7)
  assert len(np.unique(s_np[:, 0])) <= 2 ** r
  if r == 8:
    np.testing.assert_array_equal(s_np, q_np)  # int8 is the code itself


@pytest.mark.parametrize("r", [8, 4, 2])
def test_sliced_qarrays_dequantize_exactly(w, r):
  q = mq.quantize_kernel(w, r)
  assert (q.bits, q.values.shape, q.shape) == (r, (64 * r // 8, 16), (64, 16))
  c = np.asarray(quant.codes(q))
  assert c.min() >= -(2 ** (r - 1)) and c.max() <= 2 ** (r - 1) - 1
  np.testing.assert_array_equal(np.asarray(quant.dequantize(q)), np.asarray(mq.sliced_weight(w, r)))
  np.testing.assert_array_equal(np.asarray(mq.fake_quant_sliced(w, r)),
                                np.asarray(mq.sliced_weight(w, r)))


def test_error_shrinks_with_bits_and_ste_is_identity(w):
  errs = [float(jnp.abs(mq.sliced_weight(w, r) - w).mean()) for r in (2, 4, 8)]
  assert errs[0] > errs[1] > errs[2] > 0
  g = jax.grad(lambda v: mq.fake_quant_sliced(v, 2).sum())(w)
  np.testing.assert_array_equal(np.asarray(g), 1.0)


def test_model_consumes_sliced_tree_and_matches_fake_quant(params):
  paths = mq.matryoshka_plan(params)
  assert "embed/embedding" not in paths and len(paths) == 7 * CFG.n_layers
  for r in (4, 2):
    qp = mq.matryoshka_quantize(params, r)
    assert sum(quant.is_qarray(x) for x in jax.tree.leaves(qp, is_leaf=quant.is_qarray)) == len(
        paths)
    a = np.asarray(model.apply(CFG, qp, TOKENS)[0])
    b = np.asarray(model.apply(CFG, mq.fake_quant_params(params, r, paths), TOKENS)[0])
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


def test_multi_bit_loss_gradient_is_finite_and_sums_the_widths(params):
  paths = mq.matryoshka_plan(params)
  batch = dict(tokens=TOKENS, positions=jnp.broadcast_to(jnp.arange(16), (2, 16)),
               segment_ids=jnp.ones((2, 16), jnp.int32))
  loss = lambda bits: qat_lib.QATModel(matryoshka=tuple((b, 1.0) for b in bits),
                                       mat_paths=paths)
  (l_all, m), g_all = jax.value_and_grad(loss((8, 4, 2)), argnums=1, has_aux=True)(
      CFG, params, batch)
  assert np.isfinite(float(l_all)) and set(m) == {"bpb_int8", "bpb_int4", "bpb_int2"}
  parts = [jax.grad(lambda p, b=b: loss((b,))(CFG, p, batch)[0])(params) for b in (8, 4, 2)]
  for leaf, *ps in zip(jax.tree.leaves(g_all), *map(jax.tree.leaves, parts), strict=True):
    assert np.all(np.isfinite(np.asarray(leaf)))
    np.testing.assert_allclose(np.asarray(leaf), sum(np.asarray(p) for p in ps), rtol=1e-4,
                               atol=1e-6)
  assert float(l_all) == pytest.approx(sum(float(loss((b,))(CFG, params, batch)[0])
                                           for b in (8, 4, 2)), rel=1e-5)


def test_bad_inputs(w):
  for bad in (3, 16, True):
    with pytest.raises(ValueError, match=rf"bits={bad!r}; valid: \[8, 4, 2\]"):
      mq.quantize_kernel(w, bad)
  with pytest.raises(ValueError, match=r"kernel shape \(6, 4\) must be 2-D"):
    mq.quantize_kernel(jnp.ones((6, 4)), 4)
  with pytest.raises(ValueError, match="expected a float"):
    mq.quantize_kernel(jnp.ones((8, 4), jnp.int32), 4)

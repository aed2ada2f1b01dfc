"""QArray leaves through `model.ops.dot` and Linen's param shape check."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax.errors import ScopeParamShapeError

import quant
from model import layers, ops

RNG = np.random.default_rng(1)
W = RNG.standard_normal((64, 24)).astype(np.float32)
X = RNG.standard_normal((2, 5, 64)).astype(np.float32)


@pytest.mark.parametrize("recipe", ["int8", "int8:asym", "int4", "int2:asym", "int8:tensor",
                                    "int4:g16", "int4:g16:asym", "fp8", "fp8_e5m2"])
def test_dot_equals_matmul_with_dequantized_weight(recipe):
  q = quant.quantize_tensor(W, **quant.parse_recipe(recipe).tensor_kwargs())
  got = jax.jit(lambda x, w: ops.dot(x, w, impl="xla"))(X, q)
  want = X @ np.asarray(quant.dequantize(q), np.float64)  # float64 oracle
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-4)
  assert got.shape == (2, 5, 24) and got.dtype == jnp.float32


def test_dot_bf16_compute_dtype():
  q = quant.quantize_tensor(W, bits=8, symmetric=False)
  got = ops.dot(X, q, dtype=jnp.bfloat16)
  want = X @ np.asarray(quant.dequantize(q), np.float64)
  assert got.dtype == jnp.bfloat16
  np.testing.assert_allclose(np.asarray(got, np.float32), want, rtol=2e-2, atol=5e-2)


class _PlainParam(nn.Module):
  """Reads its kernel with Linen's own `self.param`, as a stock Linen layer does."""

  @nn.compact
  def __call__(self, x):
    return ops.dot(x, self.param("kernel", nn.initializers.zeros, (64, 24)))


class _WeightParam(nn.Module):
  """Reads its kernel with `model.layers.weight`, as `model.layers.Dense` does."""

  @nn.compact
  def __call__(self, x):
    return ops.dot(x, layers.weight(self, "kernel", nn.initializers.zeros, (64, 24),
                                    jnp.float32))


def test_why_qarray_leaves_pass_the_param_shape_check():
  q8 = quant.quantize_tensor(W, bits=8)
  q4 = quant.quantize_tensor(W, bits=4)
  want = X @ np.asarray(quant.dequantize(q4))
  # Linen's check zips the stored leaf's pytree leaves with the initializer's: a QArray
  # flattens to (values, scale), so only values[0] is compared. int8 codes keep the
  # logical shape and pass by that accident; packed int4 codes [in/2, out] fail.
  _PlainParam().apply({"params": {"kernel": q8}}, X)
  with pytest.raises(ScopeParamShapeError, match=r"\(32, 24\)"):
    _PlainParam().apply({"params": {"kernel": q4}}, X)
  # `weight` reads an existing leaf directly and checks the LOGICAL shape (QArray.shape).
  y = _WeightParam().apply({"params": {"kernel": q4}}, X)
  np.testing.assert_allclose(y, want, rtol=1e-5, atol=1e-4)
  # ...which still rejects a weight of the wrong logical shape, packed or plain.
  bad_q = quant.quantize_tensor(W[:32], bits=4)
  for bad in (bad_q, jnp.zeros((64, 25))):
    with pytest.raises(ValueError, match=r"kernel has shape .* expects \(64, 24\)"):
      _WeightParam().apply({"params": {"kernel": bad}}, X)

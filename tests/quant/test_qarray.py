"""QArray storage: packing, bytes, RTN error bounds, pytree behaviour."""

import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings

import quant
from model.qarray import pack, unpack

W = (np.random.default_rng(0).standard_normal((64, 48)) * np.linspace(0.1, 3.0, 48)).astype(
    np.float32)
_dequantize = jax.jit(quant.dequantize)


_pack = jax.jit(pack, static_argnums=1)
_unpack = jax.jit(unpack, static_argnums=1)


@settings(max_examples=30, deadline=None)
@given(bits=st.sampled_from([2, 4]), seed=st.integers(0, 2**31 - 1))
def test_pack_unpack_round_trip(bits, seed):
  lo, hi = -(2 ** (bits - 1)), 2 ** (bits - 1)  # full signed range, extremes included
  c = np.random.default_rng(seed).integers(lo, hi, size=(16, 3))
  c[0, 0], c[1, 0] = lo, hi - 1
  packed = _pack(jnp.asarray(c, jnp.int8), bits)
  assert packed.dtype == jnp.int8 and packed.shape == (16 * bits // 8, 3)
  np.testing.assert_array_equal(_unpack(packed, bits), c)


def test_pack_layout_is_little_endian_nibbles():
  # Independent oracle: code i of each byte sits at bits [bits*i, bits*(i+1)).
  c = jnp.array([[1], [-2], [7], [-8]], jnp.int8)
  got = np.asarray(pack(c, 4)).view(np.uint8)
  np.testing.assert_array_equal(got[:, 0], [(1 & 15) | ((-2 & 15) << 4),
                                            (7 & 15) | ((-8 & 15) << 4)])


def test_int4_codes_take_half_the_bytes_of_int8():
  q8 = quant.quantize_tensor(W, bits=8)
  q4 = quant.quantize_tensor(W, bits=4)
  q2 = quant.quantize_tensor(W, bits=2)
  assert q8.values.nbytes == W.size
  assert q4.values.nbytes * 2 == q8.values.nbytes
  assert q2.values.nbytes * 4 == q8.values.nbytes
  assert q4.nbytes == q4.values.nbytes + 48 * 4  # + f32 per-channel scales
  assert q4.shape == q8.shape == W.shape


@pytest.mark.parametrize("kw", [
    dict(bits=8), dict(bits=4), dict(bits=2), dict(bits=8, axis=None),
    dict(bits=4, group_size=16), dict(bits=8, group_size=8, symmetric=False),
    dict(bits=4, symmetric=False), dict(bits=2, group_size=32, symmetric=False),
])
def test_dequantize_error_within_half_a_step(kw):
  q = quant.quantize_tensor(W, **kw)
  scale = np.repeat(q.scale, q.group_size or 1, axis=0)
  err = np.abs(W - _dequantize(q))
  assert np.all(err <= scale / 2 * (1 + 1e-5))
  expected_scale_shape = {None: (1, 48)}.get(q.group_size, (64 // (q.group_size or 1), 48))
  if kw.get("axis", 0) is None:
    expected_scale_shape = (1, 1)
  assert q.scale.shape == expected_scale_shape
  assert (q.zero is None) == kw.get("symmetric", True)
  # Codes use the whole grid: some weight reaches the largest code magnitude.
  qmax = 2 ** (kw["bits"] - 1) - 1
  assert np.abs(np.asarray(quant.codes(q), np.int32)).max() >= qmax


@pytest.mark.parametrize("fmt", ["e4m3", "e5m2"])
def test_fp8_error_within_half_an_ulp(fmt):
  q = quant.quantize_tensor(W, fmt=fmt)
  fi = jnp.finfo(q.values.dtype)
  scale = np.asarray(q.scale)
  v = W / scale  # the scaled value the float8 code rounds
  half_ulp = np.maximum(np.abs(v) * 2.0 ** -(fi.nmant + 1), float(fi.smallest_subnormal) / 2)
  err = np.abs(W - _dequantize(q))
  assert np.all(err <= half_ulp * scale * (1 + 1e-5))
  assert q.values.dtype.itemsize == 1 and q.nbytes == W.size + 48 * 4


@pytest.mark.parametrize("symmetric", [True, False])
def test_all_zero_columns_get_a_finite_nonzero_scale(symmetric):
  w = W.copy()
  w[:, 3], w[:8, 5] = 0.0, 0.0
  q = quant.quantize_tensor(w, bits=4, group_size=8, symmetric=symmetric)
  scale = np.asarray(q.scale)
  assert np.all(np.isfinite(scale)) and np.all(scale > 0)
  dq = np.asarray(_dequantize(q))
  assert np.all(dq[:, 3] == 0) and np.all(dq[:8, 5] == 0)
  assert np.all(np.abs(w - dq) <= np.repeat(scale, 8, axis=0) / 2 * (1 + 1e-5))


@pytest.mark.parametrize("kw, match", [
    (dict(bits=3), "bits=3"), (dict(fmt="nf5"), "fmt='nf5'"),
    (dict(group_size=5), "group_size=5 must divide"), (dict(group_size=8, axis=1), "axis=0"),
    (dict(fmt="e4m3", symmetric=False), "symmetric=False"), (dict(axis=2), "axis=2"),
])
def test_bad_arguments_raise(kw, match):
  with pytest.raises(ValueError, match=match):
    quant.quantize_tensor(W, **kw)
  with pytest.raises(ValueError, match="divisible by 4"):
    quant.quantize_tensor(W[:6], bits=2)
  with pytest.raises(ValueError, match="floating"):
    quant.quantize_tensor(W.astype(np.int32))


def test_qarray_is_a_pytree_through_tree_map_and_jit():
  q = quant.quantize_tensor(W, bits=4, group_size=16, symmetric=False)
  leaves = jax.tree.leaves(q)
  assert len(leaves) == 3  # values, scale, zero; everything else is static metadata
  q2 = jax.tree.map(lambda x: x, q)
  assert isinstance(q2, quant.QArray) and q2.shape == q.shape and q2.group_size == 16
  np.testing.assert_array_equal(_dequantize(q2), _dequantize(q))
  doubled = jax.jit(lambda q: jax.tree.map(lambda x: x, q).scale * 2)(q)
  np.testing.assert_array_equal(doubled, q.scale * 2)

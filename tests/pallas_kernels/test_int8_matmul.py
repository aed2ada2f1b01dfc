"""Int8 weight-only matmul: Pallas kernel (interpreted) vs reference vs a float64 oracle."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels import int8_matmul as k

# (M, K, N, (bm, bk, bn), dtype): M=1 decode, tails in every dimension, an exact
# tiling, two block choices for one shape, default blocks (shrunk to the full
# dimensions). Each case costs a compile (~1 s), so the list is short.
CASES = [
    (1, 40, 24, (8, 16, 16), "float32"),
    (1, 40, 24, (8, 16, 16), "bfloat16"),
    (13, 100, 37, (8, 32, 16), "bfloat16"),
    (13, 100, 37, (16, 64, 32), "float32"),
    (16, 64, 48, (16, 32, 16), "float32"),
]
# bf16 outputs may differ by one bf16 ulp (2^-7 relative) when the two f32
# accumulations (different summation orders) straddle a rounding boundary.
RTOL = {"float32": 1e-5, "bfloat16": 2.0**-7}


@pytest.fixture(autouse=True)
def _reset_tpu_interpreter():
  # After an exception the TPU interpreter keeps its simulated memory for
  # debugging; reset it so one failing test cannot break the next.
  yield
  pltpu.reset_tpu_interpret_mode_state()


def make(M, K, N, dtype, seed=0):
  rng = np.random.default_rng(seed)
  x = jnp.asarray(rng.normal(size=(M, K)), dtype)
  w = jnp.asarray(rng.integers(-128, 128, size=(K, N)), jnp.int8)
  s = jnp.asarray(rng.uniform(0.005, 0.05, size=(1, N)), jnp.float32)
  return x, w, s


def assert_close(out, ref, dtype):
  assert out.shape == ref.shape and out.dtype == ref.dtype
  out, ref = np.asarray(out, np.float64), np.asarray(ref, np.float64)
  assert np.isfinite(out).all()
  rtol = RTOL[jnp.dtype(dtype).name]
  np.testing.assert_allclose(out, ref, rtol=rtol, atol=rtol * np.abs(ref).max())


def dequant64(w, s):
  return np.asarray(w, np.float64) * np.asarray(s, np.float64)


def oracle(x, w, s):
  """Dequantize-then-matmul in float64 numpy."""
  return np.asarray(x, np.float64) @ dequant64(w, s)


def magnitude(x, w, s):
  """sum_k |x_mk| |w_kn s_n|: the scale of floating-point accumulation error."""
  return np.abs(np.asarray(x, np.float64)) @ np.abs(dequant64(w, s))


@pytest.mark.parametrize("M,K,N,blocks,dtype", CASES)
def test_kernel_interpret_matches_reference(M, K, N, blocks, dtype):
  x, w, s = make(M, K, N, dtype)
  bm, bk, bn = blocks
  out = k.int8_matmul(x, w, s, bm=bm, bk=bk, bn=bn, interpret=True)
  assert_close(out, k.reference(x, w, s), dtype)


@pytest.mark.parametrize("M,K,N,blocks,dtype", [
    (9, 40, 20, (8, 32, 16), "bfloat16"),  # grid (2, 2, 2), tails in M, K and N
    (1, 24, 8, (None, None, None), "float32"),  # one full block
])
def test_kernel_tpu_interpreter_matches_reference(M, K, N, blocks, dtype):
  # The TPU interpreter raises on out-of-bounds block reads and fills
  # uninitialised memory (and edge-block padding) with NaN: an unmasked K tail
  # or a missing accumulator init shows up as NaN here.
  x, w, s = make(M, K, N, dtype, seed=1)
  bm, bk, bn = blocks
  out = k.int8_matmul(x, w, s, bm=bm, bk=bk, bn=bn, interpret=pltpu.InterpretParams())
  assert_close(out, k.reference(x, w, s), dtype)


def test_kernel_two_cores_random_order_no_races():
  # Two simulated cores and a random order along the parallel (M, N) grid axes:
  # the result must not depend on the order, and the race detector stays quiet.
  from jax._src.pallas.mosaic.interpret import interpret_pallas_call as ipc

  x, w, s = make(9, 40, 20, "float32", seed=2)
  params = pltpu.InterpretParams(detect_races=True, num_cores_or_threads=2, random_seed=3)
  out = k.int8_matmul(x, w, s, bm=8, bk=32, bn=20, interpret=params)
  assert_close(out, k.reference(x, w, s), "float32")
  assert ipc.races is not None and not ipc.races.races_found


def test_kernel_matches_float64_oracle():
  x, w, s = make(13, 100, 37, "float32", seed=4)  # same compile as a CASES entry
  out = np.asarray(k.int8_matmul(x, w, s, bm=16, bk=64, bn=32, interpret=True), np.float64)
  exact = oracle(x, w, s)
  assert (np.abs(out - exact) <= 1e-5 * magnitude(x, w, s)).all()


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("M,K,N", [(1, 40, 24), (13, 100, 37), (32, 256, 96)])
def test_reference_matches_float64_oracle(M, K, N, dtype):
  x, w, s = make(M, K, N, dtype, seed=5)
  ref = k.reference(x, w, s)
  assert ref.dtype == jnp.dtype(dtype)
  exact = oracle(x, w, s)
  # f32 accumulation error (condition-scaled), plus the final rounding to x.dtype.
  out_eps = {"float32": 2.0**-24, "bfloat16": 2.0**-8}[dtype]
  bound = K * 2.0**-24 * magnitude(x, w, s) + out_eps * np.abs(exact)
  assert (np.abs(np.asarray(ref, np.float64) - exact) <= bound).all()


def test_reference_ignores_tuning_arguments():
  x, w, s = make(3, 20, 10, "float32")
  np.testing.assert_array_equal(k.reference(x, w, s, bm=8, bk=16, bn=8, interpret=True),
                                k.reference(x, w, s))


def test_fit_blocks_defaults_and_shrinking():
  assert k.fit_blocks(1, 576, 1536) == (1, 512, 512)
  assert k.fit_blocks(1000, 100, 259, 128, 256, 128) == (128, 100, 128)


def test_empty_dimension_returns_zeros():
  x, w, s = make(0, 16, 8, "float32")
  out = k.int8_matmul(x, w, s, interpret=True)
  assert out.shape == (0, 8)


@pytest.mark.parametrize("args,match", [
    (dict(x=jnp.zeros((4, 8)), w=jnp.zeros((9, 3), jnp.int8)), "K"),
    (dict(w=jnp.zeros((8, 3), jnp.int32)), "w_int8"),
    (dict(s=jnp.ones((3,))), "scale"),
    (dict(x=jnp.zeros((2, 4, 8))), "x must be"),
    (dict(x=jnp.zeros((4, 8), jnp.int32)), "x must be"),
    (dict(bk=0), "bk=0"),
])
def test_bad_arguments_raise(args, match):
  x, w, s = args.get("x", jnp.zeros((4, 8))), args.get("w", jnp.zeros((8, 3), jnp.int8)), \
      args.get("s", jnp.ones((1, 3)))
  with pytest.raises(ValueError, match=match):
    k.int8_matmul(x, w, s, bk=args.get("bk"), interpret=True)
  with pytest.raises(ValueError, match=match):
    k.reference(x, w, s, bk=args.get("bk"))


def test_compiled_path_checks_alignment_and_backend():
  x, w, s = make(16, 256, 256, "float32")
  with pytest.raises(ValueError, match="bk=64 must be a multiple of 128"):
    k.int8_matmul(x, w, s, bk=64, interpret=False)
  if jax.default_backend() != "tpu":
    with pytest.raises(ValueError, match="interpret=False compiles the Mosaic TPU kernel"):
      k.int8_matmul(x, w, s, interpret=False)


@pytest.mark.tpu
@pytest.mark.skipif(jax.default_backend() != "tpu", reason="needs a TPU")
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("M,K,N,blocks", [(1, 576, 1536, (None, None, None)),
                                          (300, 1000, 259, (128, 256, 128))])
def test_compiled_tpu_kernel_matches_reference(M, K, N, blocks, dtype):
  x, w, s = make(M, K, N, dtype, seed=6)
  bm, bk, bn = blocks
  assert_close(k.int8_matmul(x, w, s, bm=bm, bk=bk, bn=bn), k.reference(x, w, s), dtype)

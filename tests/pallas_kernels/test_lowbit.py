"""Low-bit matmul: TPU and GPU Pallas kernels (interpreted) vs reference vs a float64 oracle,
int4 packing, the TPU-faithful interpreter, cross-lowering for TPU and CUDA, bad input,
block tables."""

import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels import lowbit, lowbit_gpu, lowbit_tpu, tuning

# Tolerances against an exact value: a multiple of sum_k |x w| (accumulation and, in
# bf16 / f16, the dequantized tile's rounding to x.dtype) plus the output's rounding.
TOL = {"float32": (1e-5, 2.0**-23), "bfloat16": (2.0**-7, 2.0**-7),
       "float16": (2.0**-10, 2.0**-10)}


@pytest.fixture(autouse=True)
def _reset_tpu_interpreter():
  # After an exception the TPU interpreter keeps its simulated memory for debugging; reset
  # it so one failing test cannot break the next.
  yield
  pltpu.reset_tpu_interpret_mode_state()


def make(M, K, N, *, bits, group_size=None, zeros=False, dtype="float32", seed=0):
  """x, packed values, scales, zeros and the unpacked codes (numpy) of one case."""
  rng = np.random.default_rng(seed)
  lo, hi = (-8, 8) if bits == 4 else (-128, 128)
  codes = rng.integers(lo, hi, size=(K, N))
  if bits == 4:
    u = codes & 0xF
    packed = (u[0::2] | (u[1::2] << 4)).astype(np.uint8).view(np.int8)
  else:
    packed = codes.astype(np.int8)
  groups = K // group_size if group_size else 1
  s = jnp.asarray(rng.uniform(0.005, 0.05, size=(groups, N)), jnp.float32)
  z = jnp.asarray(rng.integers(-4, 5, size=(groups, N)), jnp.int8) if zeros else None
  x = jnp.asarray(rng.normal(size=(M, K)), dtype)
  return x, jnp.asarray(packed), s, z, codes


def dequant64(codes, s, z, group_size):
  rep = group_size or codes.shape[0]
  c = codes.astype(np.float64)
  if z is not None:
    c = c - np.repeat(np.asarray(z, np.float64), rep, axis=0)
  return c * np.repeat(np.asarray(s, np.float64), rep, axis=0)


def assert_close(out, target, x, w64, dtype):
  """|out - target| <= a * sum_k |x w| + b * |target|, finite, right shape and dtype."""
  assert out.shape == target.shape and out.dtype == jnp.dtype(dtype)
  out64, t64 = np.asarray(out, np.float64), np.asarray(target, np.float64)
  assert np.isfinite(out64).all()
  a, b = TOL[jnp.dtype(dtype).name]
  mag = np.abs(np.asarray(x, np.float64)) @ np.abs(w64)
  err = np.abs(out64 - t64)
  bound = a * mag + b * np.abs(t64) + 1e-30
  assert (err <= bound).all(), f"max err / bound {np.max(err / bound):.3g}"


def check_case(platform, M, K, N, bits, g, zeros, dtype, blocks, seed=0, interpret=True):
  x, v, s, z, codes = make(M, K, N, bits=bits, group_size=g, zeros=zeros, dtype=dtype,
                           seed=seed)
  bm, bn, bk = blocks
  kw = dict(bits=bits, group_size=g, zeros=z)
  out = lowbit.lowbit_matmul(x, v, s, **kw, interpret=interpret, platform=platform,
                             block_m=bm, block_n=bn, block_k=bk)
  w64 = dequant64(codes, s, z, g)
  assert_close(out, np.asarray(x, np.float64) @ w64, x, w64, dtype)
  assert_close(out, lowbit.reference(x, v, s, **kw), x, w64, dtype)


# (platform, M, K, N, bits, group_size, zeros, dtype, (bm, bn, bk)). Each case costs one
# interpret compile (~0.5 s), so the list is short; between them: int8 / int4, per channel
# / grouped / asymmetric, f32 / bf16 / f16, M, N and per-channel K tails, default blocks.
CASES = [
    ("tpu", 5, 72, 24, 8, None, False, "float32", (8, 16, 32)),  # tails in M, N, K
    ("tpu", 13, 128, 40, 8, 32, False, "bfloat16", (8, 16, 64)),
    ("tpu", 1, 96, 24, 4, None, False, "bfloat16", (None, None, 64)),  # K / 2 tail
    ("tpu", 5, 128, 40, 4, 32, True, "float32", (8, 16, 64)),
    ("tpu", 16, 256, 48, 4, 64, False, "float16", (None, None, None)),
    ("gpu", 5, 72, 24, 8, None, False, "float32", (16, 16, 32)),
    ("gpu", 13, 128, 40, 8, 64, True, "bfloat16", (16, 16, 32)),
    ("gpu", 1, 96, 24, 4, None, True, "bfloat16", (16, 16, 32)),
    ("gpu", 17, 128, 40, 4, 32, True, "float32", (16, 32, 32)),
]


@pytest.mark.parametrize("platform,M,K,N,bits,g,zeros,dtype,blocks", CASES)
def test_kernel_interpret_matches_oracle_and_reference(platform, M, K, N, bits, g, zeros,
                                                       dtype, blocks):
  check_case(platform, M, K, N, bits, g, zeros, dtype, blocks)


@settings(max_examples=5, deadline=None)
@given(data=st.data())
def test_tpu_kernel_drawn_shapes_and_blocks(data):
  bits = data.draw(st.sampled_from([4, 8]), label="bits")
  g = data.draw(st.sampled_from([None, 8, 16]), label="group_size")
  M, N = data.draw(st.integers(1, 20), label="M"), data.draw(st.integers(1, 40), label="N")
  if g is None:
    K = 2 * data.draw(st.integers(1, 40), label="K/2")
    bk = (2 * data.draw(st.integers(1, K // 2), label="bk/2") if bits == 4
          else data.draw(st.integers(1, K), label="bk"))
  else:
    groups = data.draw(st.integers(1, 6), label="groups")
    K = g * groups
    bk = g * data.draw(st.sampled_from([t for t in range(1, groups + 1) if groups % t == 0]),
                       label="groups per K tile")
  bm, bn = data.draw(st.integers(1, 24), label="bm"), data.draw(st.integers(1, 48), label="bn")
  zeros = data.draw(st.booleans(), label="zeros")
  check_case("tpu", M, K, N, bits, g, zeros, "float32", (bm, bn, bk), seed=M * N + K)


@settings(max_examples=4, deadline=None)
@given(data=st.data())
def test_gpu_kernel_drawn_shapes_and_blocks(data):
  bits = data.draw(st.sampled_from([4, 8]), label="bits")
  g = data.draw(st.sampled_from([None, 32, 64]), label="group_size")
  M, N = data.draw(st.integers(1, 40), label="M"), data.draw(st.integers(1, 40), label="N")
  K = (g or 2) * data.draw(st.integers(1, 3 if g else 50), label="K units")
  kmin = 32 if bits == 4 else 16
  bk = data.draw(st.sampled_from([b for b in (16, 32, 64) if b >= kmin
                                  and (g is None or g % b == 0)]), label="bk")
  bm, bn = (data.draw(st.sampled_from([16, 32]), label=n) for n in ("bm", "bn"))
  zeros = data.draw(st.booleans(), label="zeros")
  check_case("gpu", M, K, N, bits, g, zeros, "float32", (bm, bn, bk), seed=M + N * K)


def w8a8_oracle(x, w_codes, w_scale):
  """x quantized per token by `model.ops.quantize_act` (the semantics' owner; numpy's
  x / s can round a tie differently from XLA's), an exact int64 dot, then the two scales."""
  from model.ops import quantize_act

  xq, sx = quantize_act(x)
  acc = np.asarray(xq, np.int64) @ np.asarray(w_codes, np.int64)
  return acc * np.asarray(sx, np.float64) * np.asarray(w_scale, np.float64)


@pytest.mark.parametrize("platform,dtype,scale_shape,blocks", [
    ("tpu", "float32", "channel", (8, 16, 32)),
    ("tpu", "bfloat16", "tensor", (None, None, None)),
    ("gpu", "float32", "tensor", (16, 16, 32)),
    ("gpu", "bfloat16", "channel", (16, 32, 64)),
])
def test_w8a8_matches_oracle_and_reference(platform, dtype, scale_shape, blocks):
  M, K, N = 6, 80, 40
  x, w, s, _, codes = make(M, K, N, bits=8, dtype=dtype, seed=7)
  x = x.at[2].set(0)  # an all-zero row: s_x = 1, codes 0
  if scale_shape == "tensor":
    s = s[:, :1]
  bm, bn, bk = blocks
  out = lowbit.lowbit_matmul(x, w, s, bits=8, group_size=None, act_bits=8, interpret=True,
                             platform=platform, block_m=bm, block_n=bn, block_k=bk)
  exact = w8a8_oracle(x, codes, s)
  assert out.dtype == jnp.dtype(dtype)
  # The int32 accumulator is exact, so only the two f32 scale products and the output
  # rounding differ from the oracle.
  out_eps = {"float32": 2.0**-21, "bfloat16": 2.0**-8}[dtype]
  np.testing.assert_allclose(np.asarray(out, np.float64), exact, rtol=out_eps, atol=1e-30)
  ref = lowbit.reference(x, w, s, bits=8, group_size=None, act_bits=8)
  np.testing.assert_array_equal(np.asarray(out, np.float32), np.asarray(ref, np.float32))
  assert not np.asarray(out[2]).any()


def test_w8a8_matmul_kernel_and_quantize_act_match_model():
  from model.ops import quantize_act

  x, w, s, _, codes = make(9, 64, 24, bits=8, seed=8)
  xq, sx = lowbit.quantize_act(x)
  mq, ms = quantize_act(x)
  np.testing.assert_array_equal(np.asarray(xq), np.asarray(mq))
  np.testing.assert_array_equal(np.asarray(sx), np.asarray(ms))
  out = lowbit.w8a8_matmul(xq, sx, w, s, interpret=True, block_m=8, block_n=16, block_k=32)
  assert out.dtype == jnp.float32
  np.testing.assert_array_equal(np.asarray(out),
                                np.asarray(lowbit.w8a8_reference(xq, sx, w, s)))
  exact = (np.asarray(xq, np.int64) @ codes) * np.asarray(sx, np.float64) * np.asarray(
      s, np.float64)
  np.testing.assert_allclose(np.asarray(out, np.float64), exact, rtol=2.0**-21)


def test_int4_layout_matches_model_qarray_pack():
  from model import qarray

  rng = np.random.default_rng(9)
  K, N, g = 32, 12, 8
  codes = jnp.asarray(rng.integers(-8, 8, size=(K, N)), jnp.int8)
  packed = qarray.pack(codes, 4)
  _, mine, *_ = make(K, K, N, bits=4)  # the test's own packer agrees with qarray's
  np.testing.assert_array_equal(np.asarray(lowbit.unpack_int4(packed)), np.asarray(codes))
  np.testing.assert_array_equal(np.asarray(lowbit.unpack_int4(mine)),
                                np.asarray(qarray.unpack(mine, 4)))
  s = jnp.asarray(rng.uniform(0.01, 0.1, size=(K // g, N)), jnp.float32)
  z = jnp.asarray(rng.integers(-3, 4, size=(K // g, N)), jnp.int8)
  q = qarray.QArray(values=packed, scale=s, zero=z, shape=(K, N), bits=4, group_size=g)
  np.testing.assert_allclose(
      np.asarray(lowbit.dequantize(packed, s, z, bits=4, group_size=g)),
      np.asarray(qarray.dequantize(q, jnp.float32)), rtol=1e-6)


def test_model_packed_weights_through_the_kernel():
  from model import qarray

  rng = np.random.default_rng(10)
  M, K, N, g = 3, 64, 24, 16
  codes = jnp.asarray(rng.integers(-8, 8, size=(K, N)), jnp.int8)
  s = jnp.asarray(rng.uniform(0.01, 0.1, size=(K // g, N)), jnp.float32)
  q = qarray.QArray(values=qarray.pack(codes, 4), scale=s, shape=(K, N), bits=4, group_size=g)
  x = jnp.asarray(rng.normal(size=(M, K)), jnp.float32)
  out = lowbit.lowbit_matmul(x, q.values, s, bits=4, group_size=g, interpret=True,
                             block_m=8, block_n=8, block_k=32)
  w64 = np.asarray(qarray.dequantize(q, jnp.float32), np.float64)
  assert_close(out, np.asarray(x, np.float64) @ w64, x, w64, "float32")


@pytest.mark.parametrize("bits,g,zeros,act_bits,blocks", [
    (4, 16, True, None, (8, 16, 32)),  # grid (2, 2, 2) of groups, asymmetric
    (8, None, False, None, (8, 16, 32)),  # K tail masked (40 = 32 + 8)
    (8, None, False, 8, (8, 16, 32)),  # W8A8, K tail masked
])
def test_tpu_interpreter_no_races_or_oob(bits, g, zeros, act_bits, blocks):
  # The TPU-faithful interpreter raises on out-of-bounds reads, fills uninitialised memory
  # and edge padding with NaN (an unmasked tail or a missing accumulator init shows up),
  # runs the parallel grid axes on two simulated cores in random order, and detects races.
  from jax._src.pallas.mosaic.interpret import interpret_pallas_call as ipc

  M, K, N = 9, 64 if g else 40, 20
  x, v, s, z, codes = make(M, K, N, bits=bits, group_size=g, zeros=zeros, seed=11)
  params = pltpu.InterpretParams(detect_races=True, num_cores_or_threads=2, random_seed=3,
                                 out_of_bounds_reads="raise", uninitialized_memory="nan")
  bm, bn, bk = blocks
  kw = dict(bits=bits, group_size=g, zeros=z, act_bits=act_bits)
  out = lowbit.lowbit_matmul(x, v, s, **kw, interpret=params, block_m=bm, block_n=bn,
                             block_k=bk)
  assert ipc.races is not None and not ipc.races.races_found
  ref = lowbit.reference(x, v, s, **kw)
  w64 = dequant64(codes, s, z, g)
  assert_close(out, ref, x, w64, "float32")


# Cross-lowering (no device needed): the Pallas -> Mosaic and Pallas -> Triton lowerings
# run on this machine and reject unsupported ops. (bits, group_size, zeros, act_bits, K,
# TPU block_k): per channel, two K tiles plus a masked tail; grouped, two K tiles of whole
# groups. N = 384 leaves an N tail on the TPU (block_n 256).
VARIANTS = [(8, None, False, None, 640, 256), (8, 128, False, None, 1024, 256),
            (4, None, False, None, 640, 256), (4, 128, True, None, 1024, 512),
            (8, None, False, 8, 640, 256)]


@pytest.mark.parametrize("platform", ["tpu", "cuda"])
@pytest.mark.parametrize("bits,g,zeros,act_bits,K,bk_tpu", VARIANTS)
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_kernels_lower_for_tpu_and_cuda(platform, bits, g, zeros, act_bits, K, bk_tpu, dtype):
  M, N = 16, 384
  rows = K // 2 if bits == 4 else K
  groups = K // g if g else 1
  target = "tpu" if platform == "tpu" else "gpu"
  kernel = "w8a8" if act_bits else "weight_only"
  bm, bn, bk = lowbit.fit_blocks(kernel, target, M, K, N, bits=bits, group_size=g,
                                 block_m=16, block_n=256 if target == "tpu" else 64,
                                 block_k=bk_tpu if target == "tpu" else 64, compiled=True)
  mod = lowbit_tpu if target == "tpu" else lowbit_gpu
  v = jax.ShapeDtypeStruct((rows, N), jnp.int8)
  if act_bits:
    args = (jax.ShapeDtypeStruct((M, K), jnp.int8), jax.ShapeDtypeStruct((M, 1), jnp.float32),
            v, jax.ShapeDtypeStruct((1, N), jnp.float32))
    fn = lambda a, b, c, d: mod.w8a8(a, b, c, d, out_dtype=jnp.dtype(dtype), bm=bm, bn=bn,
                                     bk=bk, interpret=False)
  else:
    args = (jax.ShapeDtypeStruct((M, K), jnp.dtype(dtype)), v,
            jax.ShapeDtypeStruct((groups, N), jnp.float32),
            jax.ShapeDtypeStruct((groups, N), jnp.int8) if zeros else None)
    fn = lambda a, b, c, d: mod.weight_only(a, b, c, d, bits=bits, group_size=g, bm=bm, bn=bn,
                                            bk=bk, interpret=False)
  text = jax.jit(fn).trace(*args).lower(lowering_platforms=(platform,)).as_text()
  assert ("tpu_custom_call" in text) if target == "tpu" else ("triton" in text.lower())


def test_defaults_are_legal_compiled_blocks():
  for M, K, N in [(1, 576, 1536), (5, 100, 37), (16, 4096, 4096), (300, 2048, 8192),
                  (64, 256, 24)]:
    for platform in ("tpu", "gpu"):
      for kernel, bits, g in [("weight_only", 8, None), ("weight_only", 4, None),
                              ("weight_only", 8, 32), ("weight_only", 4, 64),
                              ("w8a8", 8, None)]:
        if g and K % g:
          continue
        d = tuning.default_blocks(kernel, M, K, N, bits=bits, group_size=g,
                                  platform=platform)
        lowbit.fit_blocks(kernel, platform, M, K, N, bits=bits, group_size=g,
                          compiled=True, **d)


def test_table_round_trip_and_nearest_bucket(tmp_path):
  path = str(tmp_path / "t.json")
  kw = dict(bits=4, group_size=128, platform="gpu")
  assert tuning.lookup("weight_only", 5, 256, 512, **kw, device_kind="X", path=path) == (
      tuning.default_blocks("weight_only", 5, 256, 512, **kw))
  table = tuning.empty_table()
  for M, bn in ((1, 32), (64, 128)):
    tuning.record(table, "weight_only", M, 256, 512, **kw, device_kind="X",
                  blocks=dict(block_m=16, block_n=bn, block_k=64), seconds=1e-5)
  tuning.write_table(path, table)
  got = lambda M: tuning.lookup("weight_only", M, 256, 512, **kw, device_kind="X", path=path)
  assert got(2)["block_n"] == 32 and got(40)["block_n"] == 128 and got(1000)["block_n"] == 128
  assert tuning.lookup("weight_only", 2, 256, 512, **kw, device_kind="Y", path=path) == (
      tuning.default_blocks("weight_only", 2, 256, 512, **kw))
  assert tuning.read_table(tuning.TABLE_PATH)["version"] == 1


def test_unfit_table_entry_gives_way_to_defaults(monkeypatch):
  monkeypatch.setattr(tuning, "lookup", lambda *a, **k: dict(block_m=5, block_n=100,
                                                              block_k=3))
  blocks = lowbit.pick_blocks("weight_only", "tpu", 16, 256, 512, bits=4, group_size=None,
                              compiled=True)
  assert blocks == tuple(tuning.default_blocks("weight_only", 16, 256, 512, bits=4,
                                               group_size=None, platform="tpu").values())


def test_platform_none_interprets_the_tpu_kernel_on_cpu(monkeypatch):
  if jax.default_backend() != "cpu":
    pytest.skip("checks the CPU default")
  calls = []
  real = lowbit_tpu.weight_only
  monkeypatch.setattr(lowbit_tpu, "weight_only", lambda *a, **k: calls.append(1) or real(*a,
                                                                                        **k))
  x, v, s, _, _ = make(2, 16, 8, bits=8)
  lowbit.lowbit_matmul(x, v, s, bits=8, group_size=None, interpret=True, block_k=16)
  assert calls


@pytest.mark.parametrize("M,K,N", [(0, 16, 8), (3, 0, 8), (3, 16, 0)])
def test_empty_dims_return_zeros(M, K, N):
  x = jnp.ones((M, K), jnp.bfloat16)
  v = jnp.zeros((K // 2, N), jnp.int8)
  out = lowbit.lowbit_matmul(x, v, jnp.ones((1, N)), bits=4, group_size=None, interpret=True)
  assert out.shape == (M, N) and out.dtype == jnp.bfloat16 and not np.asarray(out).any()


def _bad(**over):
  x, v, s, z, _ = make(4, 32, 16, bits=8, group_size=8)
  kw = dict(x=x, values=v, scales=s, bits=8, group_size=8, zeros=None, act_bits=None,
            interpret=True)
  kw.update(over)
  return kw


BAD = [
    (dict(x=jnp.ones((4, 32), jnp.int32)), "x must be a 2-D array"),
    (dict(x=jnp.ones((32,))), "x must be a 2-D array"),
    (dict(bits=3), "bits=3; valid"),
    (dict(values=jnp.ones((32, 16), jnp.float32)), "values must be a 2-D int8"),
    (dict(values=jnp.ones((30, 16), jnp.int8)), r"values.shape\[0\]=30 must equal"),
    (dict(bits=4, values=jnp.ones((32, 16), jnp.int8)), r"values.shape\[0\]=32 must be K // 2"),
    (dict(group_size=12), "group_size=12 must divide K=32"),
    (dict(group_size=-1), "group_size=-1"),
    (dict(group_size=8, scales=jnp.ones((1, 16))), r"scales must have shape \(4, 16\)"),
    (dict(group_size=None), r"scales must have shape \(1, 16\)"),
    (dict(scales=jnp.ones((4, 16), jnp.int32)), "scales must be floating point"),
    (dict(zeros=jnp.ones((1, 16), jnp.int8)), "zeros must have the shape of scales"),
    (dict(zeros=jnp.ones((4, 16), jnp.int32)), "zeros must be int8 or floating"),
    (dict(act_bits=4), "act_bits=4; valid"),
    (dict(act_bits=8), "requires per-channel or per-tensor"),
    (dict(act_bits=8, group_size=None, scales=jnp.ones((1, 16)),
          zeros=jnp.ones((1, 16), jnp.int8)), "requires symmetric"),
    (dict(block_m=0), "block_m=0 must be a positive integer"),
    (dict(block_k=12), "block_k=12 must be a multiple of group_size=8 and divide K=32"),
    (dict(block_k=16, platform="gpu"), "block_k=16 must divide group_size=8"),
    (dict(block_n=24, platform="gpu"), "block_n=24 must be a power of two"),
    (dict(platform="cuda"), "platform='cuda'; valid"),
    (dict(interpret="yes"), "interpret='yes'; valid"),
    (dict(interpret=pltpu.InterpretParams(), platform="gpu"), "interprets the TPU kernel"),
]


@pytest.mark.parametrize("over,match", BAD)
def test_bad_input_raises_before_launch(over, match):
  kw = _bad(**over)
  with pytest.raises(ValueError, match=match):
    lowbit.lowbit_matmul(kw.pop("x"), kw.pop("values"), kw.pop("scales"), **kw)


def test_bad_input_w8a8_int4_and_reference():
  kw = _bad(act_bits=8, bits=4, group_size=None, values=jnp.ones((16, 16), jnp.int8),
            scales=jnp.ones((1, 16)))
  kw.pop("interpret")
  with pytest.raises(ValueError, match="requires bits=8"):
    lowbit.reference(kw.pop("x"), kw.pop("values"), kw.pop("scales"), **kw)
  xq, w = jnp.ones((4, 32), jnp.int8), jnp.ones((32, 16), jnp.int8)
  with pytest.raises(ValueError, match="x_scales must be float32 of shape"):
    lowbit.w8a8_matmul(xq, jnp.ones((4,)), w, jnp.ones((1, 16)), interpret=True)
  with pytest.raises(ValueError, match="w_scales must be floating point of shape"):
    lowbit.w8a8_matmul(xq, jnp.ones((4, 1)), w, jnp.ones((2, 16)), interpret=True)
  with pytest.raises(ValueError, match=r"w_codes.shape\[0\]=16 must equal"):
    lowbit.w8a8_matmul(xq, jnp.ones((4, 1)), w[:16], jnp.ones((1, 16)), interpret=True)


def test_compiled_checks_backend_and_tpu_alignment():
  if jax.default_backend() == "cpu":
    kw = _bad()
    kw["interpret"] = False
    with pytest.raises(ValueError, match="no compiled low-bit Pallas kernel exists for "
                                         "backend 'cpu'"):
      lowbit.lowbit_matmul(kw.pop("x"), kw.pop("values"), kw.pop("scales"), **kw)
  with pytest.raises(ValueError, match="block_n=64 must be a multiple of 128"):
    lowbit.fit_blocks("weight_only", "tpu", 16, 256, 256, bits=8, group_size=None,
                      block_m=8, block_n=64, block_k=256, compiled=True)
  with pytest.raises(ValueError, match="block_k=128 must be a multiple of 256"):
    lowbit.fit_blocks("weight_only", "tpu", 16, 512, 256, bits=4, group_size=None,
                      block_m=8, block_n=128, block_k=128, compiled=True)
  # Interpreting relaxes the alignment.
  assert lowbit.fit_blocks("weight_only", "tpu", 16, 256, 256, bits=8, group_size=None,
                           block_m=3, block_n=64, block_k=20, compiled=False) == (3, 64, 20)


COMPILED = [(1, 576, 1536, 8, None, False, "bfloat16", (None, None, None)),
            (300, 1024, 259, 4, 128, True, "bfloat16", (None, None, None)),
            (16, 512, 384, 4, None, False, "float32", (None, None, None))]


@pytest.mark.tpu
@pytest.mark.skipif(jax.default_backend() != "tpu", reason="needs a TPU")
@pytest.mark.parametrize("M,K,N,bits,g,zeros,dtype,blocks", COMPILED)
def test_compiled_tpu_kernels(M, K, N, bits, g, zeros, dtype, blocks):
  check_case(None, M, K, N, bits, g, zeros, dtype, blocks, interpret=False)


@pytest.mark.gpu
@pytest.mark.skipif(jax.default_backend() != "gpu", reason="needs a GPU")
@pytest.mark.parametrize("M,K,N,bits,g,zeros,dtype,blocks", COMPILED)
def test_compiled_gpu_kernels(M, K, N, bits, g, zeros, dtype, blocks):
  check_case(None, M, K, N, bits, g, zeros, dtype, blocks, interpret=False)


@pytest.mark.tpu
@pytest.mark.gpu
@pytest.mark.skipif(jax.default_backend() not in ("tpu", "gpu"), reason="needs a TPU or GPU")
def test_compiled_w8a8():
  x, w, s, _, codes = make(33, 1024, 640, bits=8, dtype="bfloat16", seed=12)
  out = lowbit.lowbit_matmul(x, w, s, bits=8, group_size=None, act_bits=8)
  ref = lowbit.reference(x, w, s, bits=8, group_size=None, act_bits=8)
  np.testing.assert_allclose(np.asarray(out, np.float32), np.asarray(ref, np.float32),
                             rtol=2.0**-7)

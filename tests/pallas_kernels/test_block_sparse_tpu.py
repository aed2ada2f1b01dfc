"""The TPU (Mosaic) block-sparse flash attention kernel against `block_sparse.reference`.

Interpret mode on CPU (tiny grids: every grid step costs milliseconds), plus a lowering of
the kernels to Mosaic for the TPU platform (runs on CPU) and a compiled run on a real TPU.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from jax.experimental.pallas import tpu as pltpu

import model
from pallas_kernels import block_sparse as bs
from pallas_kernels import block_sparse_tpu as bt

TOL = {"float32": 2e-5, "bfloat16": 2e-2}


@pytest.fixture(autouse=True)
def _reset_tpu_interpreter():
  # After an exception the TPU interpreter keeps its simulated memory; reset it so one
  # failing test cannot break the next.
  yield
  pltpu.reset_tpu_interpret_mode_state()


def heads_major(x):
  return jnp.swapaxes(x, 1, 2)  # [B, T, H, Dh] <-> [B, H, T, Dh]; [B, H, T] <-> [B, T, H]


def make_mask(rng, kind: str, b: int, t: int, s: int) -> bs.Mask:
  if kind == "none":
    return bs.Mask()
  if kind == "causal":
    return bs.Mask(causal=True)
  if kind == "window":
    return bs.Mask(causal=True, window=6, sinks=2)
  if kind == "segments":
    seg = lambda n: jnp.asarray(np.sort(rng.integers(0, 3, size=(b, n)), axis=1), jnp.int32)
    return bs.Mask(q_segment_ids=seg(t), kv_segment_ids=seg(s))
  if kind == "causal_segments":
    seg = jnp.asarray(np.sort(rng.integers(0, 3, size=(b, t)), axis=1), jnp.int32)
    return bs.Mask(causal=True, q_segment_ids=seg)
  raise ValueError(kind)


def make_case(seed=0, *, b=2, t=32, s=32, h=4, kh=2, dh=16, bq=8, bkv=16, lb=None, hl=None,
              mask="none", dtype="float32", p=0.6, full_p=0.5, empty_row=True,
              all_active=False, dense=False):
  """(q, k, v [B, T|S, H|K, Dh], layout, mask) with true full claims."""
  rng = np.random.default_rng(seed)
  lb, hl = b if lb is None else lb, h if hl is None else hl
  msk = make_mask(rng, mask, b, t, s)
  m = bs.mask_arrays(msk, b, t, s)
  if dense:
    layout = bs.dense_layout(m, bq, bkv)
  else:
    seg = m.q_seg is not None
    vis = np.asarray(bs.element_mask(m, m.q_pos[:, :, None], m.kv_pos[:, None],
                                     m.q_seg[:, :, None] if seg else None,
                                     m.kv_seg[:, None] if seg else None))
    qb, sb = t // bq, s // bkv
    all_vis = vis.reshape(b, qb, bq, sb, bkv).all(axis=(2, 4))
    if lb == 1:
      all_vis = all_vis.all(axis=0, keepdims=True)
    active = np.ones((lb, hl, qb, sb), bool) if all_active else rng.random((lb, hl, qb, sb)) < p
    if empty_row:
      active[0, 0, 0] = False
    full = active & all_vis[:, None] & (rng.random(active.shape) < full_p)
    layout = model.BlockLayout.from_block_mask(jnp.asarray(active), block_q=bq, block_kv=bkv,
                                               full_mask=jnp.asarray(full))
  q = jnp.asarray(rng.normal(size=(b, t, h, dh)), dtype)
  k = jnp.asarray(rng.normal(size=(b, s, kh, dh)), dtype)
  v = jnp.asarray(rng.normal(size=(b, s, kh, dh)), dtype)
  return q, k, v, layout, msk


def _loss(out, lse, w_out, w_lse):
  return (jnp.sum(out.astype(jnp.float32) * w_out)
          + jnp.sum(jnp.where(lse > bs.NEG_INF / 2, lse, 0.0) * w_lse))


@functools.partial(jax.jit, static_argnames=("scale", "interpret"))
def _kernel(q, k, v, meta, m, *, scale, interpret):
  out, lse = bt.attention(heads_major(q), heads_major(k), heads_major(v), meta, m,
                          scale=scale, interpret=interpret)
  return heads_major(out), heads_major(lse)


@jax.jit
def _reference(q, k, v, layout, mask):
  return bs.reference(q, k, v, layout, mask=mask, return_lse=True)


_kernel_grads = jax.jit(jax.grad(lambda q, k, v, meta, m, w_out, w_lse, scale, interpret: _loss(
    *_kernel(q, k, v, meta, m, scale=scale, interpret=interpret), w_out, w_lse),
    argnums=(0, 1, 2)), static_argnums=(7, 8))
_reference_grads = jax.jit(jax.grad(lambda q, k, v, layout, mask, w_out, w_lse: _loss(
    *_reference(q, k, v, layout, mask), w_out, w_lse), argnums=(0, 1, 2)))


def kernel_args(q, k, layout, mask):
  """(meta, mask arrays, scale), built eagerly so the lists keep their concrete length."""
  b, t, _, dh = q.shape
  s = k.shape[1]
  return bs.build_meta(layout, s), bs.mask_arrays(mask, b, t, s), dh ** -0.5


def kernel(q, k, v, layout, mask, *, interpret=True):
  meta, m, scale = kernel_args(q, k, layout, mask)
  return _kernel(q, k, v, meta, m, scale=scale, interpret=interpret)


def check_grads(q, k, v, layout, mask, seed=1, interpret=True, tol=1e-4):
  rng = np.random.default_rng(seed)
  w_out = jnp.asarray(rng.normal(size=q.shape), jnp.float32)
  w_lse = jnp.asarray(rng.normal(size=q.shape[:3]), jnp.float32)
  meta, m, scale = kernel_args(q, k, layout, mask)
  got = _kernel_grads(q, k, v, meta, m, w_out, w_lse, scale, interpret)
  # The reference uses the default scale dh ** -0.5, the one kernel_args picks.
  want = _reference_grads(q, k, v, layout, mask, w_out, w_lse)
  for name, g, w in zip("qkv", got, want, strict=True):
    assert g.shape == w.shape and g.dtype == w.dtype, name
    scale_ = float(np.abs(np.asarray(w, np.float32)).max())
    np.testing.assert_allclose(np.asarray(g, np.float32), np.asarray(w, np.float32), rtol=tol,
                               atol=tol * max(scale_, 1.0), err_msg=f"d{name}")


def check_forward(q, k, v, layout, mask, dtype, interpret=True):
  out, lse = kernel(q, k, v, layout, mask, interpret=interpret)
  want, want_lse = _reference(q, k, v, layout, mask)
  assert out.dtype == q.dtype and lse.dtype == jnp.float32
  assert out.shape == q.shape and lse.shape == q.shape[:3]
  tol = TOL[dtype]
  np.testing.assert_allclose(np.asarray(out, np.float32), np.asarray(want, np.float32),
                             rtol=tol, atol=tol)
  np.testing.assert_allclose(lse, want_lse, rtol=TOL["float32"] if dtype == "float32" else 1e-3,
                             atol=1e-4)
  unseen = np.asarray(want_lse) == bs.NEG_INF
  assert np.all(np.asarray(lse)[unseen] == bs.NEG_INF)
  assert np.all(np.asarray(out, np.float32)[unseen] == 0)
  return unseen


FWD_CASES = {
    "random_empty_row-per_head-none-g1-f32": dict(kh=4, hl=4),
    "all_full-shared-none-g2-f32": dict(hl=1, all_active=True, full_p=1.0, empty_row=False),
    "partial_full-per_head-causal-g2-f32": dict(mask="causal", full_p=0.7),
    "per_kv_head-window_sinks-g2-f32": dict(hl=2, mask="window"),
    "shared-segments-g1-bf16": dict(kh=4, hl=1, mask="segments", dtype="bfloat16"),
    "batch_shared-causal-g4-bf16": dict(kh=1, lb=1, hl=1, mask="causal", dtype="bfloat16"),
    "batch_shared-per_kv_head-segments-g2-f32": dict(lb=1, hl=2, mask="causal_segments"),
    "per_head-causal-g2-bf16": dict(mask="causal", dtype="bfloat16", full_p=0.7),
    "dense_layout-window_sinks-g2-f32": dict(dense=True, mask="window"),
}


@pytest.mark.parametrize("case", list(FWD_CASES))
def test_forward_matches_reference(case):
  kw = FWD_CASES[case]
  q, k, v, layout, mask = make_case(list(FWD_CASES).index(case), **kw)
  unseen = check_forward(q, k, v, layout, mask, kw.get("dtype", "float32"))
  if kw.get("empty_row", True) and not kw.get("dense"):
    assert unseen[0, :8].all() if kw.get("hl") == 1 else unseen[0, :8, 0].all()


@settings(max_examples=5, deadline=None)
@given(st.data())
def test_forward_drawn_shapes(data):
  b = data.draw(st.sampled_from([1, 2]))
  h, kh = data.draw(st.sampled_from([(1, 1), (2, 1), (2, 2), (4, 2), (4, 1)]))
  t, s = data.draw(st.sampled_from([(16, 16), (8, 32), (32, 16), (24, 24)]))
  bq = data.draw(st.sampled_from([d for d in (4, 8, 16) if t % d == 0]))
  bkv = data.draw(st.sampled_from([d for d in (8, 16) if s % d == 0]))
  dh = data.draw(st.sampled_from([8, 16]))
  lb = data.draw(st.sampled_from([1, b]))
  hl = data.draw(st.sampled_from(sorted({1, kh, h})))
  mask = data.draw(st.sampled_from(["none", "causal", "window", "segments"]))
  p = data.draw(st.sampled_from([0.3, 0.7, 1.0]))
  seed = data.draw(st.integers(0, 2**16))
  q, k, v, layout, msk = make_case(seed, b=b, t=t, s=s, h=h, kh=kh, dh=dh, bq=bq, bkv=bkv,
                                   lb=lb, hl=hl, mask=mask, p=p)
  check_forward(q, k, v, layout, msk, "float32")


GRAD_CASES = {
    "per_head-causal-empty_row-g2": dict(mask="causal", full_p=0.7),
    "batch_shared-shared-segments-g1": dict(kh=4, lb=1, hl=1, mask="causal_segments"),
    "per_kv_head-window_sinks-g2": dict(hl=2, mask="window", p=0.8),
}


@pytest.mark.parametrize("case", list(GRAD_CASES))
def test_gradients_match_reference(case):
  # dq, dk, dv of a loss on both outputs (out and lse) against jax.grad of the reference.
  check_grads(*make_case(list(GRAD_CASES).index(case), **GRAD_CASES[case]))


def test_interpret_params_no_races_no_out_of_bounds(monkeypatch):
  # Every kernel (forward, dq, dk/dv) under the TPU interpreter: two simulated cores, a
  # random order along the parallel axes, races detected, out-of-bounds reads raising
  # (the default) and buffers initialized to NaN, so an output block a kernel failed to
  # write (e.g. the dk / dv of a kv block no q block attends to) would show as NaN.
  from jax._src.pallas.mosaic.interpret import interpret_pallas_call as ipc

  states = []

  class Recording(ipc.RaceDetectionState):
    def __init__(self, *args, **kwargs):
      super().__init__(*args, **kwargs)
      states.append(self)

  monkeypatch.setattr(ipc, "RaceDetectionState", Recording)
  params = pltpu.InterpretParams(detect_races=True, num_cores_or_threads=2, random_seed=3,
                                 out_of_bounds_reads="raise", uninitialized_memory="nan")
  q, k, v, _, mask = make_case(5, b=1, t=16, s=32, h=2, kh=1, dh=8, bq=8, bkv=8,
                               mask="causal")
  active = np.ones((1, 2, 2, 4), bool)
  active[0, 0, 0] = False  # an empty q block row
  active[0, 1, :, 3] = False  # kv block 3 of head 1: no q block attends to it
  full = np.zeros_like(active)
  full[0, 1, 1, 0] = True  # q block 1 (positions 8..15) sees all of kv block 0
  layout = model.BlockLayout.from_block_mask(jnp.asarray(active), block_q=8, block_kv=8,
                                             full_mask=jnp.asarray(full))
  mask = bs.Mask(causal=True, q_positions=jnp.arange(16, 32)[None])  # the last 16 positions
  check_forward(q, k, v, layout, mask, "float32", interpret=params)
  check_grads(q, k, v, layout, mask, seed=2, interpret=params)
  assert len(states) >= 4  # forward twice (check_forward and grad), dq, dk/dv
  assert not any(st_.races_found for st_ in states)


def test_layout_head_helper_matches_contract():
  for hl, h, kh in ((1, 4, 2), (2, 4, 2), (4, 4, 2), (1, 4, 1), (4, 4, 4), (2, 8, 2)):
    for hh in range(h):
      got = bt._layout_head(jnp.int32(hh), hl, h, kh)
      assert int(got) == int(bs.layout_head(hh, hl, h, kh))


LOWER_CASES = [  # (T, S, block_q, block_kv, Dh, dtype, mask)
    (256, 256, 8, 128, 128, "bfloat16", "window"),
    (256, 256, 8, 128, 128, "float32", "causal_segments"),
    (64, 64, 16, 64, 64, "bfloat16", "segments"),  # block_kv == S < 128
    (128, 512, 32, 256, 128, "bfloat16", "causal"),  # block_kv = 2 x 128 lanes
]


@pytest.mark.parametrize("t,s,bq,bkv,dh,dtype,mask", LOWER_CASES)
def test_lowers_to_mosaic_for_tpu(t, s, bq, bkv, dh, dtype, mask):
  # Mosaic's Python lowering (jaxpr -> TPU MLIR) runs without a TPU: it rejects ops the
  # TPU backend has no lowering for. GQA with a per-kv-head layout exercises the head
  # division in the index maps.
  q, k, v, layout, msk = make_case(0, b=1, t=t, s=s, h=4, kh=2, dh=dh, bq=bq, bkv=bkv,
                                   hl=2, mask=mask, dtype=dtype, p=0.5)
  meta = bs.build_meta(layout, s)
  m = bs.mask_arrays(msk, 1, t, s)
  qh, kh_, vh = map(heads_major, (q, k, v))

  def fwd(q, k, v):
    return bt.attention(q, k, v, meta, m, scale=0.125)

  def bwd(q, k, v):
    loss = lambda *a: jnp.sum(fwd(*a)[0].astype(jnp.float32)) + jnp.sum(fwd(*a)[1] * 0.5)
    return jax.grad(loss, argnums=(0, 1, 2))(q, k, v)

  for f, n_calls in ((fwd, 1), (bwd, 3)):
    text = jax.jit(f).trace(qh, kh_, vh).lower(lowering_platforms=("tpu",)).as_text()
    assert text.count("tpu_custom_call") >= n_calls


def test_compiled_path_checks_tpu_blocks():
  q, k, v, layout, mask = make_case(0, b=1, t=32, s=32, h=2, kh=1, dh=8, bq=8, bkv=16)
  with pytest.raises(ValueError, match="block_kv=16 must be a multiple of 128 or equal S=32"):
    kernel(q, k, v, layout, mask, interpret=False)
  q, k, v, layout, mask = make_case(0, b=1, t=32, s=128, h=2, kh=1, dh=8, bq=4, bkv=128)
  with pytest.raises(ValueError, match="block_q=4 must be a multiple of 8 or equal T=32"):
    kernel(q, k, v, layout, mask, interpret=False)


def test_bad_metadata_raises():
  q, k, v, layout, mask = make_case(0, b=1, t=32, s=32, h=2, kh=1, dh=8, bq=8, bkv=16)
  meta = bs.build_meta(layout, 64)  # built for S=64: 4 kv blocks, not 2
  m = bs.mask_arrays(mask, 1, 32, 32)
  with pytest.raises(ValueError, match="meta.t_num"):
    bt.attention(heads_major(q), heads_major(k), heads_major(v), meta, m, scale=1.0,
                 interpret=True)


@pytest.mark.tpu
@pytest.mark.skipif(jax.default_backend() != "tpu", reason="needs a TPU")
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("mask", ["causal", "window", "causal_segments"])
def test_compiled_tpu_kernel_matches_reference(dtype, mask):
  q, k, v, layout, msk = make_case(3, b=2, t=512, s=512, h=4, kh=2, dh=128, bq=128,
                                   bkv=128, mask=mask, dtype=dtype, p=0.6)
  out, lse = kernel(q, k, v, layout, msk, interpret=False)
  want, want_lse = _reference(q, k, v, layout, msk)
  tol = 2e-3 if dtype == "float32" else 3e-2
  np.testing.assert_allclose(np.asarray(out, np.float32), np.asarray(want, np.float32),
                             rtol=tol, atol=tol)
  np.testing.assert_allclose(lse, want_lse, rtol=1e-3, atol=1e-3)
  if dtype == "float32":
    check_grads(q, k, v, layout, msk, interpret=False, tol=2e-3)
  else:  # bf16 operands: compare the gradients at the bf16 level of precision
    check_grads(q, k, v, layout, msk, interpret=False, tol=5e-2)

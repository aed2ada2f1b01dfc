"""The GPU (Pallas, Triton lowering) block-sparse flash attention against the reference.

CPU: interpret mode on tiny grids (every distinct static configuration is a fresh trace and
compile of the interpreted kernel, a few seconds each, so cases are few and jitted once),
plus a cross-lowering of forward and backward for CUDA (runs the Triton lowering of the
kernels without a GPU). GPU: the compiled kernels against the reference.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import model
from pallas_kernels import block_sparse as bs
from pallas_kernels import block_sparse_gpu as bg

TOL = {"float32": 2e-5, "bfloat16": 2e-2}


def to_heads_major(x):
  """[B, T, H, Dh] <-> [B, H, T, Dh], and [B, T, H] <-> [B, H, T]."""
  return jnp.swapaxes(x, 1, 2)


def build_mask(rng, kind: str, b: int, t: int, s: int) -> bs.Mask:
  segs = lambda n: jnp.asarray(np.sort(rng.integers(0, 3, size=(b, n)), axis=1), jnp.int32)
  return {
      "none": lambda: bs.Mask(),
      "causal": lambda: bs.Mask(causal=True),
      "window_sinks": lambda: bs.Mask(causal=True, window=7, sinks=3),
      "segments": lambda: bs.Mask(q_segment_ids=segs(t), kv_segment_ids=segs(s)),
  }[kind]()


def build_case(seed: int, *, layout: str, mask: str, b=2, t=32, s=32, h=4, kh=2, dh=16,
               bq=8, bkv=8, lb=None, hl=None, dtype="float32"):
  """q, k, v [B, T|S, H|K, Dh], a model.BlockLayout and a Mask; full claims are true.

  layout: "random_empty" (random partial blocks, q block 0 of (row 0, head 0) empty and the
  last kv block attended by nobody), "all_full" (every block active, every fully visible
  one claimed full: all of them without a mask), "mixed" (random blocks, some of the fully
  visible ones claimed full).
  """
  rng = np.random.default_rng(seed)
  lb = b if lb is None else lb
  hl = h if hl is None else hl
  msk = build_mask(rng, mask, b, t, s)
  ma = bs.mask_arrays(msk, b, t, s)
  vis = np.asarray(bs.element_mask(
      ma, ma.q_pos[:, :, None], ma.kv_pos[:, None, :],
      None if ma.q_seg is None else ma.q_seg[:, :, None],
      None if ma.kv_seg is None else ma.kv_seg[:, None, :]))
  qb, sb = t // bq, s // bkv
  all_vis = vis.reshape(b, qb, bq, sb, bkv).all(axis=(2, 4))  # [B, Qb, Sb]
  all_vis = np.broadcast_to(all_vis.all(axis=0, keepdims=True) if lb == 1 else all_vis,
                            (lb, qb, sb))[:, None]
  shape = (lb, hl, qb, sb)
  if layout == "random_empty":
    active = rng.random(shape) < 0.5
    active[0, 0, 0] = False
    active[..., -1] = False
    full = np.zeros(shape, bool)
  elif layout == "all_full":
    active = np.ones(shape, bool)
    full = active & all_vis
  elif layout == "mixed":
    active = rng.random(shape) < 0.65
    full = active & all_vis & (rng.random(shape) < 0.6)
  else:
    raise ValueError(layout)
  blay = model.BlockLayout.from_block_mask(jnp.asarray(active), block_q=bq, block_kv=bkv,
                                           full_mask=jnp.asarray(full))
  dt = jnp.dtype(dtype)
  q = jnp.asarray(rng.normal(size=(b, t, h, dh)), dt)
  k = jnp.asarray(rng.normal(size=(b, s, kh, dh)), dt)
  v = jnp.asarray(rng.normal(size=(b, s, kh, dh)), dt)
  return q, k, v, blay, msk


def kernel_fn(blay, msk, *, interpret=True, **kw):
  """The kernel on [B, T, H, Dh] operands: (q, k, v) -> (out [B, T, H, Dh], lse [B, T, H])."""

  def f(q, k, v):
    b, t, s = q.shape[0], q.shape[1], k.shape[1]
    meta = bs.build_meta(blay, s)
    ma = bs.mask_arrays(msk, b, t, s)
    out, lse = bg.attention(to_heads_major(q), to_heads_major(k), to_heads_major(v), meta, ma,
                            scale=q.shape[-1] ** -0.5, interpret=interpret, **kw)
    return to_heads_major(out), to_heads_major(lse)

  return f


def reference_fn(blay, msk):
  return lambda q, k, v: bs.reference(q, k, v, blay, mask=msk, return_lse=True)


def check_forward(got, want, dtype):
  (out, lse), (want_out, want_lse) = got, want
  tol = TOL[jnp.dtype(dtype).name]
  assert out.dtype == want_out.dtype and lse.dtype == jnp.float32
  np.testing.assert_allclose(np.asarray(out, np.float32), np.asarray(want_out, np.float32),
                             rtol=tol, atol=tol)
  seen = np.asarray(want_lse) > bs.NEG_INF / 2
  np.testing.assert_allclose(np.asarray(lse)[seen], np.asarray(want_lse)[seen], rtol=tol,
                             atol=tol)
  assert np.all(np.asarray(lse)[~seen] == bs.NEG_INF)
  assert np.all(np.asarray(out, np.float32)[~seen] == 0)


def run_forward(q, k, v, blay, msk):
  # Layout and mask arrays are jit arguments (closing over them as constants is fine too,
  # but arguments keep the traced path honest).
  got = jax.jit(lambda q, k, v, blay, msk: kernel_fn(blay, msk)(q, k, v))(q, k, v, blay, msk)
  check_forward(got, reference_fn(blay, msk)(q, k, v), q.dtype)


# --- Forward ------------------------------------------------------------------------------


@pytest.mark.parametrize("layout,mask,kh,hl,lb,dtype", [
    ("random_empty", "none", 2, "H", None, "float32"),
    ("all_full", "none", 4, "1", None, "float32"),
    ("mixed", "causal", 2, "K", None, "float32"),
    ("mixed", "window_sinks", 4, "1", 1, "bfloat16"),  # batch-shared layout (B' = 1)
    ("mixed", "segments", 1, "H", None, "float32"),  # GQA 4
    ("random_empty", "causal", 2, "K", None, "bfloat16"),
])
def test_forward_matches_reference(layout, mask, kh, hl, lb, dtype):
  h = 4
  hl = {"H": h, "K": kh, "1": 1}[hl]
  q, k, v, blay, msk = build_case(1, layout=layout, mask=mask, h=h, kh=kh, hl=hl, lb=lb,
                                  dtype=dtype)
  run_forward(q, k, v, blay, msk)


@settings(max_examples=5, deadline=None)
@given(seed=st.integers(0, 2 ** 16), b=st.integers(1, 2), kh=st.sampled_from([1, 2]),
       g=st.sampled_from([1, 2]), qb=st.integers(1, 3), sb=st.integers(1, 3),
       bq=st.sampled_from([8, 16]), bkv=st.sampled_from([8, 16]), dh=st.sampled_from([8, 32]),
       hl=st.sampled_from(["H", "K", "1"]), shared=st.booleans(),
       layout=st.sampled_from(["random_empty", "mixed"]),
       mask=st.sampled_from(["none", "causal", "window_sinks", "segments"]))
def test_forward_drawn(seed, b, kh, g, qb, sb, bq, bkv, dh, hl, shared, layout, mask):
  h = kh * g
  q, k, v, blay, msk = build_case(seed, layout=layout, mask=mask, b=b, t=qb * bq, s=sb * bkv,
                                  h=h, kh=kh, dh=dh, bq=bq, bkv=bkv, lb=1 if shared else b,
                                  hl={"H": h, "K": kh, "1": 1}[hl])
  run_forward(q, k, v, blay, msk)


def test_full_claims_skip_the_element_mask():
  """A full claim is trusted: claiming every block full under a causal mask means no mask
  is applied anywhere, i.e. the result of unmasked attention (the split lists are used)."""
  q, k, v, blay, _ = build_case(3, layout="all_full", mask="none", b=1, t=16, s=16, h=2,
                                kh=1)
  got = jax.jit(kernel_fn(blay, bs.Mask(causal=True)))(q, k, v)
  check_forward(got, reference_fn(blay, bs.Mask())(q, k, v), q.dtype)


# --- Gradients ----------------------------------------------------------------------------


@pytest.mark.parametrize("layout,mask,kh,hl,lb", [
    ("random_empty", "causal", 2, "H", None),  # GQA 2, an empty row, an unattended kv block
    ("mixed", "window_sinks", 1, "1", 1),  # GQA 4, batch-shared layout
    ("mixed", "segments", 4, "K", None),
])
def test_gradients_match_reference(layout, mask, kh, hl, lb):
  h = 4
  q, k, v, blay, msk = build_case(2, layout=layout, mask=mask, h=h, kh=kh, lb=lb,
                                  hl={"H": h, "K": kh, "1": 1}[hl])
  rng = np.random.default_rng(3)
  d_out = jnp.asarray(rng.normal(size=q.shape), jnp.float32)
  d_lse = jnp.asarray(rng.normal(size=q.shape[:3]), jnp.float32)  # also on unseen rows

  def fwd_and_grads(fn):
    def run(q, k, v):
      outs, vjp = jax.vjp(fn, q, k, v)
      return outs, vjp((d_out, d_lse))
    return run

  got, got_grads = jax.jit(fwd_and_grads(kernel_fn(blay, msk)))(q, k, v)
  want, want_grads = fwd_and_grads(reference_fn(blay, msk))(q, k, v)
  check_forward(got, want, q.dtype)
  for name, a, w in zip("qkv", got_grads, want_grads):
    assert a.dtype == w.dtype, name
    np.testing.assert_allclose(np.asarray(a), np.asarray(w), rtol=1e-4, atol=1e-4,
                               err_msg=f"d{name}")
  if layout == "random_empty":  # nobody attends to the last kv block: zero dk, dv there
    assert not np.any(np.asarray(got_grads[1])[:, -8:]) and not np.any(
        np.asarray(got_grads[2])[:, -8:])


# --- Checks and lowering ------------------------------------------------------------------


@pytest.mark.parametrize("bq,bkv,dh,match", [(8, 16, 16, "block_q=8"), (16, 48, 16,
                                             "block_kv=48"), (16, 16, 24, "head dim Dh=24")])
def test_illegal_tiles_rejected_when_compiling(bq, bkv, dh, match):
  t = 96
  q, k, v, blay, msk = build_case(0, layout="mixed", mask="none", b=1, t=t, s=t, h=2, kh=1,
                                  dh=dh, bq=bq, bkv=bkv)
  with pytest.raises(ValueError, match=match):
    kernel_fn(blay, msk, interpret=False)(q, k, v)


def test_cross_lowers_for_cuda():
  """Forward and backward lower through Triton for CUDA (legal tiles, bf16) on any host."""
  b, t, h, kh, dh, blk = 1, 128, 4, 2, 64, 64
  q, k, v, blay, msk = build_case(0, layout="mixed", mask="none", b=b, t=t, s=t, h=h, kh=kh,
                                  dh=dh, bq=blk, bkv=blk, dtype="bfloat16")
  seg = jnp.zeros((b, t), jnp.int32).at[:, t // 2:].set(1)
  msk = bs.Mask(causal=True, window=100, sinks=4, q_segment_ids=seg)
  f = kernel_fn(blay, msk, interpret=False, num_warps=4, num_stages=2)

  def loss(q, k, v):
    out, lse = f(q, k, v)
    return jnp.sum(out.astype(jnp.float32)) + jnp.sum(lse)

  for fn, calls in ((f, 1), (jax.grad(loss, argnums=(0, 1, 2)), 3)):
    text = jax.jit(fn).trace(q, k, v).lower(lowering_platforms=("cuda",)).as_text()
    assert text.count("__gpu$xla.gpu.triton") == calls


# --- GPU ----------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.skipif(jax.default_backend() != "gpu", reason="needs a GPU")
@pytest.mark.parametrize("dtype,mask,layout", [("bfloat16", "causal", "mixed"),
                                               ("float32", "segments", "random_empty"),
                                               ("bfloat16", "window_sinks", "all_full")])
def test_compiled_matches_reference_on_gpu(dtype, mask, layout):
  with jax.default_matmul_precision("highest"):  # no TF32 in the f32 reference
    _compiled_vs_reference(dtype, mask, layout)


def _compiled_vs_reference(dtype, mask, layout):
  t, blk = 256, 64
  q, k, v, blay, msk = build_case(4, layout=layout, mask=mask, t=t, s=t, h=4, kh=2, dh=64,
                                  bq=blk, bkv=blk, hl=2, dtype=dtype)
  f = kernel_fn(blay, msk, interpret=False)
  ref = reference_fn(blay, msk)
  check_forward(jax.jit(f)(q, k, v), ref(q, k, v), dtype)
  rng = np.random.default_rng(5)
  d_out = jnp.asarray(rng.normal(size=q.shape), q.dtype)
  d_lse = jnp.asarray(rng.normal(size=q.shape[:3]), jnp.float32)
  grads = jax.jit(lambda q, k, v: jax.vjp(f, q, k, v)[1]((d_out, d_lse)))(q, k, v)
  f32 = lambda x: x.astype(jnp.float32)
  want = jax.vjp(ref, f32(q), f32(k), f32(v))[1]((f32(d_out), d_lse))
  tol = 2e-3 if dtype == "float32" else 6e-2
  for name, a, w in zip("qkv", grads, want):
    scale = float(np.abs(np.asarray(w)).max()) + 1e-6
    np.testing.assert_allclose(np.asarray(a, np.float32) / scale, np.asarray(w) / scale,
                               rtol=0, atol=tol, err_msg=f"d{name}")

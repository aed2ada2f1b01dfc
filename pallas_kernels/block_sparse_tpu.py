"""Block-sparse flash attention for TPU (Mosaic Pallas): forward and backward.

Heads-major operands: q [B, H, T, Dh], k / v [B, K, S, Dh] (K divides H; query head h reads
kv head h // (H / K)). The layout arrives as `block_sparse.BlockMeta` and the element mask
as `block_sparse.MaskArrays`; the result equals `block_sparse.reference` (transposed).

Forward. Grid (B, H, Qb, L), L = meta.idx.shape[-1]; the last axis is "arbitrary"
(sequential, it carries the online softmax), the rest "parallel". The merged q-major lists
(num, idx, full) are flattened to 1-D int32 and scalar-prefetched into SMEM
(`PrefetchScalarGridSpec`; 1-D avoids the padding SMEM gives to the trailing dims of an
N-D array), and every index map computes its flat offset
((layout_row(b) * Hl + layout_head(h)) * Qb + i) * L + j itself (head divisions use
`lax.div`: jnp's floor division lowers through `sign`, which Mosaic's lowering only
handles with a TPU attached, so it would break cross-lowering). The K / V BlockSpecs are
(None, None, block_kv, Dh) with the kv block read from idx at step j. Entries past a q
block's count repeat its last active index, so a skipped step re-points at the block
fetched last: the pipeline sees an unchanged block index and issues no DMA. Compute is
skipped with `pl.when(j < num)`; inside, `pl.when(full == 1)` runs the unmasked update
(the full claim is trusted) and `pl.when(full == 0)` builds the element mask
(`block_sparse.element_mask`) from the block's slices of the per-token vectors. With no
causal / window / segment term there is no element mask at all and partial blocks take
the unmasked path too. Scratch (VMEM, f32): running max m and sum l as lane-broadcast
[block_q, 128] tiles (the TPU-native layout of a per-row scalar), accumulator
[block_q, Dh]. They are reset at j == 0 and finalized at j == L - 1: out = acc / l, and
lse = m + log l; a row that saw nothing (l == 0) gets out 0 and lse `NEG_INF`. Masked
scores are set to the finite `NEG_INF` with `jnp.where` and their probabilities are zeroed
explicitly, so a row whose first visited block is entirely masked stays exact (its
max is NEG_INF, exp(0) = 1 would otherwise count). All dots accumulate in f32; p is cast
to v.dtype for the P.V dot (f32 inputs use Precision.HIGHEST).

Per-token mask vectors (int32) travel TPU-legally as in splash attention: q-side
(positions, segment ids) lane-broadcast to [B, T, 128] with blocks (None, block_q, 128),
kv-side sublane-broadcast to [B, 8, S] with blocks (None, 8, block_kv) indexed through the
same prefetched idx (so they too are re-used, not re-fetched, on skipped steps). Only the
vectors the mask uses are passed (positions for causal / window, ids for segments).

lse layout: the kernel writes lse lane-broadcast, [B, H, T, 128] f32 with blocks
(None, None, block_q, 128) (a [block_q, 1] block would not be a legal TPU tile); the
wrapper returns [..., 0], i.e. [B, H, T].

Backward (FlashAttention-2), residuals q, k, v, out, lse. The wrapper computes
delta = rowsum(dO * O) - dlse in f32 (d lse / d s = p, so a cotangent on lse enters as a
shift of delta) and passes lse and delta lane-broadcast to [B, H, T, 128] again.
  * dq kernel: grid (B, H, Qb, L) over the same merged q-major lists as the forward;
    p = exp(s - lse), ds = p * (dO v^T - delta), dq += ds k; dq * scale is written in
    q.dtype at the last step.
  * dk / dv kernel: grid (B, H, Sb, Lt) over the transposed lists t_num / t_idx / t_full
    (for kv block j, the q blocks that attend to it, same repeat-last padding, so skipped
    steps re-use the q / dO / lse / delta / mask tiles). For each query head h it
    accumulates dv += p^T dO and dk += ds^T q (transposed-lhs `dot_general`s) into f32
    VMEM scratch and writes per-query-head dk * scale, dv [B, H, S, Dh] f32 at the last
    step; the wrapper sums each group of H / K heads and casts to k.dtype. A kv block no q
    block attends to (t_num == 0) is zeroed at step 0 and written at the last step.
  Full / partial branching is as in the forward.

Mosaic tiling (checked when compiling, i.e. interpret is False): block_q must be a
multiple of 8 or T, block_kv a multiple of 128 or S. The flat metadata lives in SMEM, so
B' * Hl * Qb * L (and the transposed counterpart) int32 entries must fit there.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu
from jaxtyping import Array, Float

from pallas_kernels.block_sparse import (
  NEG_INF,
  BlockMeta,
  MaskArrays,
  element_mask,
  layout_head,
  layout_row,
)

LANES = 128
SUBLANES = 8
NT = (((1,), (1,)), ((), ()))  # a @ b^T
NN = (((1,), (0,)), ((), ()))  # a @ b
TN = (((0,), (0,)), ((), ()))  # a^T @ b
DIMS = ("parallel", "parallel", "parallel", "arbitrary")


def check_tpu_blocks(t: int, s: int, block_q: int, block_kv: int) -> None:
  """ValueError unless the blocks are legal Mosaic tiles (needed only when compiling)."""
  if block_q % SUBLANES and block_q != t:
    raise ValueError(f"block_q={block_q} must be a multiple of {SUBLANES} or equal T={t} for "
                     "the compiled TPU kernel (interpret mode takes any divisor)")
  if block_kv % LANES and block_kv != s:
    raise ValueError(f"block_kv={block_kv} must be a multiple of {LANES} or equal S={s} for "
                     "the compiled TPU kernel (interpret mode takes any divisor)")


def _check_meta(meta: BlockMeta, b: int, t: int, s: int, h: int, kh: int) -> None:
  bq, bkv = meta.block_q, meta.block_kv
  if t % bq or s % bkv:
    raise ValueError(f"block_q={bq} / block_kv={bkv} must tile T={t} / S={s} exactly")
  want = dict(num=t // bq, t_num=s // bkv)
  for name, n in want.items():
    shape = getattr(meta, name).shape
    if len(shape) != 3 or shape[0] not in (1, b) or shape[1] not in (1, kh, h) or shape[2] != n:
      raise ValueError(f"meta.{name} shape {shape}; valid: [1 or {b}, 1, {kh} or {h}, {n}] "
                       f"([B', Hl, blocks])")


def _precision(dtype):
  return jax.lax.Precision.HIGHEST if jnp.dtype(dtype) == jnp.float32 else None


def _dot(a, b, dims):
  """A 2-D dot accumulating in f32."""
  return jax.lax.dot_general(a, b, dims, precision=_precision(a.dtype),
                             preferred_element_type=jnp.float32)


def _lanes(x: Float[Array, "r 128"], n: int) -> Float[Array, "r n"]:
  """A lane-broadcast [r, 128] tile (every lane equal) widened or narrowed to [r, n]."""
  if n == LANES:
    return x
  if n % LANES == 0:
    return jnp.tile(x, (1, n // LANES))
  if n < LANES:
    return x[:, :n]
  return jnp.broadcast_to(x[:, :1], (x.shape[0], n))


# --- Mask vectors -------------------------------------------------------------------------


@functools.cache
def _static_mask(causal: bool, window: int | None, sinks: int) -> MaskArrays:
  """A `MaskArrays` carrying only the static terms (what `element_mask` reads of it)."""
  return MaskArrays(q_pos=None, kv_pos=None, q_seg=None, kv_seg=None, causal=causal,
                    window=window, sinks=sinks)


def _uses(m: MaskArrays) -> tuple[bool, bool]:
  """(positions needed, segment ids needed) by the element mask."""
  return m.causal or m.window is not None, m.q_seg is not None


def _mask_vectors(m: MaskArrays) -> tuple[list, list]:
  """(q-side [B, T, 128] lane-broadcast, kv-side [B, 8, S] sublane-broadcast) vectors."""
  pos, seg = _uses(m)
  qcol = lambda x: jnp.broadcast_to(x.astype(jnp.int32)[:, :, None], (*x.shape, LANES))
  krow = lambda x: jnp.broadcast_to(x.astype(jnp.int32)[:, None, :],
                                    (x.shape[0], SUBLANES, x.shape[1]))
  qs, ks = [], []
  if pos:
    qs.append(qcol(m.q_pos))
    ks.append(krow(m.kv_pos))
  if seg:
    qs.append(qcol(m.q_seg))
    ks.append(krow(m.kv_seg))
  return qs, ks


def _block_mask(mstat: MaskArrays, pos: bool, seg: bool, q_refs, k_refs, bkv: int):
  """The element mask [block_q, block_kv] of one block from its vector tiles."""
  q_vals = [_lanes(r[...], bkv) for r in q_refs]  # [bq, bkv]
  k_vals = [r[:1, :] for r in k_refs]  # [1, bkv]
  qpos = kpos = qseg = kseg = None
  if pos:
    qpos, kpos = q_vals.pop(0), k_vals.pop(0)
  if seg:
    qseg, kseg = q_vals.pop(0), k_vals.pop(0)
  if qpos is None:  # segments only: element_mask still takes position operands for shape
    qpos, kpos = qseg, kseg
  return element_mask(mstat, qpos, kpos, qseg, kseg)


# --- Forward ------------------------------------------------------------------------------


def _fwd_kernel(num_ref, idx_ref, full_ref, q_ref, k_ref, v_ref, *refs, n_q: int, n_k: int,
                mstat: MaskArrays, pos: bool, seg: bool, scale: float, flat, steps: int):
  q_vec, k_vec = refs[:n_q], refs[n_q:n_q + n_k]
  o_ref, lse_ref, m_scr, l_scr, acc_scr = refs[n_q + n_k:]
  b, h, i, j = (pl.program_id(a) for a in range(4))
  row = flat(b, h, i)
  n = num_ref[row]
  is_full = full_ref[row * steps + j]
  bkv, dh = k_ref.shape[0], acc_scr.shape[1]

  @pl.when(j == 0)
  def _init():
    m_scr[...] = jnp.full_like(m_scr, NEG_INF)
    l_scr[...] = jnp.zeros_like(l_scr)
    acc_scr[...] = jnp.zeros_like(acc_scr)

  def update(masked: bool):
    s = _dot(q_ref[...], k_ref[...], NT) * scale  # [bq, bkv] f32
    if masked:
      ok = _block_mask(mstat, pos, seg, q_vec, k_vec, bkv)
      s = jnp.where(ok, s, NEG_INF)
    m_prev, l_prev = m_scr[...], l_scr[...]  # [bq, 128]
    m_next = jnp.maximum(m_prev, jnp.max(s, axis=1, keepdims=True))
    p = jnp.exp(s - _lanes(m_next, bkv))
    if masked:
      p = jnp.where(ok, p, 0.0)
    alpha = jnp.exp(m_prev - m_next)
    l_scr[...] = alpha * l_prev + jnp.sum(p, axis=1, keepdims=True)
    m_scr[...] = m_next
    v = v_ref[...]
    acc_scr[...] = acc_scr[...] * _lanes(alpha, dh) + _dot(p.astype(v.dtype), v, NN)

  _branch(j < n, is_full, pos or seg, update)

  @pl.when(j == steps - 1)
  def _finalize():
    l, m = l_scr[...], m_scr[...]
    seen = l > 0.0
    l_safe = jnp.where(seen, l, 1.0)
    o_ref[...] = (acc_scr[...] * _lanes(1.0 / l_safe, dh)).astype(o_ref.dtype)
    lse_ref[...] = jnp.where(seen, m + jnp.log(l_safe), NEG_INF)


def _branch(active, is_full, has_mask: bool, update) -> None:
  """Runs update(masked) on an active step: unmasked on full blocks, masked on partial."""
  if not has_mask:
    pl.when(active)(lambda: update(False))
    return
  pl.when(active & (is_full == 1))(lambda: update(False))
  pl.when(active & (is_full == 0))(lambda: update(True))


def _div(x, d: int):
  """x // d for a non-negative traced int32: `lax.div` (truncating), since jnp's floor
  division lowers through `sign`, which Mosaic's lowering cannot do without a TPU."""
  return x if d == 1 else jax.lax.div(x, jnp.int32(d))


def _layout_head(hh, hl: int, h: int, kh: int):
  """`block_sparse.layout_head` with `_div` for the kv-head case."""
  if hl != h and hl == kh:
    return _div(hh, h // kh)
  return layout_head(hh, hl, h, kh)


def _flat_fn(meta: BlockMeta, h: int, kh: int, n_blocks: int):
  """(b, h, i) -> the flat row of a [B', Hl, n_blocks] count array."""
  lb, hl = meta.batch, meta.heads
  return lambda b, hh, i: ((layout_row(b, lb) * hl + _layout_head(hh, hl, h, kh)) * n_blocks
                           + i)


def _scalars(*xs):
  return [x.reshape(-1).astype(jnp.int32) for x in xs]


def _forward(q, k, v, meta: BlockMeta, m: MaskArrays, scale: float, interpret):
  b, h, t, dh = q.shape
  kh = k.shape[1]
  g = h // kh
  bq, bkv = meta.block_q, meta.block_kv
  qb, steps = t // bq, meta.idx.shape[-1]
  flat = _flat_fn(meta, h, kh, qb)
  pos, seg = _uses(m)
  q_vecs, k_vecs = _mask_vectors(m)

  def kv_block(bb, hh, i, j, num, idx, full):
    return idx[flat(bb, hh, i) * steps + j]

  q_map = lambda bb, hh, i, j, *_: (bb, hh, i, 0)
  kv_map = lambda bb, hh, i, j, *r: (bb, _div(hh, g), kv_block(bb, hh, i, j, *r), 0)
  qv_map = lambda bb, hh, i, j, *_: (bb, i, 0)
  kvv_map = lambda bb, hh, i, j, *r: (bb, 0, kv_block(bb, hh, i, j, *r))
  in_specs = [pl.BlockSpec((None, None, bq, dh), q_map),
              pl.BlockSpec((None, None, bkv, dh), kv_map),
              pl.BlockSpec((None, None, bkv, dh), kv_map)]
  in_specs += [pl.BlockSpec((None, bq, LANES), qv_map)] * len(q_vecs)
  in_specs += [pl.BlockSpec((None, SUBLANES, bkv), kvv_map)] * len(k_vecs)
  kernel = functools.partial(
      _fwd_kernel, n_q=len(q_vecs), n_k=len(k_vecs), mstat=_static_mask(m.causal, m.window,
                                                                      m.sinks),
      pos=pos, seg=seg, scale=scale, flat=flat, steps=steps)
  grid_spec = pltpu.PrefetchScalarGridSpec(
      num_scalar_prefetch=3, grid=(b, h, qb, steps), in_specs=in_specs,
      out_specs=[pl.BlockSpec((None, None, bq, dh), q_map),
                 pl.BlockSpec((None, None, bq, LANES), q_map)],
      scratch_shapes=[pltpu.VMEM((bq, LANES), jnp.float32),
                      pltpu.VMEM((bq, LANES), jnp.float32),
                      pltpu.VMEM((bq, dh), jnp.float32)])
  itemsize = jnp.dtype(q.dtype).itemsize
  cost = pl.CostEstimate(flops=4 * b * h * qb * steps * bq * bkv * dh,
                         transcendentals=b * h * qb * steps * bq * bkv,
                         bytes_accessed=itemsize * (2 * q.size + 2 * b * h * qb * steps * bkv * dh)
                         + 4 * b * h * t * LANES)
  out, lse = pl.pallas_call(
      kernel, grid_spec=grid_spec,
      out_shape=[jax.ShapeDtypeStruct(q.shape, q.dtype),
                 jax.ShapeDtypeStruct((b, h, t, LANES), jnp.float32)],
      compiler_params=pltpu.CompilerParams(dimension_semantics=DIMS),
      cost_estimate=cost, interpret=interpret, name="block_sparse_fwd",
  )(*_scalars(meta.num, meta.idx, meta.full), q, k, v, *q_vecs, *k_vecs)
  return out, lse[..., 0]


# --- Backward -----------------------------------------------------------------------------


def _probs(q_ref, k_ref, lse_ref, masked: bool, mask_args, scale: float):
  """(p, ok) of one block: p = exp(q k^T * scale - lse), zero where masked."""
  bkv = k_ref.shape[0]
  s = _dot(q_ref[...], k_ref[...], NT) * scale
  p = jnp.exp(s - _lanes(lse_ref[...], bkv))
  if masked:
    p = jnp.where(_block_mask(*mask_args, bkv), p, 0.0)
  return p


def _dq_kernel(num_ref, idx_ref, full_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref,
               *refs, n_q: int, n_k: int, mstat: MaskArrays, pos: bool, seg: bool,
               scale: float, flat, steps: int):
  q_vec, k_vec = refs[:n_q], refs[n_q:n_q + n_k]
  dq_ref, acc_scr = refs[n_q + n_k:]
  b, h, i, j = (pl.program_id(a) for a in range(4))
  row = flat(b, h, i)
  n = num_ref[row]
  is_full = full_ref[row * steps + j]
  bkv = k_ref.shape[0]

  @pl.when(j == 0)
  def _init():
    acc_scr[...] = jnp.zeros_like(acc_scr)

  def update(masked: bool):
    p = _probs(q_ref, k_ref, lse_ref, masked, (mstat, pos, seg, q_vec, k_vec), scale)
    dp = _dot(do_ref[...], v_ref[...], NT)  # [bq, bkv]
    ds = p * (dp - _lanes(delta_ref[...], bkv))
    k = k_ref[...]
    acc_scr[...] += _dot(ds.astype(k.dtype), k, NN)

  _branch(j < n, is_full, pos or seg, update)

  @pl.when(j == steps - 1)
  def _finalize():
    dq_ref[...] = (acc_scr[...] * scale).astype(dq_ref.dtype)


def _dkv_kernel(num_ref, idx_ref, full_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref,
                *refs, n_q: int, n_k: int, mstat: MaskArrays, pos: bool, seg: bool,
                scale: float, flat, steps: int):
  q_vec, k_vec = refs[:n_q], refs[n_q:n_q + n_k]
  dk_ref, dv_ref, dk_scr, dv_scr = refs[n_q + n_k:]
  b, h, j, t = (pl.program_id(a) for a in range(4))
  row = flat(b, h, j)
  n = num_ref[row]
  is_full = full_ref[row * steps + t]

  @pl.when(t == 0)
  def _init():
    dk_scr[...] = jnp.zeros_like(dk_scr)
    dv_scr[...] = jnp.zeros_like(dv_scr)

  def update(masked: bool):
    p = _probs(q_ref, k_ref, lse_ref, masked, (mstat, pos, seg, q_vec, k_vec), scale)
    do = do_ref[...]
    dv_scr[...] += _dot(p.astype(do.dtype), do, TN)  # p^T dO: [bkv, Dh]
    dp = _dot(do, v_ref[...], NT)  # [bq, bkv]
    ds = p * (dp - _lanes(delta_ref[...], k_ref.shape[0]))
    q = q_ref[...]
    dk_scr[...] += _dot(ds.astype(q.dtype), q, TN)  # ds^T q: [bkv, Dh]

  _branch(t < n, is_full, pos or seg, update)

  @pl.when(t == steps - 1)
  def _finalize():
    dk_ref[...] = dk_scr[...] * scale
    dv_ref[...] = dv_scr[...]


def _backward(q, k, v, out, lse, do, dlse, meta: BlockMeta, m: MaskArrays, scale: float,
              interpret):
  b, h, t, dh = q.shape
  kh, s = k.shape[1], k.shape[2]
  g = h // kh
  bq, bkv = meta.block_q, meta.block_kv
  qb, sb = t // bq, s // bkv
  pos, seg = _uses(m)
  q_vecs, k_vecs = _mask_vectors(m)
  delta = jnp.sum(do.astype(jnp.float32) * out.astype(jnp.float32), axis=-1)
  delta = delta - dlse.astype(jnp.float32)
  wide = lambda x: jnp.broadcast_to(x[..., None], (*x.shape, LANES))
  lse128, delta128 = wide(lse), wide(delta)
  mstat = _static_mask(m.causal, m.window, m.sinks)
  common = dict(n_q=len(q_vecs), n_k=len(k_vecs), mstat=mstat, pos=pos, seg=seg, scale=scale)
  params = pltpu.CompilerParams(dimension_semantics=DIMS)
  itemsize = jnp.dtype(q.dtype).itemsize

  # dq: q-major, like the forward.
  steps = meta.idx.shape[-1]
  flat = _flat_fn(meta, h, kh, qb)

  def kv_block(bb, hh, i, j, num, idx, full):
    return idx[flat(bb, hh, i) * steps + j]

  q_map = lambda bb, hh, i, j, *_: (bb, hh, i, 0)
  kv_map = lambda bb, hh, i, j, *r: (bb, _div(hh, g), kv_block(bb, hh, i, j, *r), 0)
  qv_map = lambda bb, hh, i, j, *_: (bb, i, 0)
  kvv_map = lambda bb, hh, i, j, *r: (bb, 0, kv_block(bb, hh, i, j, *r))
  q_spec = pl.BlockSpec((None, None, bq, dh), q_map)
  row_spec = pl.BlockSpec((None, None, bq, LANES), q_map)
  kv_spec = pl.BlockSpec((None, None, bkv, dh), kv_map)
  in_specs = [q_spec, kv_spec, kv_spec, q_spec, row_spec, row_spec]
  in_specs += [pl.BlockSpec((None, bq, LANES), qv_map)] * len(q_vecs)
  in_specs += [pl.BlockSpec((None, SUBLANES, bkv), kvv_map)] * len(k_vecs)
  work = b * h * qb * steps * bq * bkv
  dq = pl.pallas_call(
      functools.partial(_dq_kernel, flat=flat, steps=steps, **common),
      grid_spec=pltpu.PrefetchScalarGridSpec(
          num_scalar_prefetch=3, grid=(b, h, qb, steps), in_specs=in_specs,
          out_specs=q_spec, scratch_shapes=[pltpu.VMEM((bq, dh), jnp.float32)]),
      out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype), compiler_params=params,
      cost_estimate=pl.CostEstimate(
          flops=6 * work * dh, transcendentals=work,
          bytes_accessed=itemsize * (3 * q.size + 2 * b * h * qb * steps * bkv * dh)),
      interpret=interpret, name="block_sparse_dq",
  )(*_scalars(meta.num, meta.idx, meta.full), q, k, v, do, lse128, delta128, *q_vecs,
    *k_vecs)

  # dk, dv: kv-major over the transposed lists, per query head.
  t_steps = meta.t_idx.shape[-1]
  t_flat = _flat_fn(meta, h, kh, sb)

  def q_block(bb, hh, j, tt, num, idx, full):
    return idx[t_flat(bb, hh, j) * t_steps + tt]

  tq_map = lambda bb, hh, j, tt, *r: (bb, hh, q_block(bb, hh, j, tt, *r), 0)
  tkv_map = lambda bb, hh, j, tt, *_: (bb, _div(hh, g), j, 0)
  tqv_map = lambda bb, hh, j, tt, *r: (bb, q_block(bb, hh, j, tt, *r), 0)
  tkvv_map = lambda bb, hh, j, tt, *_: (bb, 0, j)
  tq_spec = pl.BlockSpec((None, None, bq, dh), tq_map)
  trow_spec = pl.BlockSpec((None, None, bq, LANES), tq_map)
  tkv_spec = pl.BlockSpec((None, None, bkv, dh), tkv_map)
  out_spec = pl.BlockSpec((None, None, bkv, dh), lambda bb, hh, j, tt, *_: (bb, hh, j, 0))
  in_specs = [tq_spec, tkv_spec, tkv_spec, tq_spec, trow_spec, trow_spec]
  in_specs += [pl.BlockSpec((None, bq, LANES), tqv_map)] * len(q_vecs)
  in_specs += [pl.BlockSpec((None, SUBLANES, bkv), tkvv_map)] * len(k_vecs)
  work = b * h * sb * t_steps * bq * bkv
  dk, dv = pl.pallas_call(
      functools.partial(_dkv_kernel, flat=t_flat, steps=t_steps, **common),
      grid_spec=pltpu.PrefetchScalarGridSpec(
          num_scalar_prefetch=3, grid=(b, h, sb, t_steps), in_specs=in_specs,
          out_specs=[out_spec, out_spec],
          scratch_shapes=[pltpu.VMEM((bkv, dh), jnp.float32),
                          pltpu.VMEM((bkv, dh), jnp.float32)]),
      out_shape=[jax.ShapeDtypeStruct((b, h, s, dh), jnp.float32)] * 2,
      compiler_params=params,
      cost_estimate=pl.CostEstimate(
          flops=8 * work * dh, transcendentals=work,
          bytes_accessed=itemsize * 2 * b * h * sb * t_steps * bq * dh + 8 * b * h * s * dh),
      interpret=interpret, name="block_sparse_dkv",
  )(*_scalars(meta.t_num, meta.t_idx, meta.t_full), q, k, v, do, lse128, delta128, *q_vecs,
    *k_vecs)
  group = lambda x: x.reshape(b, kh, g, s, dh).sum(axis=2).astype(k.dtype)
  return dq, group(dk), group(dv)


# --- Entry point --------------------------------------------------------------------------


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _attention(scale, interpret, q, k, v, meta, m):
  return _forward(q, k, v, meta, m, scale, interpret)


def _attention_fwd(scale, interpret, q, k, v, meta, m):
  out, lse = _forward(q, k, v, meta, m, scale, interpret)
  return (out, lse), (q, k, v, out, lse, meta, m)


def _attention_bwd(scale, interpret, res, cts):
  q, k, v, out, lse, meta, m = res
  do, dlse = cts
  dq, dk, dv = _backward(q, k, v, out, lse, do, dlse, meta, m, scale, interpret)
  return dq, dk, dv, None, None


_attention.defvjp(_attention_fwd, _attention_bwd)


def attention(q: Float[Array, "B H T Dh"], k: Float[Array, "B K S Dh"],
              v: Float[Array, "B K S Dh"], meta: BlockMeta, m: MaskArrays, *, scale: float,
              interpret=False) -> tuple[Float[Array, "B H T Dh"], Float[Array, "B H T"]]:
  """Block-sparse attention: (out [B, H, T, Dh] in q.dtype, lse [B, H, T] f32).

  Differentiable in q, k, v (also through lse). `interpret` is False (compile the Mosaic
  kernel), True or `pltpu.InterpretParams(...)`. Rows that see no key get 0 and NEG_INF.
  """
  if q.ndim != 4 or k.ndim != 4 or k.shape != v.shape:
    raise ValueError(f"q [B, H, T, Dh], k / v [B, K, S, Dh] expected; got {q.shape}, "
                     f"{k.shape}, {v.shape}")
  b, h, t, dh = q.shape
  kh, s = k.shape[1], k.shape[2]
  if k.shape[0] != b or k.shape[3] != dh or h % kh:
    raise ValueError(f"k.shape={k.shape} does not fit q.shape={q.shape} (same B and Dh, K "
                     "dividing H)")
  if not q.dtype == k.dtype == v.dtype:
    raise ValueError(f"q, k, v dtypes must match; got {q.dtype}, {k.dtype}, {v.dtype}")
  _check_meta(meta, b, t, s, h, kh)
  if not interpret:
    check_tpu_blocks(t, s, meta.block_q, meta.block_kv)
  return _attention(float(scale), interpret, q, k, v, meta, m)

"""Block-sparse attention: the layout metadata the kernels read, the mask, and the reference.

Shapes follow `jax.nn.dot_product_attention`: q [B, T, H, Dh], k and v [B, S, K, Dh] with
K dividing H (grouped-query attention: query head h reads kv head h // (H / K)).

A layout is any object with the fields of `model.BlockLayout` (this package imports no
other sparq package, so it reads them by name): `kv_num_blocks` [B', Hl, Qb],
`kv_indices` [B', Hl, Qb, M] (ascending in each active prefix), optional `full_num_blocks`
/ `full_indices` of the same form, and the static `block_q`, `block_kv`. B' is 1 or B; Hl
is 1, K or H. The active set of a q block is the union of both lists; on "full" blocks
the kernels skip the element mask (the claim is trusted), on partial blocks they compute
it from the `Mask` below. The reference applies the element mask everywhere, so a correct
full claim never changes the result.

`build_meta` turns a layout into `BlockMeta`, the int32 arrays the kernels take:
  * merged lists (both lists, ascending, with a per-entry full flag), padded past the
    count by repeating the last active index, so a kernel that walks a fixed number of
    grid steps re-points skipped steps at the block it fetched last (no new DMA);
  * the split lists (partial and full apart), for kernels that loop over each kind;
  * the transposed (kv-major) lists: for each kv block, the q blocks that attend to it,
    used by the dk / dv backward kernel.

Queries that see no key (an empty layout row, or every key masked) get output 0 and
log-sum-exp `NEG_INF` (-1e30, finite, so partial results still merge without NaN): the
convention of `model.attention`'s block-sparse path.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Bool, Float, Int

NEG_INF = -1e30
DTYPES = ("float32", "bfloat16")


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Mask:
  """The element mask inside partial blocks, computed in-kernel from per-token vectors.

  A query at position qp sees a key at position kp iff all of:
    causal: kp <= qp;
    window: qp - kp < window, or kp < sinks (the first `sinks` positions stay visible);
    segments: q_segment_ids == kv_segment_ids (packed sequences).
  q_positions [B, T] / kv_positions [B, S] default to arange (row 0 broadcast if B' = 1);
  kv_segment_ids defaults to q_segment_ids (self-attention over a packed batch).
  """

  causal: bool = dataclasses.field(default=False, metadata=dict(static=True))
  window: int | None = dataclasses.field(default=None, metadata=dict(static=True))
  sinks: int = dataclasses.field(default=0, metadata=dict(static=True))
  q_positions: Int[Array, "B T"] | None = None
  kv_positions: Int[Array, "B S"] | None = None
  q_segment_ids: Int[Array, "B T"] | None = None
  kv_segment_ids: Int[Array, "B S"] | None = None

  @property
  def has_segments(self) -> bool:
    return self.q_segment_ids is not None or self.kv_segment_ids is not None


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class MaskArrays:
  """`Mask`'s vectors materialized for the kernels: int32, full batch.

  q_pos [B, T], kv_pos [B, S] always; q_seg [B, T] / kv_seg [B, S] only with segments.
  """

  q_pos: Int[Array, "B T"]
  kv_pos: Int[Array, "B S"]
  q_seg: Int[Array, "B T"] | None
  kv_seg: Int[Array, "B S"] | None
  causal: bool = dataclasses.field(metadata=dict(static=True))
  window: int | None = dataclasses.field(metadata=dict(static=True))
  sinks: int = dataclasses.field(metadata=dict(static=True))


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class BlockMeta:
  """A layout as kernel metadata (all int32; see the module docstring).

  Leading axes [B', Hl] as in the layout. q-major lists are over Qb q blocks, kv-major
  (transposed) lists over Sb kv blocks; `*_full` flags are 1 on full blocks.
    num [B', Hl, Qb], idx [B', Hl, Qb, L], full [B', Hl, Qb, L]      merged q-major
    p_num, p_idx [.., Lp] / f_num, f_idx [.., Lf]                     split q-major
    t_num [B', Hl, Sb], t_idx [B', Hl, Sb, Lt], t_full [.., Lt]      merged kv-major
    tp_num, tp_idx / tf_num, tf_idx                                   split kv-major
  Entries past a count repeat the last active entry (0 when the count is 0).
  """

  num: Int[Array, "B Hl Qb"]
  idx: Int[Array, "B Hl Qb L"]
  full: Int[Array, "B Hl Qb L"]
  p_num: Int[Array, "B Hl Qb"]
  p_idx: Int[Array, "B Hl Qb Lp"]
  f_num: Int[Array, "B Hl Qb"]
  f_idx: Int[Array, "B Hl Qb Lf"]
  t_num: Int[Array, "B Hl Sb"]
  t_idx: Int[Array, "B Hl Sb Lt"]
  t_full: Int[Array, "B Hl Sb Lt"]
  tp_num: Int[Array, "B Hl Sb"]
  tp_idx: Int[Array, "B Hl Sb Ltp"]
  tf_num: Int[Array, "B Hl Sb"]
  tf_idx: Int[Array, "B Hl Sb Ltf"]
  block_q: int = dataclasses.field(metadata=dict(static=True))
  block_kv: int = dataclasses.field(metadata=dict(static=True))

  @property
  def batch(self) -> int:
    """B': 1 (one layout for every row) or the batch."""
    return self.num.shape[0]

  @property
  def heads(self) -> int:
    """Hl: 1, the kv heads or the query heads."""
    return self.num.shape[1]


def layout_head(h, layout_heads: int, heads: int, kv_heads: int):
  """The layout's head index for query head `h` (an int or a traced scalar)."""
  if layout_heads == heads:
    return h
  if layout_heads == kv_heads:
    g = heads // kv_heads
    # lax.div (truncating; h >= 0) rather than //: jnp's floor division lowers through
    # `sign`, which Mosaic's TPU lowering cannot do without a TPU attached.
    return h // g if isinstance(h, int) else jax.lax.div(h, jnp.asarray(g, h.dtype))
  return h * 0


def layout_row(b, layout_batch: int):
  """The layout's batch index for row `b`."""
  return b if layout_batch > 1 else b * 0


# --- Checks -----------------------------------------------------------------------------


def _is_concrete(*xs) -> bool:
  return not any(isinstance(x, jax.core.Tracer) for x in xs)


def check_qkv(q, k, v) -> tuple[int, int, int, int, int, int]:
  """(B, T, H, S, K, Dh) of valid q [B, T, H, Dh], k / v [B, S, K, Dh]; ValueError otherwise."""
  for name, x in (("q", q), ("k", k), ("v", v)):
    if getattr(x, "ndim", None) != 4:
      raise ValueError(f"{name} must be a 4-D array ([B, T, H, Dh] for q, [B, S, K, Dh] for "
                       f"k and v); got shape {getattr(x, 'shape', None)}")
    if jnp.dtype(x.dtype).name not in DTYPES:
      raise ValueError(f"{name}.dtype={x.dtype}; valid: {', '.join(DTYPES)}")
  if not q.dtype == k.dtype == v.dtype:
    raise ValueError(f"q, k, v dtypes must match; got {q.dtype}, {k.dtype}, {v.dtype}")
  b, t, h, dh = q.shape
  if k.shape != v.shape:
    raise ValueError(f"k.shape={k.shape} must equal v.shape={v.shape}")
  if k.shape[0] != b or k.shape[3] != dh:
    raise ValueError(f"k.shape={k.shape} must be [B={b}, S, K, Dh={dh}] (q.shape={q.shape})")
  s, kh = k.shape[1], k.shape[2]
  if kh < 1 or h % kh:
    raise ValueError(f"kv heads K={kh} must divide query heads H={h}")
  return b, t, h, s, kh, dh


def check_blocks(t: int, s: int, block_q: int, block_kv: int) -> None:
  """The kernels tile T and S exactly: ValueError unless block_q | T and block_kv | S."""
  for name, blk, n, dim in (("block_q", block_q, t, "T"), ("block_kv", block_kv, s, "S")):
    if isinstance(blk, bool) or not isinstance(blk, int) or blk < 1:
      raise ValueError(f"{name}={blk!r} must be a positive int")
    if n % blk:
      raise ValueError(f"{name}={blk} must divide {dim}={n} (the kernels tile it exactly; "
                       f"valid: a divisor of {n})")


def check_layout(layout, b: int, t: int, s: int, h: int, kh: int) -> None:
  """ValueError unless `layout` fits: field shapes, batch / heads axes, and (when concrete)
  counts in range and indices in [0, Sb), strictly ascending in each active prefix."""
  for name in ("kv_num_blocks", "kv_indices", "block_q", "block_kv"):
    if not hasattr(layout, name):
      raise ValueError(f"layout has no field {name!r}: pass a model.BlockLayout (or an object "
                       "with its fields), or layout=None for dense attention")
  bq, bkv = layout.block_q, layout.block_kv
  check_blocks(t, s, bq, bkv)
  qb, sb = t // bq, s // bkv
  lists = [("kv", layout.kv_num_blocks, layout.kv_indices)]
  full_num, full_idx = getattr(layout, "full_num_blocks", None), getattr(
      layout, "full_indices", None)
  if (full_num is None) != (full_idx is None):
    raise ValueError("layout: give both full_num_blocks and full_indices, or neither")
  if full_num is not None:
    lists.append(("full", full_num, full_idx))
  for name, num, idx in lists:
    num_shape, idx_shape = tuple(num.shape), tuple(idx.shape)
    if len(num_shape) != 3 or len(idx_shape) != 4 or idx_shape[:3] != num_shape:
      raise ValueError(f"layout.{name}_num_blocks {num_shape} must be [B, H, Qb] and "
                       f"{name}_indices {idx_shape} [B, H, Qb, M]")
    if num_shape[0] not in (1, b):
      raise ValueError(f"layout batch axis {num_shape[0]}; valid: 1 or the batch {b}")
    if num_shape[1] not in (1, kh, h):
      raise ValueError(f"layout head axis {num_shape[1]}; valid: 1, the kv heads {kh} or the "
                       f"query heads {h}")
    if num_shape[2] != qb:
      raise ValueError(f"layout has {num_shape[2]} q blocks; T={t} in blocks of {bq} needs {qb}")
    if not jnp.issubdtype(num.dtype, jnp.integer) or not jnp.issubdtype(idx.dtype, jnp.integer):
      raise ValueError(f"layout.{name} lists must be integer arrays; got {num.dtype}, "
                       f"{idx.dtype}")
    if _is_concrete(num, idx):
      check_index_lists(f"layout.{name}", num, idx, sb, f"(S={s} in blocks of {bkv})")
  if len(lists) == 2 and _is_concrete(*lists[0][1:], *lists[1][1:]):
    both = _np_list_mask(*lists[0][1:], sb) & _np_list_mask(*lists[1][1:], sb)
    if both.any():
      raise ValueError("layout: a kv block is in both the partial and the full list of one q "
                       "block; each active block belongs to exactly one")
  if len(lists) == 2 and tuple(lists[0][1].shape[:2]) != tuple(lists[1][1].shape[:2]):
    raise ValueError(f"layout: partial lists {tuple(lists[0][1].shape)} and full lists "
                     f"{tuple(lists[1][1].shape)} must share batch and head axes")


def check_index_lists(name: str, num, idx, n_blocks: int, blocks_are: str) -> None:
  """ValueError unless concrete lists (`name`_num_blocks, `name`_indices) are valid: counts
  in [0, list length], active indices in [0, n_blocks), strictly ascending. Shared by
  `model.BlockLayout.check`; `blocks_are` says what the blocks tile (for the message)."""
  num, idx = np.asarray(num), np.asarray(idx)
  m = idx.shape[-1]
  if num.size and (num.min() < 0 or num.max() > m):
    raise ValueError(f"{name}_num_blocks must lie in [0, {m}] (the list length); got "
                     f"[{num.min()}, {num.max()}]")
  active = np.arange(m) < num[..., None]
  bad = active & ((idx < 0) | (idx >= n_blocks))
  if bad.any():
    raise ValueError(f"{name}_indices holds block {idx[bad][0]}; valid: 0..{n_blocks - 1} "
                     f"{blocks_are}")
  if m > 1 and np.any(active[..., 1:] & (np.diff(idx, axis=-1) <= 0)):
    raise ValueError(f"{name}_indices must be strictly ascending within each q block's first "
                     f"{name.rpartition('.')[2]}_num_blocks entries")


def check_mask(mask: Mask, b: int, t: int, s: int) -> None:
  if not isinstance(mask, Mask):
    raise ValueError(f"mask must be a pallas_kernels.block_sparse.Mask; got {type(mask)}")
  if mask.window is not None and (isinstance(mask.window, bool) or not isinstance(
      mask.window, int) or mask.window < 1):
    raise ValueError(f"mask.window={mask.window!r}; valid: None or an int >= 1")
  if isinstance(mask.sinks, bool) or not isinstance(mask.sinks, int) or mask.sinks < 0:
    raise ValueError(f"mask.sinks={mask.sinks!r}; valid: an int >= 0")
  if mask.sinks and mask.window is None:
    raise ValueError(f"mask.sinks={mask.sinks} needs a window (sinks stay visible through it)")
  for name, n in (("q_positions", t), ("kv_positions", s), ("q_segment_ids", t),
                  ("kv_segment_ids", s)):
    x = getattr(mask, name)
    if x is None:
      continue
    if getattr(x, "ndim", None) != 2 or x.shape[0] not in (1, b) or x.shape[1] != n:
      raise ValueError(f"mask.{name} shape {getattr(x, 'shape', None)}; valid: [{b} or 1, {n}]")
    if not jnp.issubdtype(x.dtype, jnp.integer):
      raise ValueError(f"mask.{name} must be an integer array; got {x.dtype}")


# --- Metadata ---------------------------------------------------------------------------


def mask_arrays(mask: Mask, b: int, t: int, s: int) -> MaskArrays:
  """`mask`'s vectors, int32 and broadcast to the full batch."""
  full = lambda x, n, default: jnp.broadcast_to(
      (jnp.arange(n)[None] if x is None else x).astype(jnp.int32), (b, n))
  q_seg = kv_seg = None
  if mask.has_segments:
    qs = mask.q_segment_ids if mask.q_segment_ids is not None else mask.kv_segment_ids
    ks = mask.kv_segment_ids if mask.kv_segment_ids is not None else mask.q_segment_ids
    if qs.shape[1] != t or ks.shape[1] != s:
      raise ValueError(f"one segment-id vector stands for both sides only when T == S; got "
                       f"T={t}, S={s}: give q_segment_ids and kv_segment_ids")
    q_seg, kv_seg = full(qs, t, None), full(ks, s, None)
  return MaskArrays(q_pos=full(mask.q_positions, t, None), kv_pos=full(mask.kv_positions, s,
                    None), q_seg=q_seg, kv_seg=kv_seg, causal=mask.causal,
                    window=mask.window, sinks=mask.sinks)


def element_mask(m: MaskArrays, qpos, kpos, qseg=None, kseg=None):
  """The element mask from broadcastable per-query / per-key vectors; `m` is anything with
  `causal`, `window` and `sinks` (MaskArrays here, `model.AttentionMask` too)."""
  ok = jnp.ones(jnp.broadcast_shapes(qpos.shape, kpos.shape), bool)
  if m.causal:
    ok &= kpos <= qpos
  if m.window is not None:
    in_window = (qpos - kpos) < m.window
    if m.sinks:
      in_window |= kpos < m.sinks
    ok &= in_window
  if qseg is not None:
    ok &= qseg == kseg
  return ok


def _np_list_mask(num, idx, n_blocks: int) -> np.ndarray:
  """`list_mask` in numpy, for checks on concrete lists (also while tracing around them)."""
  num, idx = np.asarray(num), np.asarray(idx)
  active = np.arange(idx.shape[-1]) < num[..., None]
  hit = (idx[..., None] == np.arange(n_blocks)) & active[..., None]
  return hit.any(axis=-2)


def list_mask(num, idx, n_blocks: int) -> Bool[Array, "B H Qb Sb"]:
  """The boolean [.., n_blocks] mask of index lists (counts [..], indices [.., M])."""
  num, idx = jnp.asarray(num), jnp.asarray(idx)
  active = jnp.arange(idx.shape[-1]) < num[..., None]
  hit = (idx[..., None] == jnp.arange(n_blocks)) & active[..., None]
  return jnp.any(hit, axis=-2)


def block_masks(layout, s: int) -> tuple[Bool[Array, "B H Qb Sb"], Bool[Array, "B H Qb Sb"]]:
  """(partial, full) boolean block masks [B', Hl, Qb, Sb] of a layout."""
  sb = s // layout.block_kv
  partial = list_mask(layout.kv_num_blocks, layout.kv_indices, sb)
  if getattr(layout, "full_num_blocks", None) is None:
    return partial, jnp.zeros_like(partial)
  return partial, list_mask(layout.full_num_blocks, layout.full_indices, sb)


def _lists(mask, length: int | None = None):
  """(counts, ascending indices padded with the last active one) of a [.., n] bool mask."""
  n = mask.shape[-1]
  num = jnp.sum(mask, axis=-1, dtype=jnp.int32)
  if length is None:
    length = n
    if _is_concrete(num):
      length = max(int(num.max()) if num.size else 0, 1)
  order = jnp.argsort(~mask, axis=-1, stable=True).astype(jnp.int32)[..., :length]
  last = jnp.take_along_axis(order, jnp.clip(num - 1, 0, length - 1)[..., None], axis=-1)
  pos = jnp.arange(length)
  idx = jnp.where(pos < num[..., None], order, jnp.where(num[..., None] > 0, last, 0))
  return num, idx.astype(jnp.int32)


def _merged(partial, full, length: int | None = None):
  num, idx = _lists(partial | full, length)
  is_full = jnp.take_along_axis(full, idx, axis=-1).astype(jnp.int32)
  is_full = jnp.where(jnp.arange(idx.shape[-1]) < num[..., None], is_full, 0)
  return num, idx, is_full


def build_meta(layout, s: int) -> BlockMeta:
  """Kernel metadata of a (checked) layout over S keys: merged, split and transposed lists."""
  partial, full = block_masks(layout, s)
  num, idx, is_full = _merged(partial, full)
  p_num, p_idx = _lists(partial)
  f_num, f_idx = _lists(full)
  tpart, tfull = jnp.swapaxes(partial, -1, -2), jnp.swapaxes(full, -1, -2)
  t_num, t_idx, t_full = _merged(tpart, tfull)
  tp_num, tp_idx = _lists(tpart)
  tf_num, tf_idx = _lists(tfull)
  return BlockMeta(num=num, idx=idx, full=is_full, p_num=p_num, p_idx=p_idx, f_num=f_num,
                   f_idx=f_idx, t_num=t_num, t_idx=t_idx, t_full=t_full, tp_num=tp_num,
                   tp_idx=tp_idx, tf_num=tf_num, tf_idx=tf_idx, block_q=layout.block_q,
                   block_kv=layout.block_kv)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True, kw_only=True)
class Layout:
  """A plain layout (the fields of `model.BlockLayout`), built here for dense mode."""

  kv_num_blocks: Int[Array, "B H Qb"]
  kv_indices: Int[Array, "B H Qb M"]
  full_num_blocks: Int[Array, "B H Qb"] | None = None
  full_indices: Int[Array, "B H Qb F"] | None = None
  block_q: int = dataclasses.field(metadata=dict(static=True))
  block_kv: int = dataclasses.field(metadata=dict(static=True))


def dense_layout(m: MaskArrays, block_q: int, block_kv: int) -> Layout:
  """The layout of dense attention under mask `m`: the kernels' "dense mode".

  Every (q block, kv block) pair is classified from the blocks' position ranges (and
  segment-id ranges): hidden for every position pair in the ranges' rectangle (dropped),
  visible for every pair (full: no element mask), or else partial. The rectangle contains
  every pair the blocks hold, so "full" is always true and nothing visible is dropped;
  for the usual arange positions the classification is exact (causal: the diagonal blocks
  partial, the ones below full, the ones above skipped). Works on traced masks; the layout
  has one row per batch row and one head.
  """
  b, t = m.q_pos.shape
  s = m.kv_pos.shape[1]
  check_blocks(t, s, block_q, block_kv)
  qb, sb = t // block_q, s // block_kv
  qp = m.q_pos.reshape(b, qb, block_q)
  kp = m.kv_pos.reshape(b, sb, block_kv)
  q_lo, q_hi = qp.min(-1)[:, :, None], qp.max(-1)[:, :, None]  # [B, Qb, 1]
  k_lo, k_hi = kp.min(-1)[:, None, :], kp.max(-1)[:, None, :]  # [B, 1, Sb]
  any_vis = jnp.ones((b, qb, sb), bool)
  all_vis = jnp.ones((b, qb, sb), bool)
  if m.causal:  # d = q - k ranges over [q_lo - k_hi, q_hi - k_lo]
    any_vis &= q_hi - k_lo >= 0
    all_vis &= q_lo - k_hi >= 0
  if m.window is not None:
    near_any = q_lo - k_hi < m.window
    near_all = q_hi - k_lo < m.window
    if m.sinks:
      sink_any = (k_lo < m.sinks) & ((q_hi - k_lo >= 0) if m.causal else True)
      near_any |= sink_any
      near_all |= k_hi < m.sinks
    any_vis &= near_any
    all_vis &= near_all
  if m.q_seg is not None:
    qs = m.q_seg.reshape(b, qb, block_q)
    ks = m.kv_seg.reshape(b, sb, block_kv)
    qs_lo, qs_hi = qs.min(-1)[:, :, None], qs.max(-1)[:, :, None]
    ks_lo, ks_hi = ks.min(-1)[:, None, :], ks.max(-1)[:, None, :]
    any_vis &= (qs_lo <= ks_hi) & (ks_lo <= qs_hi)
    all_vis &= (qs_lo == qs_hi) & (ks_lo == ks_hi) & (qs_lo == ks_lo)
  full = (any_vis & all_vis)[:, None]
  partial = (any_vis & ~all_vis)[:, None]
  num, idx = _lists(partial)
  fnum, fidx = _lists(full)
  return Layout(kv_num_blocks=num, kv_indices=idx, full_num_blocks=fnum, full_indices=fidx,
                block_q=block_q, block_kv=block_kv)


# --- Reference ----------------------------------------------------------------------------


def reference(q: Float[Array, "B T H Dh"], k: Float[Array, "B S K Dh"],
              v: Float[Array, "B S K Dh"], layout: Any = None, *, mask: Mask | None = None,
              scale: float | None = None, return_lse: bool = False, interpret=None,
              block_q: int | None = None, block_kv: int | None = None):
  """Dense masked softmax attention in f32 (same signature as the kernels' entry point).

  The visible set is the layout's active blocks (all keys for layout=None) intersected with
  the element mask. Returns out [B, T, H, Dh] in q's dtype, and lse [B, T, H] (f32) with
  `return_lse`. interpret / block sizes are accepted and unused.
  """
  del interpret, block_q, block_kv
  b, t, h, s, kh, dh = check_qkv(q, k, v)
  mask = Mask() if mask is None else mask
  check_mask(mask, b, t, s)
  m = mask_arrays(mask, b, t, s)
  vis = element_mask(m, m.q_pos[:, :, None], m.kv_pos[:, None, :],
                     None if m.q_seg is None else m.q_seg[:, :, None],
                     None if m.kv_seg is None else m.kv_seg[:, None, :])[:, None]  # [B,1,T,S]
  if layout is not None:
    check_layout(layout, b, t, s, h, kh)
    partial, full = block_masks(layout, s)
    blocks = partial | full  # [B', Hl, Qb, Sb]
    dense = jnp.repeat(jnp.repeat(blocks, layout.block_q, axis=2), layout.block_kv, axis=3)
    hl = dense.shape[1]
    heads = jnp.arange(h)
    dense = dense[:, layout_head(heads, hl, h, kh) if hl > 1 else jnp.zeros_like(heads)]
    vis = vis & dense
  g = h // kh
  scale = dh ** -0.5 if scale is None else scale
  q32 = q.astype(jnp.float32)
  k32 = jnp.repeat(k.astype(jnp.float32), g, axis=2)
  v32 = jnp.repeat(v.astype(jnp.float32), g, axis=2)
  logits = jnp.einsum("bthd,bshd->bhts", q32, k32) * scale
  logits = jnp.where(vis, logits, -jnp.inf)
  mx = jnp.max(logits, axis=-1, keepdims=True)
  seen = mx > -jnp.inf
  p = jnp.where(vis, jnp.exp(logits - jnp.where(seen, mx, 0.0)), 0.0)
  denom = jnp.sum(p, axis=-1, keepdims=True)
  out = jnp.einsum("bhts,bshd->bthd", p / jnp.where(seen, denom, 1.0), v32).astype(q.dtype)
  if not return_lse:
    return out
  lse = jnp.where(seen, mx + jnp.log(jnp.where(seen, denom, 1.0)), NEG_INF)[..., 0]
  return out, jnp.transpose(lse, (0, 2, 1))

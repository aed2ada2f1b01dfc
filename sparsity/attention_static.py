"""Static block layouts (`model.BlockLayout`) of the usual element masks, and set algebra.

Each builder marks a (q block, kv block) pair active when any (query, key) pair inside it
is visible under its element mask, and lists it as full when every real pair is (the
padding of a partial last block aside), so `to_dense` equals the element mask where that
mask is block-aligned and covers it otherwise. Positions: query i sits at q_offset + i,
key j at j. Block bounds are computed in closed form per block pair (O(Qb * Sb)), except
`segment_layout` (arbitrary ids: one [B, T, T] pass, jittable).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Int

from model.attention import BlockLayout


def check_block(name: str, value) -> int:
  """A positive-int block size, or ValueError naming the argument."""
  if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
    raise ValueError(f"{name}={value!r} must be a positive int (tokens per block)")
  return int(value)


def _check_len(name: str, value, low: int = 1) -> int:
  if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low:
    raise ValueError(f"{name}={value!r} must be an int >= {low}")
  return int(value)


def _bounds(t: int, s: int, bq: int, bk: int, q_offset: int):
  """First / last real query position per q block [Qb, 1] and key per kv block [1, Sb]."""
  qb, sb = -(-t // bq), -(-s // bk)
  q0 = q_offset + np.arange(qb)[:, None] * bq
  q1 = q_offset + np.minimum(np.arange(qb)[:, None] * bq + bq, t) - 1
  k0 = np.arange(sb)[None] * bk
  k1 = np.minimum(np.arange(sb)[None] * bk + bk, s) - 1
  return q0, q1, k0, k1


def _layout(active, full, bq, bk) -> BlockLayout:
  """A [1, 1, Qb, Sb] layout from numpy block masks (full a subset of active)."""
  full = full & active
  return BlockLayout.from_block_mask(jnp.asarray(active[None, None]), block_q=bq, block_kv=bk,
                                     full_mask=jnp.asarray(full[None, None]))


def _static_args(t, s, block_q, block_kv, q_offset):
  t, s = _check_len("t", t), _check_len("s", s)
  bq, bk = check_block("block_q", block_q), check_block("block_kv", block_kv)
  q_offset = _check_len("q_offset", q_offset, 0)
  return t, s, bq, bk, q_offset


def causal_layout(t: int, s: int, *, block_q: int, block_kv: int,
                  q_offset: int = 0) -> BlockLayout:
  """Causal attention (key <= query) of T queries at q_offset + i over S keys."""
  t, s, bq, bk, off = _static_args(t, s, block_q, block_kv, q_offset)
  q0, q1, k0, k1 = _bounds(t, s, bq, bk, off)
  return _layout(k0 <= q1, k1 <= q0, bq, bk)


def window_layout(t: int, s: int, window: int, *, block_q: int, block_kv: int, sinks: int = 0,
                  q_offset: int = 0) -> BlockLayout:
  """Causal sliding window (query - key < window) plus the first `sinks` keys
  (StreamingLLM), as `AttentionMask(causal=True, window=window, sinks=sinks)`."""
  t, s, bq, bk, off = _static_args(t, s, block_q, block_kv, q_offset)
  window, sinks = _check_len("window", window), _check_len("sinks", sinks, 0)
  q0, q1, k0, k1 = _bounds(t, s, bq, bk, off)
  # Some pair k <= q < k + window exists iff k0 <= q1 and k1 + window - 1 >= q0.
  active = (k0 <= q1) & ((k1 + window - 1 >= q0) | (k0 < sinks))
  # Every pair: causal everywhere, and every non-sink key within the window of the last query.
  full = (k1 <= q0) & ((k1 < sinks) | (q1 - np.maximum(k0, sinks) < window))
  return _layout(active, full, bq, bk)


def global_layout(t: int, s: int, global_tokens: int, *, block_q: int, block_kv: int,
                  q_offset: int = 0) -> BlockLayout:
  """Causal attention plus `global_tokens` global positions: positions < G attend to every
  key and every query attends to them (element mask: key <= query or query < G or key < G).
  No `AttentionMask` spells that mask: with causal=False, this layout's diagonal blocks
  also admit future keys (it is exact only for block-aligned G and block size 1 causality).
  """
  t, s, bq, bk, off = _static_args(t, s, block_q, block_kv, q_offset)
  g = _check_len("global_tokens", global_tokens, 0)
  q0, q1, k0, k1 = _bounds(t, s, bq, bk, off)
  active = (k0 <= q1) | (q0 < g) | (k0 < g)
  # Every non-global query must see every non-global key of the block causally.
  full = (q1 < g) | (k1 < g) | (k1 <= np.maximum(q0, g))
  return _layout(active, full, bq, bk)


def segment_layout(segment_ids_BT: Int[Array, "B T"], *, block_q: int, block_kv: int,
                   causal: bool = True) -> BlockLayout:
  """Packed rows: query i sees key j iff their segment ids match (and j <= i if causal),
  per row: a [B, 1, Qb, Sb] layout (block-diagonal for contiguous segments). Jittable
  (under jit the index lists have Sb entries)."""
  bq, bk = check_block("block_q", block_q), check_block("block_kv", block_kv)
  seg = jnp.asarray(segment_ids_BT)
  if seg.ndim != 2:
    raise ValueError(f"segment_ids_BT must be [B, T], got shape {seg.shape}")
  b, t = seg.shape
  m = seg[:, :, None] == seg[:, None, :]
  if causal:
    m &= jnp.tril(jnp.ones((t, t), bool))[None]
  qb, sb = -(-t // bq), -(-t // bk)
  real = jnp.pad(jnp.ones((t, t), bool), ((0, qb * bq - t), (0, sb * bk - t)))
  mp = jnp.pad(m, ((0, 0), (0, qb * bq - t), (0, sb * bk - t)))
  mp = mp.reshape(b, qb, bq, sb, bk)
  real = real.reshape(1, qb, bq, sb, bk)
  active = jnp.any(mp, axis=(2, 4))
  full = jnp.all(mp | ~real, axis=(2, 4)) & active
  return BlockLayout.from_block_mask(active[:, None], block_q=bq, block_kv=bk,
                                     full_mask=full[:, None])


def _masks(layout: BlockLayout, sb: int):
  """(active, full) boolean block masks [B, H, Qb, sb]; full is empty without full lists."""
  active = layout.block_mask(sb)
  if layout.full_indices is None:
    return active, jnp.zeros_like(active)
  return active, _full_only(layout, sb)


def _full_only(layout: BlockLayout, sb: int):
  return layout.replace(kv_num_blocks=layout.full_num_blocks, kv_indices=layout.full_indices,
                        full_num_blocks=None, full_indices=None).block_mask(sb)


def _kv_blocks(layouts, kv_blocks):
  if kv_blocks is not None:
    return _check_len("kv_blocks", kv_blocks)
  most = 0
  for lay in layouts:
    lists = [(lay.kv_num_blocks, lay.kv_indices)]
    if lay.full_indices is not None:
      lists.append((lay.full_num_blocks, lay.full_indices))
    for num, idx in lists:
      if isinstance(num, jax.core.Tracer) or isinstance(idx, jax.core.Tracer):
        raise ValueError("kv_blocks=None needs concrete layouts; pass kv_blocks under jit")
      num, idx = np.asarray(num), np.asarray(idx)
      active = np.arange(idx.shape[-1]) < num[..., None]
      if active.any():
        most = max(most, int(idx[active].max()) + 1)
  return max(most, 1)


def _combine(a: BlockLayout, b: BlockLayout, kv_blocks, op, name) -> BlockLayout:
  for lay, arg in ((a, "a"), (b, "b")):
    if not isinstance(lay, BlockLayout):
      raise ValueError(f"{name}: {arg} must be a model.BlockLayout, got {type(lay).__name__}")
  if (a.block_q, a.block_kv) != (b.block_q, b.block_kv):
    raise ValueError(f"{name}: block sizes differ: a has (block_q, block_kv) = "
                     f"({a.block_q}, {a.block_kv}), b ({b.block_q}, {b.block_kv}); "
                     "both layouts need the same blocks")
  if a.q_blocks != b.q_blocks:
    raise ValueError(f"{name}: a has {a.q_blocks} q blocks, b {b.q_blocks}")
  for axis, what in ((0, "batch"), (1, "heads")):
    na, nb = a.kv_num_blocks.shape[axis], b.kv_num_blocks.shape[axis]
    if na != nb and 1 not in (na, nb):
      raise ValueError(f"{name}: {what} {na} (a) and {nb} (b) must match or be 1")
  sb = _kv_blocks((a, b), kv_blocks)
  (act_a, full_a), (act_b, full_b) = _masks(a, sb), _masks(b, sb)
  active, full = op(act_a, act_b), op(full_a, full_b)
  return BlockLayout.from_block_mask(active, block_q=a.block_q, block_kv=a.block_kv,
                                     full_mask=full)


def union(a: BlockLayout, b: BlockLayout, *, kv_blocks: int | None = None) -> BlockLayout:
  """Blocks active in either layout; full where either lists it full (the result's element
  mask is taken to be the union of the operands'). kv_blocks: Sb (inferred when
  concrete); batch / head axes broadcast (1 vs n)."""
  return _combine(a, b, kv_blocks, jnp.logical_or, "union")


def intersection(a: BlockLayout, b: BlockLayout, *,
                 kv_blocks: int | None = None) -> BlockLayout:
  """Blocks active in both layouts; full where both list it full (element mask taken to
  be the intersection of the operands')."""
  return _combine(a, b, kv_blocks, jnp.logical_and, "intersection")

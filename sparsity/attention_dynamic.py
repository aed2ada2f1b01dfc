"""Dynamic block layouts: functions of the queries and keys (Quest top-k, HiP, SALE).

All are jittable with fixed shapes and return a `model.BlockLayout` with one list per
(row, kv head): a GQA group shares its kv head's list, and a block's score for the group
is the max over the group's query heads (and over the q block's rows) of the per-head
score, so a block any of them ranks high is kept. Queries are cut into blocks of
min(block_q, T) rows (decode: one), keys into blocks of block_kv slots.

Visibility: a kv block counts (may be scored and picked) only if some (query, key) pair
of the (q block, kv block) is visible under `mask` (positions, causality, kv_valid; window
and segments via the materialized mask). Always kept, if visible: the first `sinks` kv
blocks and `local` diagonal blocks: the last visible block of the q block (the one
holding its newest position under causality) and the local - 1 before it, plus
ceil(block_q / block_kv) - 1 more so every query of a q block keeps its own block. The
index lists hold min(Sb, budget + sinks + those local blocks) entries: what the XLA path
computes per q block.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float

from model.attention import AttentionMask, BlockLayout
from sparsity.attention_static import check_block

_BIG = 2 ** 30
POOLS = ("minmax", "mean")


def _check_int(name, value, low, high=None):
  bad = isinstance(value, bool) or not isinstance(value, int) or value < low or (
      high is not None and value > high)
  if bad:
    rng = f"[{low}, {high}]" if high is not None else f">= {low}"
    raise ValueError(f"{name}={value!r} must be an int in {rng}")
  return value


class _Prep:
  """Shapes, block sizes, per-block visibility and the always-kept blocks of one call."""

  def __init__(self, q_BTHD, k_BKSD, mask, block_q, block_kv, sinks, local):
    if q_BTHD.ndim != 4 or k_BKSD.ndim != 4:
      raise ValueError(f"q must be [B, T, H, Dh] and keys [B, K, S, Dh]; got {q_BTHD.shape} "
                       f"and {k_BKSD.shape}")
    self.b, self.t, self.h, d = q_BTHD.shape
    kb, self.kh, self.s, dk = k_BKSD.shape
    if kb != self.b or dk != d or self.h % self.kh:
      raise ValueError(f"q {q_BTHD.shape} and keys {k_BKSD.shape}: batch and Dh must match "
                       "and kv heads K must divide query heads H")
    self.g = self.h // self.kh
    self.bq = min(check_block("block_q", block_q), self.t)
    self.bk = check_block("block_kv", block_kv)
    self.qb, self.sb = -(-self.t // self.bq), -(-self.s // self.bk)
    self.sinks = _check_int("sinks", sinks, 0)
    self.local = _check_int("local", local, 0)
    self.mask = AttentionMask() if mask is None else mask
    m, b, t, s = self.mask, self.b, self.t, self.s
    self.qpos = jnp.broadcast_to(jnp.arange(t)[None] if m.q_positions is None
                                 else m.q_positions, (b, t))
    self.kpos = jnp.broadcast_to(jnp.arange(s)[None] if m.kv_positions is None
                                 else m.kv_positions, (b, s))
    self.kval = jnp.broadcast_to(jnp.ones((1, s), bool) if m.kv_valid is None
                                 else m.kv_valid, (b, s))
    self.vis = self._visible()  # [B, Qb, Sb]
    j = jnp.arange(self.sb)
    last = jnp.max(jnp.where(self.vis, j, -1), axis=-1, keepdims=True)
    self.n_local = self.local + -(-self.bq // self.bk) - 1 if self.local else 0
    self.first_local = last - self.n_local + 1  # [B, Qb, 1]
    loc = (j >= self.first_local) & (j <= last)
    self.forced = self.vis & ((j < self.sinks) | loc)  # [B, Qb, Sb]

  def pad_rows(self, x, fill):  # [B, T, ...] -> [B, Qb, bq, ...]
    pad = [(0, 0), (0, self.qb * self.bq - self.t)] + [(0, 0)] * (x.ndim - 2)
    return jnp.pad(x, pad, constant_values=fill).reshape(self.b, self.qb, self.bq, *x.shape[2:])

  def pad_slots(self, x, fill, axis=1):  # [..., S, ...] -> [..., Sb, bk, ...]
    pad = [(0, self.sb * self.bk - self.s if i == axis else 0) for i in range(x.ndim)]
    x = jnp.pad(x, pad, constant_values=fill)
    return x.reshape(*x.shape[:axis], self.sb, self.bk, *x.shape[axis + 1:])

  def _visible(self):
    m = self.mask
    if m.window is not None or m.q_segment_ids is not None:
      dense = self.pad_rows(m.materialize(self.b, self.t, self.s), False)  # [B, Qb, bq, S]
      return jnp.any(self.pad_slots(dense, False, axis=3), axis=(2, 4))
    any_key = jnp.any(self.pad_slots(self.kval, False), axis=-1)  # [B, Sb]
    if not m.causal:
      return jnp.broadcast_to(any_key[:, None], (self.b, self.qb, self.sb))
    qmax = jnp.max(self.pad_rows(self.qpos, -_BIG), axis=-1)  # [B, Qb]
    kmin = jnp.min(self.pad_slots(jnp.where(self.kval, self.kpos, _BIG), _BIG), axis=-1)
    return kmin[:, None, :] <= qmax[:, :, None]

  def candidates(self):  # [B, 1, Qb, Sb]: visible, not already kept
    return (self.vis & ~self.forced)[:, None]

  def block_max(self, x_BKGTS):  # per-query scores -> [B, K, Qb, Sb]: max over rows, heads
    b, kh, g, t, sb = x_BKGTS.shape
    x = jnp.pad(x_BKGTS, ((0, 0),) * 3 + ((0, self.qb * self.bq - t), (0, 0)),
                constant_values=-jnp.inf)
    return jnp.max(x.reshape(b, kh, g, self.qb, self.bq, sb), axis=(2, 4))

  def pooled_keys(self, k_BKSD):
    """(min, max, mean) of each kv block's valid keys, [B, K, Sb, Dh] each (0 if none)."""
    k = self.pad_slots(k_BKSD.astype(jnp.float32), 0.0, axis=2)  # [B, K, Sb, bk, Dh]
    v = self.pad_slots(self.kval, False)[:, None, :, :, None]  # [B, 1, Sb, bk, 1]
    n = jnp.sum(v, axis=3)
    kmin = jnp.where(n > 0, jnp.min(jnp.where(v, k, jnp.inf), axis=3), 0.0)
    kmax = jnp.where(n > 0, jnp.max(jnp.where(v, k, -jnp.inf), axis=3), 0.0)
    kmean = jnp.sum(jnp.where(v, k, 0.0), axis=3) / jnp.maximum(n, 1)
    return kmin, kmax, kmean

  def finish(self, picked_BKQS, budget) -> BlockLayout:
    active = picked_BKQS | self.forced[:, None]
    most = min(self.sb, budget + min(self.sinks, self.sb) + self.n_local)
    return BlockLayout.from_block_mask(active, block_q=self.bq, block_kv=self.bk,
                                       max_kv_blocks=max(most, 1))


def _check_budget(name, value, sb, s, bk):
  if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= sb:
    raise ValueError(f"{name}={value!r} must be an int in [1, {sb}] (the kv blocks: {s} keys "
                     f"in blocks of {bk})")


def _top(score_BKQS, cand_BKQS, k) -> jax.Array:
  """Boolean [B, K, Qb, Sb]: the (up to) k best-scoring candidates of each q block."""
  s = jnp.where(cand_BKQS, score_BKQS, -jnp.inf)
  vals, idx = jax.lax.top_k(s, k)
  hit = jax.nn.one_hot(idx, s.shape[-1], dtype=bool) & (vals > -jnp.inf)[..., None]
  return jnp.any(hit, axis=-2)


def _group_q(q_BTHD, kh):
  b, t, h, d = q_BTHD.shape
  return q_BTHD.astype(jnp.float32).reshape(b, t, kh, h // kh, d)


def topk_layout(q_BTHD: Float[Array, "B T H Dh"], k_BKSD: Float[Array, "B K S Dh"],
                mask: AttentionMask | None = None, *, block_q: int, block_kv: int, k: int,
                pool: str = "minmax", sinks: int = 1, local: int = 1) -> BlockLayout:
  """Quest block top-k: keep the k best visible kv blocks per (row, kv head, q block),
  plus sinks and local blocks.

  pool="minmax": per-query score of a block is Quest's upper bound on q.key over its
  keys, sum_d max(q_d * min_d, q_d * max_d) (channel-wise min / max of the block's
  valid keys); "mean": q . (mean key). A q block's score is the max of the per-query
  scores over its rows and its group's heads. mask None: `AttentionMask()` (causal,
  positions arange); for decode pass the cache mask (q_positions absolute).
  """
  p = _Prep(q_BTHD, k_BKSD, mask, block_q, block_kv, sinks, local)
  _check_budget("k", k, p.sb, p.s, p.bk)
  if pool not in POOLS:
    raise ValueError(f"pool={pool!r}; valid: {', '.join(map(repr, POOLS))}")
  kmin, kmax, kmean = p.pooled_keys(k_BKSD)
  q = _group_q(q_BTHD, p.kh)
  if pool == "minmax":
    score = (jnp.einsum("btkgd,bksd->bkgts", jnp.maximum(q, 0.0), kmax)
             + jnp.einsum("btkgd,bksd->bkgts", jnp.minimum(q, 0.0), kmin))
  else:
    score = jnp.einsum("btkgd,bksd->bkgts", q, kmean)
  return p.finish(_top(p.block_max(score), p.candidates(), k), k)


def hip_rounds(kv_blocks: int, k: int) -> int:
  """HiP's halving rounds: enough that every one of k groups of a kv_blocks range ends
  as one block (ceil(log2(ceil(kv_blocks / k))))."""
  return max(0, math.ceil(math.log2(max(1, -(-kv_blocks // k)))))


def hip_layout(q_BTHD: Float[Array, "B T H Dh"], k_BKSD: Float[Array, "B K S Dh"],
               mask: AttentionMask | None = None, *, block_q: int, block_kv: int, k: int,
               sinks: int = 1, local: int = 1) -> BlockLayout:
  """HiP hierarchical block top-k (tree search), plus sinks and local blocks.

  Per (row, kv head, q block): the searched range is the kv blocks between the sinks and
  the first local block; it is cut into k near-equal groups [start, end). Each of
  `hip_rounds(Sb, k)` rounds halves every group at (start + end) // 2, scores each
  non-empty half by its representative block, the middle one ((start + end - 1) // 2),
  and keeps the k best halves (of 2k); at the end every group is one block. A block's
  score is its exact max logit: max over the q block's rows and the group's heads and the
  block's keys of q.key, over the pairs visible under causality, kv_valid and window.
  Cost per q block: 2k blocks scored per round, O(k * log(Sb / k)) blocks in all.
  """
  p = _Prep(q_BTHD, k_BKSD, mask, block_q, block_kv, sinks, local)
  _check_budget("k", k, p.sb, p.s, p.bk)
  b, kh, g, bq = p.b, p.kh, p.g, p.bq
  q = jnp.transpose(p.pad_rows(_group_q(q_BTHD, kh), 0.0), (0, 3, 1, 4, 2, 5))
  q = q.reshape(b, kh, p.qb, g * bq, -1)  # [B, K, Qb, R, Dh]: rows g * bq + i
  qpos = jnp.tile(p.pad_rows(p.qpos, 0), (1, 1, g))  # [B, Qb, R]
  qreal = jnp.tile(p.pad_rows(jnp.ones((b, p.t), bool), False), (1, 1, g))
  kb = p.pad_slots(k_BKSD.astype(jnp.float32), 0.0, axis=2)  # [B, K, Sb, bk, Dh]
  kpos, kval = p.pad_slots(p.kpos, 0), p.pad_slots(p.kval, False)  # [B, Sb, bk]
  m = p.mask
  bi, hi = jnp.arange(b)[:, None, None, None], jnp.arange(kh)[None, :, None, None]

  def score(c_BKQN):
    keys = kb[bi, hi, c_BKQN]  # [B, K, Qb, N, bk, Dh]
    logit = jnp.einsum("bkqrd,bkqnsd->bkqnrs", q, keys)
    kp, kv = kpos[bi, c_BKQN], kval[bi, c_BKQN]  # [B, K, Qb, N, bk]
    qp = qpos[:, None, :, None, :, None]
    ok = kv[..., None, :] & qreal[:, None, :, None, :, None]
    if m.causal:
      ok &= kp[..., None, :] <= qp
    if m.window is not None:
      ok &= ((qp - kp[..., None, :]) < m.window) | (kp[..., None, :] < m.sinks)
    return jnp.max(jnp.where(ok, logit, -jnp.inf), axis=(-2, -1))

  lo = jnp.minimum(p.sinks, p.sb)
  hi_ = jnp.maximum(p.first_local[..., 0] if p.n_local else
                    jnp.max(jnp.where(p.vis, jnp.arange(p.sb), -1), axis=-1) + 1, lo)  # [B, Qb]
  r = (hi_ - lo)[:, None, :, None]
  grp = jnp.arange(k)
  start = jnp.broadcast_to(lo + grp * r // k, (b, kh, p.qb, k))
  end = jnp.broadcast_to(lo + (grp + 1) * r // k, (b, kh, p.qb, k))
  for _ in range(hip_rounds(p.sb, k)):
    mid = (start + end) // 2
    cs, ce = jnp.concatenate([start, mid], -1), jnp.concatenate([mid, end], -1)
    rep = jnp.clip((cs + ce - 1) // 2, 0, p.sb - 1)
    sc = jnp.where(ce > cs, score(rep), -jnp.inf)
    _, top = jax.lax.top_k(sc, k)
    start, end = jnp.take_along_axis(cs, top, -1), jnp.take_along_axis(ce, top, -1)
  hit = jax.nn.one_hot(jnp.clip(start, 0, p.sb - 1), p.sb, dtype=bool) & (end > start)[..., None]
  return p.finish(jnp.any(hit, axis=-2) & p.candidates(), k)


def _int4(x, axis=-1):
  """Symmetric absmax int4 codes (int32 in [-7, 7]) and scales of x along `axis`."""
  scale = jnp.max(jnp.abs(x), axis=axis, keepdims=True) / 7.0
  codes = jnp.round(x / jnp.where(scale > 0, scale, 1.0))
  return jnp.clip(codes, -7, 7).astype(jnp.int32), scale


def sale_layout(q_BTHD: Float[Array, "B T H Dh"], k_BKSD: Float[Array, "B K S Dh"],
                mask: AttentionMask | None = None, *, block_q: int, block_kv: int,
                tau: float | tuple[float, ...], max_blocks: int, sinks: int = 1,
                local: int = 1) -> BlockLayout:
  """SALE-style threshold selection from int4 estimates, plus sinks and local blocks.

  Pooling: the mean query of each q block (per head) and the mean valid key of each kv
  block (per kv head), each quantized to int4 (symmetric absmax per vector); estimated
  block logit = int32 dot of the codes * both scales / sqrt(Dh), softmax-normalised over
  the q block's visible kv blocks (one logit per block). A block is kept where some head
  h of the group gives it weight > tau[h] (tau: one float, or one per query head);
  `max_blocks` is a budget: at most that many (the highest max-over-heads weight first)
  besides the always-kept sinks and local blocks.
  """
  p = _Prep(q_BTHD, k_BKSD, mask, block_q, block_kv, sinks, local)
  _check_budget("max_blocks", max_blocks, p.sb, p.s, p.bk)
  taus = tuple(tau) if isinstance(tau, (tuple, list)) else (tau,) * p.h
  if len(taus) != p.h or any(isinstance(x, bool) or not isinstance(x, (int, float))
                             or not 0.0 <= x < 1.0 for x in taus):
    raise ValueError(f"tau={tau!r} must be a float in [0, 1) or {p.h} of them (per head)")
  real = p.pad_rows(jnp.ones((p.b, p.t), jnp.float32), 0.0)[..., None, None, None]
  qsum = jnp.sum(p.pad_rows(_group_q(q_BTHD, p.kh), 0.0) * real, axis=2)
  qmean = qsum / jnp.maximum(jnp.sum(real, axis=2), 1.0)  # [B, Qb, K, G, Dh]
  qc, qs = _int4(qmean)
  kc, ks = _int4(p.pooled_keys(k_BKSD)[2])  # [B, K, Sb, Dh]
  dots = jnp.einsum("bqkgd,bksd->bkgqs", qc, kc, preferred_element_type=jnp.int32)
  qs_BKGQ1 = jnp.transpose(qs, (0, 2, 3, 1, 4))
  ks_BK11S = jnp.swapaxes(ks, 2, 3)[:, :, None]
  logit = dots.astype(jnp.float32) * qs_BKGQ1 * ks_BK11S * q_BTHD.shape[-1] ** -0.5
  vis = p.vis[:, None, None]
  # Invisible blocks get weight 0 (a q block with none visible: all 0, not NaN).
  w = jnp.where(vis, jax.nn.softmax(jnp.where(vis, logit, -jnp.inf), axis=-1), 0.0)
  tau_kg = jnp.asarray(taus, jnp.float32).reshape(p.kh, p.g)[None, :, :, None, None]
  kept = jnp.any(w > tau_kg, axis=2)
  rank = jnp.max(w, axis=2)
  return p.finish(_top(rank, p.candidates() & kept, max_blocks), max_blocks)

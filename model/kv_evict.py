"""KV-cache eviction at a fixed per-head budget (H2O, SnapKV, StreamingLLM), inside jit.

An `EvictingCache` wraps a `KVCache` of `slots` (= the policy's budget) slots per row and
records, per layer and kv head, which token each slot holds (`pos`, -1: empty) and its
eviction score. Every head keeps its own tokens, so the attention mask is per kv head.

One layer's attention of T new tokens (`attend`, called by `model.attention.attend`):
  1. the queries attend to the held slots (visible: filled and position <= the query's)
     and to the new tokens causally, as one softmax (the new tokens as the cache stores
     them: a quantized cache's codes and scales);
  2. the policy (duck-typed: `budget`, `sinks`, `window` and `scores(...)`, see
     `sparsity.eviction`) scores every candidate (held slots, then the new tokens) from
     this call's attention probabilities, summed over the group's query heads;
  3. the best `slots` candidates per (row, kv head) stay: positions < `sinks` and the
     `window` most recent positions are never evicted, empty slots are filled first, then
     the lowest-score unprotected tokens go. T = 1 (a decode step) writes the new token
     into one slot (the first empty one, else the evicted one) in place, by scatter;
     T > 1 (prefill, a speculative verify) keeps the surviving held slots in place and
     moves the kept new tokens, in order, into the freed slots (lowest first), so while
     nothing is evicted slot j holds position j, as in a plain cache.
Tokens at positions >= the row's `limit` (generate's prefill sets it to the prompt
length - 1: right-padding) are never kept, scored or counted in the window.

Positions are the tokens' true positions (RoPE is applied before caching; there is no
StreamingLLM-style re-positioning), so `capacity` (answered as `max_len`) is the largest
number of tokens a row may see, bounded by the model's max_seq_len; `slots` is the budget.
`lengths` counts the tokens seen (the next position); `with_lengths` to a smaller value
drops the slots at positions >= it (prefill reset, speculative rollback).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Int

from model import kv_cache
from model.kv_cache import KVCache

NO_LIMIT = 2 ** 31 - 1
_NEG = -1e30
_QK_EQ = {"heads_major": "bkgtd,bkds->bkgts", "seq_major": "bkgtd,bskd->bkgts"}
_PV_EQ = {"heads_major": "bkgts,bksd->bkgtd", "seq_major": "bkgts,bskd->bkgtd"}
_POLICY_ATTRS = ("budget", "sinks", "window", "scores")


def check_policy(policy) -> None:
  """ValueError unless `policy` answers like a `sparsity.eviction` policy."""
  missing = [a for a in _POLICY_ATTRS if not hasattr(policy, a)]
  if missing or not callable(getattr(policy, "scores", None)):
    lacks = missing or "a callable scores()"
    raise ValueError(f"evict={policy!r} must be an eviction policy (sparsity.eviction.H2O, "
                     f"SnapKV, StreamingLLM or parse_policy(...)); it lacks {lacks}")
  for name in ("budget", "sinks", "window"):
    v = getattr(policy, name)
    if isinstance(v, bool) or not isinstance(v, int) or v < 0:
      raise ValueError(f"eviction policy {name}={v!r} must be an int >= 0")
  if policy.budget < 1:
    raise ValueError(f"eviction policy budget={policy.budget} must be >= 1")
  try:
    hash(policy)
  except TypeError:
    raise ValueError(f"eviction policy {policy!r} must be hashable (a frozen dataclass): it is "
                     "a static jit key") from None


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class EvictingCache:
  """A KVCache of `slots` slots per row plus per-(layer, row, kv head, slot) eviction state.

  cache: the wrapped KVCache ([B, K, ., S] buffers, any layout / quantization); its
    lengths mirror `lengths` (slots no longer correspond to positions).
  pos: per layer i32[B, K, S]: the position each slot holds, -1 when empty.
  score: per layer f32[B, K, S]: the policy's score of each slot (0 when empty).
  lengths: i32[B]: tokens seen per row (the next token's position).
  limit: i32[B]: tokens at positions >= limit are ignored (NO_LIMIT: none).
  policy: the eviction policy (static, hashable). capacity: `max_len` (static).
  """

  cache: KVCache
  pos: tuple[Array, ...]
  score: tuple[Array, ...]
  lengths: Int[Array, " B"]
  limit: Int[Array, " B"]
  policy: object = dataclasses.field(metadata=dict(static=True))
  capacity: int = dataclasses.field(metadata=dict(static=True))

  @classmethod
  def wrap(cls, cache: KVCache, policy, capacity: int | None = None) -> EvictingCache:
    """An empty EvictingCache over `cache` (its slots are the budget; capacity: max_len)."""
    check_policy(policy)
    if not isinstance(cache, KVCache):
      raise ValueError(f"EvictingCache wraps a KVCache, got {type(cache).__name__}")
    if cache.select is not None:
      raise ValueError("KV eviction cannot be combined with a block selector (attn_select): "
                       "use one or the other")
    s = cache.max_len
    capacity = s if capacity is None else capacity
    if isinstance(capacity, bool) or not isinstance(capacity, int) or capacity < s:
      raise ValueError(f"EvictingCache capacity={capacity!r} must be an int >= its {s} slots")
    if s > policy.budget:
      raise ValueError(f"EvictingCache over a KVCache of {s} slots exceeds the policy's "
                       f"budget={policy.budget} (valid: at most budget slots per row)")
    b, kh, n = cache.batch, cache.kv_heads, cache.n_layers
    return cls(cache=cache.with_lengths(jnp.zeros((b,), jnp.int32)),
               pos=tuple(jnp.full((b, kh, s), -1, jnp.int32) for _ in range(n)),
               score=tuple(jnp.zeros((b, kh, s), jnp.float32) for _ in range(n)),
               lengths=jnp.zeros((b,), jnp.int32), limit=jnp.full((b,), NO_LIMIT, jnp.int32),
               policy=policy, capacity=capacity)

  batch = property(lambda self: self.lengths.shape[0])
  max_len = property(lambda self: self.capacity, doc="Tokens a row may see (capacity).")
  slots = property(lambda self: self.cache.max_len, doc="Slots per (row, kv head): the budget.")
  read_len = property(lambda self: self.cache.max_len)
  n_layers = property(lambda self: self.cache.n_layers)
  kv_heads = property(lambda self: self.cache.kv_heads)
  head_dim = property(lambda self: self.cache.head_dim)
  layout = property(lambda self: self.cache.layout)
  quant = property(lambda self: self.cache.quant)

  @property
  def nbytes(self) -> int:
    """Bytes stored: the wrapped cache plus the slot positions and scores."""
    meta = jax.tree.leaves((self.pos, self.score))
    return self.cache.nbytes + sum(x.size * x.dtype.itemsize for x in meta)

  def replace(self, **kw) -> EvictingCache:
    return dataclasses.replace(self, **kw)

  def with_lengths(self, lengths_B: Array) -> EvictingCache:
    """Lengths set; slots at positions >= the new length are emptied (rollback)."""
    lengths_B = jnp.asarray(lengths_B, jnp.int32)
    keep = lambda p: p < lengths_B[:, None, None]
    return self.replace(
        cache=self.cache.with_lengths(lengths_B), lengths=lengths_B,
        pos=tuple(jnp.where(keep(p), p, -1) for p in self.pos),
        score=tuple(jnp.where(keep(p), s, 0.0) for p, s in zip(self.pos, self.score,
                                                                   strict=True)))

  def with_limit(self, limit_B: Array | None) -> EvictingCache:
    """Positions >= limit (per row) are ignored by later forwards; None: no limit."""
    if limit_B is None:
      return self.replace(limit=jnp.full_like(self.limit, NO_LIMIT))
    return self.replace(limit=jnp.broadcast_to(jnp.asarray(limit_B, jnp.int32), (self.batch,)))

  def positions(self, t: int) -> Int[Array, "B T"]:
    """Positions of T new tokens (from each row's length on)."""
    return self.lengths[:, None] + jnp.arange(t, dtype=jnp.int32)[None]

  def take(self, idx_B: Array) -> EvictingCache:
    """Rows `idx` (beam search, sample fan-out)."""
    return jax.tree.map(lambda x: jnp.take(x, idx_B, axis=0), self)


def init(cfg, batch: int, max_len: int, policy, *, dtype=None, layout: str = "heads_major"
         ) -> EvictingCache:
  """An empty EvictingCache for `cfg`: min(policy.budget, max_len) slots, capacity max_len."""
  check_policy(policy)
  if isinstance(max_len, bool) or not isinstance(max_len, int) or max_len < 1:
    raise ValueError(f"cache max_len={max_len!r} must be a positive integer")
  if max_len > cfg.max_seq_len:
    raise ValueError(
        f"cache max_len={max_len} exceeds the model's max_seq_len={cfg.max_seq_len}")
  inner = kv_cache.init_cache(cfg, batch, min(policy.budget, max_len), dtype=dtype,
                              layout=layout)
  return EvictingCache.wrap(inner, policy, max_len)


# --- Attention with eviction (called by model.attention.attend for an EvictingCache).


def _to_bks(x, layout):
  """Per-slot scales [B, K, S] (heads_major) / [B, S, K] (seq_major) -> [B, K, S]."""
  return x if layout == "heads_major" else jnp.swapaxes(x, 1, 2)


def _logits(q_BKGTD, k, layout, *, fmt, k_scale_BKS, int_qk, dtype):
  """q.k^T [B, K, G, T, S] in f32 against float keys or codes (scale folded in after)."""
  if fmt is None:
    return jnp.einsum(_QK_EQ[layout], q_BKGTD.astype(dtype), k.astype(dtype),
                      preferred_element_type=jnp.float32)
  k = kv_cache.codes(k, fmt, 2 if layout == "heads_major" else 3)
  ks = k_scale_BKS.astype(jnp.float32)[:, :, None, None, :]
  if int_qk:
    qc, qs = kv_cache.quantize(q_BKGTD, "int8")
    acc = jnp.einsum(_QK_EQ[layout], qc, k, preferred_element_type=jnp.int32)
    return acc.astype(jnp.float32) * qs[..., None] * ks
  return jnp.einsum(_QK_EQ[layout], q_BKGTD.astype(dtype), k.astype(dtype),
                    preferred_element_type=jnp.float32) * ks


def _pv(p_BKGTS, v, layout, *, fmt, v_scale_BKS, dtype):
  if fmt is not None:
    v = kv_cache.codes(v, fmt, 3)
    p_BKGTS = p_BKGTS * v_scale_BKS.astype(jnp.float32)[:, :, None, None, :]
  return jnp.einsum(_PV_EQ[layout], p_BKGTS.astype(dtype), v.astype(dtype),
                    preferred_element_type=jnp.float32)


def attend(cache: EvictingCache, layer: int, pos_BT: Int[Array, "B T"],
           q_BTHD: Float[Array, "B T H Dh"], k_BTKD: Float[Array, "B T K Dh"],
           v_BTKD: Float[Array, "B T K Dh"], *, impl: str, qk: str | None = None
           ) -> tuple[Float[Array, "B T H Dh"], EvictingCache]:
  """Layer `layer`'s attention of T new tokens at positions `pos_BT`, then eviction (see the
  module docstring). Both impls compute the same (one f32 softmax over held + new)."""
  if impl not in ("reference", "xla", "pallas"):
    raise ValueError(f"attention impl={impl!r}; valid: 'reference', 'xla', 'pallas'")
  impl = "xla" if impl == "pallas" else impl  # eviction gathers held slots: no kernel
  if qk not in (None, "int8"):
    raise ValueError(f"attention qk={qk!r}; valid: None, 'int8'")
  inner = cache.cache.with_lengths(cache.lengths)  # `encode` reads lengths (k_mean at 0)
  if qk == "int8" and inner.quant != "int8":
    raise ValueError(f"attn_qk='int8' needs a KV cache with kv_quant='int8'; this cache has "
                     f"kv_quant={inner.quant!r}")
  policy, layout, fmt = cache.policy, inner.layout, inner.quant
  b, t, h, dh = q_BTHD.shape
  kh, s = inner.kv_heads, inner.max_len
  g = h // kh
  dtype = q_BTHD.dtype
  int_qk = qk == "int8"
  q_BKGTD = jnp.transpose(q_BTHD.reshape(b, t, kh, g, dh), (0, 2, 3, 1, 4))

  # New tokens as the cache stores them ([B, T, K, .] "seq_major"), and their logits.
  if fmt is None:
    kd, vd = inner.k[layer].dtype, inner.v[layer].dtype
    new = dict(k=k_BTKD.astype(kd), v=v_BTKD.astype(vd))
    k_mean = None
  else:
    new = kv_cache.encode(inner, layer, k_BTKD, v_BTKD)
    k_mean = new.pop("k_mean", None)
  ks_held = None if fmt is None else _to_bks(inner.k_scale[layer], layout)
  vs_held = None if fmt is None else _to_bks(inner.v_scale[layer], layout)
  ks_new = None if fmt is None else jnp.swapaxes(new["k_scale"], 1, 2)
  vs_new = None if fmt is None else jnp.swapaxes(new["v_scale"], 1, 2)
  lg = dict(fmt=fmt, int_qk=int_qk, dtype=dtype)
  logits = jnp.concatenate(
      [_logits(q_BKGTD, inner.k[layer], layout, k_scale_BKS=ks_held, **lg),
       _logits(q_BKGTD, new["k"], "seq_major", k_scale_BKS=ks_new, **lg)], axis=-1)
  if k_mean is not None:  # smoothed keys: q.mean back (the same for every key)
    logits = logits + jnp.einsum("bkgtd,bkd->bkgt", q_BKGTD.astype(jnp.float32),
                                 k_mean.astype(jnp.float32))[..., None]
  logits = logits * (dh ** -0.5)

  held_pos = cache.pos[layer]  # [B, K, S]
  qp = pos_BT[:, None, None, :, None]
  m_held = (held_pos[:, :, None, None, :] >= 0) & (held_pos[:, :, None, None, :] <= qp)
  m_new = pos_BT[:, None, None, None, :] <= qp
  mask = jnp.concatenate([jnp.broadcast_to(m_held, (b, kh, 1, t, s)),
                          jnp.broadcast_to(m_new, (b, kh, 1, t, t))], axis=-1)
  logits = jnp.where(mask, logits, _NEG)
  lse = jax.nn.logsumexp(logits, axis=-1, keepdims=True)
  probs = jnp.where(mask, jnp.exp(logits - lse), 0.0)  # [B, K, G, T, S + T]
  vs = dict(fmt=fmt, dtype=dtype)
  out = (_pv(probs[..., :s], inner.v[layer], layout, v_scale_BKS=vs_held, **vs)
         + _pv(probs[..., s:], new["v"], "seq_major", v_scale_BKS=vs_new, **vs))
  out = jnp.transpose(out, (0, 3, 1, 2, 4)).reshape(b, t, h, dh).astype(dtype)

  # Scores of every candidate (held slots, then the new tokens), then who stays.
  q_valid = pos_BT < cache.limit[:, None]
  attn_BKTC = jnp.sum(probs, axis=2) * q_valid[:, None, :, None]
  new_pos = jnp.broadcast_to(jnp.where(q_valid, pos_BT, -1)[:, None], (b, kh, t))
  cand_pos = jnp.concatenate([held_pos, new_pos], axis=-1)  # [B, K, S + T]
  prev = jnp.concatenate([cache.score[layer], jnp.zeros((b, kh, t), jnp.float32)], axis=-1)
  cur_B = jnp.maximum(cache.lengths, jnp.max(jnp.where(q_valid, pos_BT + 1, 0), axis=1))
  scores = policy.scores(prev, attn_BKTC, q_pos_BT=pos_BT, q_valid_BT=q_valid,
                         kv_pos_BKC=cand_pos, cur_B=cur_B, fresh_B=cache.lengths == 0, held=s)
  scores = scores.astype(jnp.float32)
  valid = cand_pos >= 0
  protected = valid & ((cand_pos < policy.sinks)
                       | (cand_pos >= cur_B[:, None, None] - policy.window))
  prio = jnp.where(protected, jnp.inf, jnp.where(valid, scores, -jnp.inf))

  enc_new = {name: new[name] for name in ("k", "v", "k_scale", "v_scale") if name in new}
  if t == 1:
    bufs, pos, score = _write_one(inner, layer, held_pos, scores, prio, valid[..., s], enc_new,
                                  pos_BT[:, 0])
  else:
    bufs, pos, score = _select(inner, layer, held_pos, scores, prio, valid, enc_new, new_pos)
  if k_mean is not None:
    bufs["k_mean"] = k_mean
  inner = inner.with_layer(layer, **bufs)
  put = lambda xs, x: (*xs[:layer], x, *xs[layer + 1:])
  return out, cache.replace(cache=inner, pos=put(cache.pos, pos), score=put(cache.score, score))


def _slot_axes(layout):
  """Per buffer: a function (buf, b_idx, k_idx, slot) -> buf.at[...] at that slot."""
  if layout == "heads_major":
    return dict(k=lambda x, bi, ki, sl: x.at[bi, ki, :, sl],
                v=lambda x, bi, ki, sl: x.at[bi, ki, sl],
                k_scale=lambda x, bi, ki, sl: x.at[bi, ki, sl],
                v_scale=lambda x, bi, ki, sl: x.at[bi, ki, sl])
  at = lambda x, bi, ki, sl: x.at[bi, sl, ki]
  return dict(k=at, v=at, k_scale=at, v_scale=at)


def _write_one(inner, layer, held_pos, scores, prio, new_valid_BK, enc, pos_B):
  """T = 1: the new token replaces the lowest-priority candidate (an empty slot first), by
  an in-place scatter; nothing is written when it is itself the loser or ignored."""
  s = held_pos.shape[-1]
  b, kh = held_pos.shape[:2]
  loser = jnp.argmin(prio, axis=-1)  # [B, K]: first empty slot, else the lowest score
  slot = jnp.where(new_valid_BK & (loser < s), loser, s)  # s: out of bounds, dropped
  bi, ki = jnp.arange(b)[:, None], jnp.arange(kh)[None, :]
  at = _slot_axes(inner.layout)
  bufs = {}
  for name, val in enc.items():  # val [B, 1, K, .] or scales [B, 1, K]
    buf = getattr(inner, name)[layer]
    bufs[name] = at[name](buf, bi, ki, slot).set(val[:, 0].astype(buf.dtype), mode="drop")
  pos = held_pos.at[bi, ki, slot].set(jnp.broadcast_to(pos_B[:, None], (b, kh)), mode="drop")
  score = scores[..., :s].at[bi, ki, slot].set(scores[..., s], mode="drop")
  score = jnp.where(pos >= 0, score, 0.0)
  return bufs, pos, score


def _select(inner, layer, held_pos, scores, prio, valid, enc, new_pos):
  """T > 1: keep the `s` best candidates; surviving held slots stay in place and the kept
  new tokens fill the freed slots in token order (lowest slot first)."""
  b, kh, s = held_pos.shape
  t = new_pos.shape[-1]
  _, top = jax.lax.top_k(prio, s)  # [B, K, s]
  keep = jnp.zeros(prio.shape, bool).at[
      jnp.arange(b)[:, None, None], jnp.arange(kh)[None, :, None], top].set(True) & valid
  keep_held, keep_new = keep[..., :s], keep[..., s:]
  free = ~keep_held
  free_rank = jnp.cumsum(free, axis=-1) - 1
  n_new = jnp.sum(keep_new, axis=-1, keepdims=True)
  order = jnp.argsort(~keep_new, axis=-1, stable=True).astype(jnp.int32)  # kept new first
  src = jnp.take_along_axis(order, jnp.clip(free_rank, 0, t - 1), axis=-1)  # [B, K, S]
  assign = free & (free_rank < n_new)
  pick = lambda x_BKT: jnp.take_along_axis(x_BKT, src, axis=-1)
  pos = jnp.where(assign, pick(new_pos), jnp.where(keep_held, held_pos, -1))
  score = jnp.where(assign, pick(scores[..., s:]), jnp.where(keep_held, scores[..., :s], 0.0))
  heads_major = inner.layout == "heads_major"
  bufs = {}
  for name, val in enc.items():
    buf = getattr(inner, name)[layer]
    if val.ndim == 3:  # scales [B, T, K]
      g = jnp.take_along_axis(jnp.swapaxes(val, 1, 2), src, axis=-1)  # [B, K, S]
      a = assign
      if not heads_major:
        g, a = jnp.swapaxes(g, 1, 2), jnp.swapaxes(assign, 1, 2)
    else:  # [B, T, K, D]
      g = jnp.take_along_axis(jnp.swapaxes(val, 1, 2), src[..., None], axis=2)  # [B, K, S, D]
      a = assign[..., None]
      if heads_major and name == "k":
        g, a = jnp.swapaxes(g, 2, 3), assign[:, :, None, :]
      elif not heads_major:
        g, a = jnp.swapaxes(g, 1, 2), jnp.swapaxes(assign, 1, 2)[..., None]
    bufs[name] = jnp.where(a, g.astype(buf.dtype), buf)
  return bufs, pos, score

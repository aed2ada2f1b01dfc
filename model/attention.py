"""The attention door: `attention(q, k, v, mask=AttentionMask, impl=...)` and, for the model's
layers, `attend(ctx, layer, q, k, v)`, which also writes and reads the KV cache variants
(`model.kv_cache`): a plain cache, or a shared prefix plus per-row suffixes, float or
quantized.

A quantized cache is read from its codes: the per-slot key scale multiplies the f32
scores and the value scale the probabilities, so no dequantized copy of the cache is
formed (int4 codes are unpacked to int8 first). `qk="int8"` (SageAttention) computes
Q.K^T as an int8 x int8 -> int32 dot: q quantized per (token, head), keys per (token, kv
head) after subtracting their mean, which leaves softmax(q.k) unchanged; q.mean is added
back to the scores, so log-sum-exps (partial merges) stay those of q.k.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from jaxtyping import Array, Bool, Float, Int

from model import kv_cache, kv_evict
from model.config import ATTN_QK
from model.kv_cache import KVCache, PrefixCache, write_layer
from model.kv_evict import EvictingCache
from pallas_kernels import api as kernels
from pallas_kernels import block_sparse as kernel_masks

# "pallas": the block-sparse flash attention kernel (`pallas_kernels.block_sparse_attention`)
# for float q, k, v; where it can't run (a CPU without SPARQ_PALLAS_INTERPRET, a quantized
# cache, int8 Q.K^T, blocks the hardware can't tile) the "xla" path runs, with one logged
# line per reason.
IMPLS = ("reference", "xla", "pallas")
_NEG = -1e30  # finite "minus infinity": fully masked rows stay NaN-free


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True, kw_only=True)
class BlockLayout:
  """Which kv blocks each q block attends to (FlexAttention's BlockMask, splash's mask info).

  Queries are cut into blocks of `block_q` rows and keys into blocks of `block_kv` slots
  (the last block of each may be partial: attention pads it). For every (row, head,
  q block):
    kv_num_blocks[b, h, i]: how many kv blocks are active;
    kv_indices[b, h, i, :]: their indices, ascending, in the first kv_num_blocks entries
      (the rest are ignored);
    full_num_blocks / full_indices (optional, same form): more active blocks, ones the
      element mask leaves whole, so a kernel may skip the mask there. The XLA and
      reference paths apply the element mask everywhere, so such a claim can only
      speed a kernel up, never change these paths' result.
  The active set is the union of the two lists. The batch axis may be 1 (shared by every
  row) and the head axis 1 (every head), the kv heads (a GQA group shares) or the query
  heads. `to_dense(T, S)` is the equivalent boolean mask; builders live in
  `sparsity.attention`.
  """

  kv_num_blocks: Int[Array, "B H Qb"]
  kv_indices: Int[Array, "B H Qb M"]
  full_num_blocks: Int[Array, "B H Qb"] | None = None
  full_indices: Int[Array, "B H Qb F"] | None = None
  block_q: int = dataclasses.field(metadata=dict(static=True))
  block_kv: int = dataclasses.field(metadata=dict(static=True))

  def __post_init__(self):
    for name in ("block_q", "block_kv"):
      v = getattr(self, name)
      if isinstance(v, bool) or not isinstance(v, int) or v < 1:
        raise ValueError(f"BlockLayout.{name}={v!r} must be a positive int")
    # Leaves are other objects while JAX flattens / unflattens (tracing, vmap): check arrays.
    if not hasattr(self.kv_indices, "shape") or not hasattr(self.kv_num_blocks, "shape"):
      return
    if self.kv_num_blocks.ndim != 3 or self.kv_indices.ndim != 4 or (
        self.kv_indices.shape[:3] != self.kv_num_blocks.shape):
      raise ValueError(f"BlockLayout: kv_num_blocks {self.kv_num_blocks.shape} must be [B, H, "
                       f"Qb] and kv_indices {self.kv_indices.shape} [B, H, Qb, max_kv_blocks]")
    if (self.full_num_blocks is None) != (self.full_indices is None):
      raise ValueError("BlockLayout: give both full_num_blocks and full_indices, or neither")
    if self.full_indices is not None and hasattr(self.full_indices, "shape") and (
        self.full_indices.ndim != 4 or self.full_indices.shape[:3] != self.kv_num_blocks.shape
        or self.full_num_blocks.shape != self.kv_num_blocks.shape):
      raise ValueError(f"BlockLayout: full_num_blocks {self.full_num_blocks.shape} / "
                       f"full_indices {self.full_indices.shape} must match kv_num_blocks "
                       f"{self.kv_num_blocks.shape} (+ a trailing block axis)")

  batch = property(lambda self: self.kv_num_blocks.shape[0])
  heads = property(lambda self: self.kv_num_blocks.shape[1])
  q_blocks = property(lambda self: self.kv_num_blocks.shape[2])

  @property
  def max_kv_blocks(self) -> int:
    """Blocks one q block may visit (partial + full lists): what the XLA path computes."""
    f = 0 if self.full_indices is None else self.full_indices.shape[3]
    return self.kv_indices.shape[3] + f

  def replace(self, **kw) -> BlockLayout:
    return dataclasses.replace(self, **kw)

  @classmethod
  def from_block_mask(cls, block_mask: Bool[Array, "B H Qb Sb"], *, block_q: int, block_kv: int,
                      full_mask: Bool[Array, "B H Qb Sb"] | None = None,
                      max_kv_blocks: int | None = None) -> BlockLayout:
    """The layout of a boolean block mask (True: active). With `full_mask` (a subset of
    `block_mask`), those blocks go to the full lists and the rest stay partial.

    max_kv_blocks: the index lists' length (default: the most active blocks of any q
    block when the mask is concrete, else Sb). A q block with more active blocks than
    that is a ValueError when the mask is concrete (never silently dropped).
    """
    block_mask = jnp.asarray(block_mask, bool)
    if block_mask.ndim != 4:
      raise ValueError(f"block_mask must be [B, H, Qb, Sb], got shape {block_mask.shape}")
    partial = block_mask if full_mask is None else block_mask & ~jnp.asarray(full_mask, bool)
    num, idx = _index_lists(partial, max_kv_blocks, "max_kv_blocks")
    if full_mask is None:
      return cls(kv_num_blocks=num, kv_indices=idx, block_q=block_q, block_kv=block_kv)
    fnum, fidx = _index_lists(block_mask & jnp.asarray(full_mask, bool), None, "full blocks")
    return cls(kv_num_blocks=num, kv_indices=idx, full_num_blocks=fnum, full_indices=fidx,
               block_q=block_q, block_kv=block_kv)

  def block_mask(self, kv_blocks: int) -> Bool[Array, "B H Qb Sb"]:
    """The active blocks as a boolean [B, H, Qb, kv_blocks] mask (both lists)."""
    out = kernel_masks.list_mask(self.kv_num_blocks, self.kv_indices, kv_blocks)
    if self.full_indices is not None:
      out |= kernel_masks.list_mask(self.full_num_blocks, self.full_indices, kv_blocks)
    return out

  def to_dense(self, t: int, s: int) -> Bool[Array, "B H T S"]:
    """The equivalent boolean mask over T queries and S keys (True: the block is active)."""
    self.check(t, s)
    sb = -(-s // self.block_kv)
    m = self.block_mask(sb)
    m = jnp.repeat(jnp.repeat(m, self.block_q, axis=2), self.block_kv, axis=3)
    return m[:, :, :t, :s]

  def density(self, t: int, s: int) -> Array:
    """The fraction of the T x S (query, key) pairs inside active blocks (per row, head)."""
    return jnp.mean(self.to_dense(t, s), axis=(-2, -1))

  def check(self, t: int, s: int, *, batch: int | None = None,
            heads: tuple[int, ...] | None = None) -> None:
    """ValueError unless this layout fits T queries and S keys: q_blocks == ceil(T / block_q),
    batch 1 or `batch`, heads in `heads`; with concrete arrays also indices in [0, Sb),
    ascending in each list's active prefix, and counts in [0, list length]."""
    qb, sb = -(-t // self.block_q), -(-s // self.block_kv)
    if self.q_blocks != qb:
      raise ValueError(f"BlockLayout has {self.q_blocks} q blocks of {self.block_q}; "
                       f"{t} queries need ceil({t}/{self.block_q}) = {qb}")
    if batch is not None and self.batch not in (1, batch):
      raise ValueError(f"BlockLayout batch {self.batch}; valid: 1 or the batch {batch}")
    if heads is not None and self.heads not in heads:
      raise ValueError(f"BlockLayout heads {self.heads}; valid: "
                       f"{', '.join(map(str, sorted(set(heads))))}")
    lists = [("kv", self.kv_num_blocks, self.kv_indices)]
    if self.full_indices is not None:
      lists.append(("full", self.full_num_blocks, self.full_indices))
    for name, num, idx in lists:
      if not isinstance(num, jax.core.Tracer) and not isinstance(idx, jax.core.Tracer):
        kernel_masks.check_index_lists(f"BlockLayout.{name}", num, idx, sb,
                                       f"({s} keys in blocks of {self.block_kv})")


def _index_lists(mask_BHQS, length, name):
  """(counts [B, H, Qb], ascending indices [B, H, Qb, length]) of a boolean block mask."""
  sb = mask_BHQS.shape[-1]
  num = jnp.sum(mask_BHQS, axis=-1, dtype=jnp.int32)
  concrete = not isinstance(num, jax.core.Tracer)
  most = int(num.max()) if concrete and num.size else sb
  if length is None:
    length = max(most, 1)
  elif isinstance(length, bool) or not isinstance(length, int) or not 1 <= length <= sb:
    raise ValueError(f"{name}={length!r} must be an int in [1, {sb}] (the kv blocks)")
  elif concrete and most > length:
    raise ValueError(f"{name}={length} but a q block has {most} active kv blocks; raise "
                     f"{name} (blocks are never dropped silently)")
  # Active blocks first, each group in ascending block order (a stable sort on ~mask).
  order = jnp.argsort(~mask_BHQS, axis=-1, stable=True).astype(jnp.int32)
  return num, order[..., :length]


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class AttentionMask:
  """Which keys each query sees. Array fields may be None (= not constraining).

  q_positions / kv_positions: absolute token positions (default arange). With a
    KV cache, kv slot j holds position j, so `causal` also hides unwritten slots.
  q_segment_ids / kv_segment_ids: packed sequences attend only within a segment.
  kv_valid: False for padding keys.
  causal: key position <= query position.
  window: sliding window; key visible when q_pos - kv_pos < window.
  sinks: the first `sinks` positions stay visible through the window (StreamingLLM).
  layout: a `BlockLayout`: attention is further restricted to its active blocks (the
    element mask above still applies inside them); impl "xla" then computes only those.
  """

  q_positions: Int[Array, "B T"] | None = None
  kv_positions: Int[Array, "B S"] | None = None
  q_segment_ids: Int[Array, "B T"] | None = None
  kv_segment_ids: Int[Array, "B S"] | None = None
  kv_valid: Bool[Array, "B S"] | None = None
  causal: bool = dataclasses.field(default=True, metadata=dict(static=True))
  window: int | None = dataclasses.field(default=None, metadata=dict(static=True))
  sinks: int = dataclasses.field(default=0, metadata=dict(static=True))
  layout: BlockLayout | None = None

  def replace(self, **kw) -> AttentionMask:
    return dataclasses.replace(self, **kw)

  def materialize(self, batch: int, t: int, s: int) -> Bool[Array, "B T S"]:
    """The dense element mask (the layout aside), True where a query may attend to a key."""
    qp = self.q_positions if self.q_positions is not None else jnp.arange(t)[None]
    kp = self.kv_positions if self.kv_positions is not None else jnp.arange(s)[None]
    qseg = kseg = None
    if self.q_segment_ids is not None:
      kseg = self.kv_segment_ids if self.kv_segment_ids is not None else self.q_segment_ids
      qseg, kseg = self.q_segment_ids[:, :, None], kseg[:, None, :]
    # One definition of the element mask (causal, window + sinks, segments) for every path.
    m = kernel_masks.element_mask(self, qp[:, :, None], kp[:, None, :], qseg, kseg)
    m = jnp.broadcast_to(m, (batch, t, s))
    if self.kv_valid is not None:
      m &= self.kv_valid[:, None, :]
    return m


def cache_layout(backend: str | None = None) -> str:
  """The KV cache layout attention reads fastest on `backend` (default: JAX's).

  CPU: "heads_major" (both batched dots read the cache in place; measured: the
  [B, S, K, Dh] layout cost a transpose of every layer's cache per decode step).
  Accelerators: "seq_major", the layout `jax.nn.dot_product_attention` (and its
  cuDNN path) takes.
  """
  return "heads_major" if (backend or jax.default_backend()) == "cpu" else "seq_major"


def attention(q_BTHD: Float[Array, "B T H Dh"], k_BSKD: Float[Array, "B S K Dh"],
              v_BSKD: Float[Array, "B S K Dh"], *, mask: AttentionMask, impl: str = "xla",
              scale: float | None = None, return_lse: bool = False, qk: str | None = None):
  """Softmax attention with grouped kv heads (K divides H).

  Returns out[B, T, H, Dh], and with `return_lse` also lse[B, T, H] (natural log of
  the softmax normaliser) so partial attentions can be merged exactly. qk: None (Q.K^T
  in q's dtype) or "int8" (smoothed int8 x int8, see the module docstring; both impls).
  """
  _check_qk(qk)
  if qk is None:
    return _attend(q_BTHD, k_BSKD, v_BSKD, mask, impl, "seq_major", scale, return_lse)
  _check_impl(impl)
  b, s = k_BSKD.shape[:2]
  k_BSKD = k_BSKD.astype(jnp.float32)
  # Any per-(row, kv head) vector works (q.mean is constant over keys); the mean of the
  # valid keys centres them, which shrinks their absmax and so the int8 step.
  w_BS1 = (jnp.ones((b, s), jnp.float32) if mask.kv_valid is None
           else mask.kv_valid.astype(jnp.float32))[..., None]
  mean_BKD = (jnp.sum(k_BSKD * w_BS1[..., None], axis=1)
              / jnp.maximum(jnp.sum(w_BS1, axis=1), 1.0)[..., None])
  kc_BSKD, ks_BSK = kv_cache.quantize(k_BSKD - mean_BKD[:, None], "int8")
  return _attend_codes(q_BTHD, kc_BSKD, v_BSKD, mask, impl, "seq_major", scale, return_lse,
                       fmt="int8", k_scale=ks_BSK, v_scale=None, k_mean=mean_BKD, int_qk=True)


def cache_attention(q_BTHD: Float[Array, "B T H Dh"], cache: KVCache, layer: int, *,
                    mask: AttentionMask, impl: str = "xla", return_lse: bool = False,
                    qk: str | None = None):
  """Attention of q over every slot of one cache layer, read in the cache's layout.

  A quantized cache is read from its codes (plus q.k_mean where keys are smoothed);
  `qk="int8"` computes Q.K^T int8 x int8 against int8 codes.
  """
  _check_qk(qk)
  if qk == "int8" and cache.quant != "int8":
    raise ValueError(
        f"attn_qk='int8' needs a KV cache with kv_quant='int8' (int8 x int8 Q.K^T; make it "
        f"with model.Decoder(cfg).init_cache); this cache has kv_quant={cache.quant!r}")
  if cache.select is not None and mask.layout is None:
    layout = cache.select(q_BTHD, cache_keys(cache, layer), mask, layer)
    if layout is not None:
      mask = mask.replace(layout=layout)
  if cache.quant is None:
    return _attend(q_BTHD, cache.k[layer], cache.v[layer], mask, impl, cache.layout, None,
                   return_lse)
  k_mean = None if cache.k_mean is None else cache.k_mean[layer]
  return _attend_codes(q_BTHD, cache.k[layer], cache.v[layer], mask, impl, cache.layout, None,
                       return_lse, fmt=cache.quant, k_scale=cache.k_scale[layer],
                       v_scale=cache.v_scale[layer], k_mean=k_mean, int_qk=qk == "int8")


def cache_keys(cache: KVCache, layer: int) -> Float[Array, "B K S Dh"]:
  """One layer's keys as f32 [B, K, S, Dh] (dequantized, key mean added back)."""
  k = cache.k[layer]
  if cache.quant is not None:
    dh_axis = 2 if cache.layout == "heads_major" else 3
    k = kv_cache.dequantize(k, cache.k_scale[layer], cache.quant, dh_axis)
    if cache.k_mean is not None:
      k = k + jnp.expand_dims(cache.k_mean[layer].astype(jnp.float32), 3 if dh_axis == 2 else 1)
  k = k.astype(jnp.float32)
  return jnp.swapaxes(k, 2, 3) if cache.layout == "heads_major" else jnp.swapaxes(k, 1, 2)


def _check_impl(impl):
  if impl not in IMPLS:
    raise ValueError(f"attention impl={impl!r}; valid: {', '.join(map(repr, IMPLS))}")


def _check_qk(qk):
  if qk is not None and qk not in ATTN_QK:
    raise ValueError(f"attention qk={qk!r}; valid: None, {', '.join(map(repr, ATTN_QK))}")


def _dims(q_BTHD, k, layout, scale) -> tuple[bool, int, int, float]:
  """(heads_major, key slots, kv heads, softmax scale); kv heads must divide query heads."""
  h, dh = q_BTHD.shape[2:]
  heads_major = layout == "heads_major"
  s, kh = (k.shape[3], k.shape[1]) if heads_major else (k.shape[1], k.shape[2])
  if h % kh:
    raise ValueError(f"kv heads {kh} must divide query heads {h}")
  return heads_major, s, kh, dh ** -0.5 if scale is None else scale


def _attend(q_BTHD, k, v, mask, impl, layout, scale, return_lse):
  _check_impl(impl)
  b, t, h, dh = q_BTHD.shape
  heads_major, s, kh, scale = _dims(q_BTHD, k, layout, scale)
  k, v = k.astype(q_BTHD.dtype), v.astype(q_BTHD.dtype)
  if impl == "pallas":
    out = _pallas(q_BTHD, k, v, mask, heads_major, scale, return_lse)
    if out is not None:
      return out
    impl = "xla"
  if mask.layout is not None and impl == "xla":
    return _block_sparse(q_BTHD, k, v, mask, layout, scale, return_lse)
  mask5 = _mask5(mask, b, t, s, h, kh)
  if impl == "xla" and heads_major:
    return _heads_major(q_BTHD, k, v, mask5, scale, return_lse)
  if heads_major:
    k, v = jnp.transpose(k, (0, 3, 1, 2)), jnp.swapaxes(v, 1, 2)
  if impl == "xla" and not return_lse:
    out = jax.nn.dot_product_attention(
        q_BTHD, k, v, mask=mask5[:, :, 0], scale=scale, implementation="xla")
    return out.astype(q_BTHD.dtype)
  return _reference(q_BTHD, k, v, mask5, scale, return_lse)


def _pallas(q_BTHD, k, v, mask: AttentionMask, heads_major: bool, scale, return_lse):
  """The Pallas kernel's result, or None (logged) where it can't run this call."""
  b, t, h, dh = q_BTHD.shape
  if heads_major:  # k [B, K, Dh, S], v [B, K, S, Dh] -> [B, S, K, Dh]
    k, v = jnp.transpose(k, (0, 3, 1, 2)), jnp.swapaxes(v, 1, 2)
  s = k.shape[1]
  interpret = kernels.env_interpret()
  target, mode = kernels.plan(interpret)
  reason = None if target is not None else mode
  if reason is None and jnp.dtype(q_BTHD.dtype).name not in kernel_masks.DTYPES:
    reason = f"dtype {q_BTHD.dtype} (the kernel takes {', '.join(kernel_masks.DTYPES)})"
  layout = mask.layout
  if layout is not None:
    bq, bkv = layout.block_q, layout.block_kv
  else:
    bq, bkv = kernels.attention_blocks(t, s, target)
  if reason is None and (t % bq or s % bkv):
    reason = f"blocks ({bq}, {bkv}) do not tile T={t}, S={s}"
  if reason is None and mode is False:
    reason = kernels.attention_blocker(target, t, s, dh, bq, bkv)
  if reason is not None:
    kernels.log_fallback("block_sparse_attention", reason)
    return None
  q_seg, kv_seg = mask.q_segment_ids, mask.kv_segment_ids
  if q_seg is None:  # AttentionMask reads kv segment ids only beside q ones
    kv_seg = None
  elif kv_seg is None:
    kv_seg = q_seg
  if mask.kv_valid is not None:  # padding keys: a segment no query is in
    q_seg = jnp.zeros((b, t), jnp.int32) if q_seg is None else q_seg.astype(jnp.int32)
    base = jnp.zeros((b, s), jnp.int32) if kv_seg is None else kv_seg.astype(jnp.int32)
    kv_seg = jnp.where(mask.kv_valid, base, jnp.iinfo(jnp.int32).min)
  pmask = kernel_masks.Mask(causal=mask.causal, window=mask.window, sinks=mask.sinks,
                            q_positions=mask.q_positions, kv_positions=mask.kv_positions,
                            q_segment_ids=q_seg, kv_segment_ids=kv_seg)
  return kernels.block_sparse_attention(
      q_BTHD, k, v, layout, mask=pmask, scale=scale, return_lse=return_lse,
      interpret=interpret, block_q=None if layout is not None else bq,
      block_kv=None if layout is not None else bkv)


def _mask5(mask: AttentionMask, b, t, s, h, kh) -> Bool[Array, "B K G T S"]:
  """The dense mask (element mask and layout), broadcastable to [B, K, G, T, S]."""
  m = mask.materialize(b, t, s)[:, None, None]
  if mask.layout is None:
    return m
  mask.layout.check(t, s, batch=b, heads=(1, kh, h))
  d = mask.layout.to_dense(t, s)
  hl = d.shape[1]
  if hl == h:
    d = d.reshape(d.shape[0], kh, h // kh, t, s)
  else:  # 1 (every head) or the kv heads (a group shares)
    d = d[:, :, None]
  return m & d


def _heads_major(q_BTHD, k_BKDS, v_BKSD, mask5, scale, return_lse):
  """Attention against k [B, K, Dh, S] and v [B, K, S, Dh]: both batched dots find their
  operands in the layout XLA wants, so a KV cache is read in place, never transposed."""
  b, t, h, dh = q_BTHD.shape
  kh = k_BKDS.shape[1]
  dtype = k_BKDS.dtype
  q_BKGTD = jnp.transpose(q_BTHD.reshape(b, t, kh, h // kh, dh), (0, 2, 3, 1, 4)).astype(dtype)
  logits_BKGTS = jnp.einsum("bkgtd,bkds->bkgts", q_BKGTD, k_BKDS,
                            preferred_element_type=jnp.float32) * scale
  logits_BKGTS = jnp.where(mask5, logits_BKGTS, _NEG)
  lse_BKGT = jax.nn.logsumexp(logits_BKGTS, axis=-1)
  probs_BKGTS = jnp.exp(logits_BKGTS - lse_BKGT[..., None]).astype(v_BKSD.dtype)
  out_BKGTD = jnp.einsum("bkgts,bksd->bkgtd", probs_BKGTS, v_BKSD,
                         preferred_element_type=jnp.float32)
  out = jnp.transpose(out_BKGTD, (0, 3, 1, 2, 4)).reshape(b, t, h, dh).astype(q_BTHD.dtype)
  if not return_lse:
    return out
  return out, jnp.transpose(lse_BKGT, (0, 3, 1, 2)).reshape(b, t, h)


def _reference(q_BTHD, k_BSKD, v_BSKD, mask5, scale, return_lse):
  b, t, h, dh = q_BTHD.shape
  kh = k_BSKD.shape[2]
  q_BTKGD = q_BTHD.reshape(b, t, kh, h // kh, dh).astype(jnp.float32)
  logits_BKGTS = jnp.einsum("btkgd,bskd->bkgts", q_BTKGD, k_BSKD.astype(jnp.float32)) * scale
  logits_BKGTS = jnp.where(mask5, logits_BKGTS, _NEG)
  lse_BKGT = jax.nn.logsumexp(logits_BKGTS, axis=-1)
  probs = jnp.exp(logits_BKGTS - lse_BKGT[..., None])
  out_BTKGD = jnp.einsum("bkgts,bskd->btkgd", probs, v_BSKD.astype(jnp.float32))
  out = out_BTKGD.reshape(b, t, h, dh).astype(q_BTHD.dtype)
  if not return_lse:
    return out
  lse_BTH = jnp.transpose(lse_BKGT, (0, 3, 1, 2)).reshape(b, t, h)
  return out, lse_BTH


# Q.K^T and P.V contractions per layout, with q [B, K, G, T, Dh] and probs [B, K, G, T, S].
_QK_EQ = {"heads_major": "bkgtd,bkds->bkgts", "seq_major": "bkgtd,bskd->bkgts"}
_PV_EQ = {"heads_major": "bkgts,bksd->bkgtd", "seq_major": "bkgts,bskd->bkgtd"}


def _attend_codes(q_BTHD, k, v, mask, impl, layout, scale, return_lse, *, fmt, k_scale,
                  v_scale, k_mean, int_qk):
  """Attention against k codes (and v codes, or float v when v_scale is None) in `layout`.

  Scales are [B, K, S] (heads_major) or [B, S, K] (seq_major); k_mean [B, K, Dh] (None:
  unsmoothed keys), whose q.mean is added to the scores. int_qk: Q.K^T int8 x int8 ->
  int32 (int8 codes). impl "reference" dequantizes everything to f32 and runs
  `_reference` (the oracle of the scale-folded path); the int8 Q.K^T path is the same
  integer arithmetic under both impls.
  """
  _check_impl(impl)
  if impl == "pallas":
    kernels.log_fallback("block_sparse_attention", "quantized K / V codes (no kernel)")
    impl = "xla"
  b, t, h, dh = q_BTHD.shape
  heads_major, s, kh, scale = _dims(q_BTHD, k, layout, scale)
  if mask.layout is not None and impl == "xla":
    if int_qk:
      raise ValueError("attn_qk='int8' has no block-sparse path; use attn_qk=None with a "
                       "BlockLayout (a quantized cache is still read from its codes)")
    return _block_sparse(q_BTHD, k, v, mask, layout, scale, return_lse,
                         quant=dict(fmt=fmt, k_scale=k_scale, v_scale=v_scale, k_mean=k_mean))
  mask5 = _mask5(mask, b, t, s, h, kh)
  k_axis = 2 if heads_major else 3
  k = kv_cache.codes(k, fmt, k_axis)
  if v_scale is not None:
    v = kv_cache.codes(v, fmt, 3)
  if impl == "reference" and not int_qk:
    k = k.astype(jnp.float32) * jnp.expand_dims(k_scale.astype(jnp.float32), k_axis)
    if k_mean is not None:
      k = k + jnp.expand_dims(k_mean.astype(jnp.float32), 3 if heads_major else 1)
    if v_scale is not None:
      v = v.astype(jnp.float32) * v_scale.astype(jnp.float32)[..., None]
    if heads_major:
      k, v = jnp.transpose(k, (0, 3, 1, 2)), jnp.swapaxes(v, 1, 2)
    return _reference(q_BTHD, k, v, mask5, scale, return_lse)
  dtype = q_BTHD.dtype
  to_BKS = (lambda x: x) if heads_major else (lambda x: jnp.swapaxes(x, 1, 2))
  q_BKGTD = jnp.transpose(q_BTHD.reshape(b, t, kh, h // kh, dh), (0, 2, 3, 1, 4))
  ks_BK11S = to_BKS(k_scale.astype(jnp.float32))[:, :, None, None, :]
  if int_qk:
    qc_BKGTD, qs_BKGT = kv_cache.quantize(q_BKGTD, "int8")
    acc_BKGTS = jnp.einsum(_QK_EQ[layout], qc_BKGTD, k, preferred_element_type=jnp.int32)
    logits_BKGTS = acc_BKGTS.astype(jnp.float32) * qs_BKGT[..., None] * ks_BK11S
  else:
    # Codes are exact in bf16 / f16 / f32, so they enter the dot in q's dtype.
    logits_BKGTS = jnp.einsum(_QK_EQ[layout], q_BKGTD, k.astype(dtype),
                              preferred_element_type=jnp.float32) * ks_BK11S
  if k_mean is not None:
    logits_BKGTS = logits_BKGTS + jnp.einsum(
        "bkgtd,bkd->bkgt", q_BKGTD.astype(jnp.float32), k_mean.astype(jnp.float32))[..., None]
  logits_BKGTS = jnp.where(mask5, logits_BKGTS * scale, _NEG)
  lse_BKGT = jax.nn.logsumexp(logits_BKGTS, axis=-1)
  probs_BKGTS = jnp.exp(logits_BKGTS - lse_BKGT[..., None])
  if v_scale is not None:
    probs_BKGTS = probs_BKGTS * to_BKS(v_scale.astype(jnp.float32))[:, :, None, None, :]
  out_BKGTD = jnp.einsum(_PV_EQ[layout], probs_BKGTS.astype(dtype), v.astype(dtype),
                         preferred_element_type=jnp.float32)
  out = jnp.transpose(out_BKGTD, (0, 3, 1, 2, 4)).reshape(b, t, h, dh).astype(dtype)
  if not return_lse:
    return out
  return out, jnp.transpose(lse_BKGT, (0, 3, 1, 2)).reshape(b, t, h)


# --- Block-sparse attention (impl="xla" with a BlockLayout): only active blocks computed.

# Bytes of f32 scores one online-softmax step may hold; the kv blocks of every q block
# are visited in chunks of as many blocks as fit.
BLOCK_CHUNK_BYTES = 1 << 26


def _block_sparse(q_BTHD, k, v, mask, kv_layout, scale, return_lse, quant=None):
  """Attention over the active kv blocks of each q block of `mask.layout` only.

  Gathers each q block's listed kv blocks (a chunk at a time) and runs an online softmax
  over them, with the element mask computed inside the gathered blocks (no T x S mask),
  so work and memory scale with the layout's max_kv_blocks, not with S. Queries with no
  visible key get zeros (lse -1e30). `quant` (a quantized cache): dict(fmt, k_scale,
  v_scale, k_mean); gathered codes are dequantized block by block.
  """
  layout = mask.layout
  b, t, h, dh = q_BTHD.shape
  heads_major, s, kh, scale = _dims(q_BTHD, k, kv_layout, scale)
  g = h // kh
  layout.check(t, s, batch=b, heads=(1, kh, h))
  bq, bk = layout.block_q, layout.block_kv
  qb, sb = -(-t // bq), -(-s // bk)
  tp, sp = qb * bq, sb * bk

  idx = layout.kv_indices
  valid = jnp.arange(idx.shape[-1]) < layout.kv_num_blocks[..., None]
  if layout.full_indices is not None:
    idx = jnp.concatenate([idx, layout.full_indices], axis=-1)
    valid = jnp.concatenate(
        [valid, jnp.arange(layout.full_indices.shape[-1]) < layout.full_num_blocks[..., None]],
        axis=-1)
  m_blocks = idx.shape[-1]
  per_head = layout.heads == h and g > 1  # each query head of a group has its own list
  gi, r = (g, bq) if per_head else (1, g * bq)

  def lists(x):  # [B', H', Qb, M] -> [B, K, gi, Qb, M]
    x = jnp.broadcast_to(x, (b, *x.shape[1:]))
    if per_head:
      return x.reshape(b, kh, g, qb, m_blocks)
    return jnp.broadcast_to(x[:, :, None], (b, kh, 1, qb, m_blocks))

  idx, valid = lists(jnp.clip(idx, 0, sb - 1).astype(jnp.int32)), lists(valid)

  q = jnp.pad(q_BTHD, ((0, 0), (0, tp - t), (0, 0), (0, 0)))
  q = q.reshape(b, qb, bq, kh, g, dh)
  if per_head:
    q = jnp.transpose(q, (0, 3, 4, 1, 2, 5))  # [B, K, G, Qb, bq, Dh]
  else:  # the group's heads become more rows of the q block: row g * bq + i
    q = jnp.transpose(q, (0, 3, 1, 4, 2, 5)).reshape(b, kh, 1, qb, r, dh)

  def rows(x, fill):  # [B, T] per-query values -> [B, Qb, R]
    x = jnp.pad(jnp.broadcast_to(x, (b, t)), ((0, 0), (0, tp - t)), constant_values=fill)
    return jnp.tile(x.reshape(b, qb, bq), (1, 1, r // bq))

  def slots(x, fill):  # [B, S] per-key values -> [B, Sb, bk]
    x = jnp.pad(jnp.broadcast_to(x, (b, s)), ((0, 0), (0, sp - s)), constant_values=fill)
    return x.reshape(b, sb, bk)

  qpos = rows(jnp.arange(t)[None] if mask.q_positions is None else mask.q_positions, 0)
  kpos = slots(jnp.arange(s)[None] if mask.kv_positions is None else mask.kv_positions, 0)
  kval = slots(jnp.ones((1, s), bool) if mask.kv_valid is None else mask.kv_valid, False)
  seg = None
  if mask.q_segment_ids is not None:
    kseg = mask.kv_segment_ids if mask.kv_segment_ids is not None else mask.q_segment_ids
    seg = (rows(mask.q_segment_ids, -1), slots(kseg, -2))

  pad_s = lambda x, axis: jnp.pad(x, [(0, sp - s if i == axis else 0) for i in range(x.ndim)])
  if heads_major:  # k [B, K, Dh', S], v [B, K, S, Dh'] (Dh': Dh, or Dh / 2 for int4 codes)
    kb = pad_s(k, 3).reshape(*k.shape[:3], sb, bk)
    vb = pad_s(v, 2).reshape(b, kh, sb, bk, v.shape[-1])
  else:  # k, v [B, S, K, Dh']
    kb = jnp.swapaxes(pad_s(k, 1), 1, 2).reshape(b, kh, sb, bk, k.shape[-1])
    vb = jnp.swapaxes(pad_s(v, 1), 1, 2).reshape(b, kh, sb, bk, v.shape[-1])
  qargs = None
  if quant is not None:
    to_bks = (lambda x: x) if heads_major else (lambda x: jnp.swapaxes(x, 1, 2))
    ks = pad_s(to_bks(quant["k_scale"].astype(jnp.float32)), 2).reshape(b, kh, sb, bk)
    vs = None if quant["v_scale"] is None else pad_s(
        to_bks(quant["v_scale"].astype(jnp.float32)), 2).reshape(b, kh, sb, bk)
    km = None if quant["k_mean"] is None else quant["k_mean"].astype(jnp.float32)
    qargs = (ks, vs, km)

  per_block = b * h * tp * bk * 4
  most = int(max(1, min(m_blocks, BLOCK_CHUNK_BYTES // max(per_block, 1))))
  n_chunks = -(-m_blocks // most)
  chunk = -(-m_blocks // n_chunks)  # equal chunks: the fewest padded (wasted) blocks
  pad_m = n_chunks * chunk - m_blocks
  if pad_m:
    idx = jnp.pad(idx, [(0, 0)] * 4 + [(0, pad_m)])
    valid = jnp.pad(valid, [(0, 0)] * 4 + [(0, pad_m)])
  fmt = None if quant is None else quant["fmt"]
  dtype = q_BTHD.dtype

  def one(q_GQRD, kb_, vb_, idx_GQM, valid_GQM, qpos_QR, kpos_SK, kval_SK, seg_, qargs_):
    """One (row, kv head): q [gi, Qb, R, Dh] against its listed blocks."""

    def step(carry, j):
      m_i, l_i, acc = carry
      ic = jax.lax.dynamic_slice_in_dim(idx_GQM, j * chunk, chunk, axis=2)  # [gi, Qb, c]
      vc = jax.lax.dynamic_slice_in_dim(valid_GQM, j * chunk, chunk, axis=2)
      kg = jnp.take(kb_, ic, axis=1 if heads_major else 0)  # [Dh', gi,Qb,c,bk] / [gi,Qb,c,bk,Dh']
      vg = jnp.take(vb_, ic, axis=0)  # [gi, Qb, c, bk, Dh']
      if fmt is not None:
        ks_, vs_, km_ = qargs_
        dh_axis = 0 if heads_major else -1
        kg = kv_cache.codes(kg, fmt, dh_axis).astype(jnp.float32) * jnp.expand_dims(
            jnp.take(ks_, ic, axis=0), dh_axis)
        if km_ is not None:
          kg = kg + (km_[:, None, None, None, None] if heads_major else km_)
        if vs_ is not None:
          vs_g = jnp.take(vs_, ic, axis=0)[..., None]
          vg = kv_cache.codes(vg, fmt, -1).astype(jnp.float32) * vs_g
      eq = "gqrd,dgqcs->gqrcs" if heads_major else "gqrd,gqcsd->gqrcs"
      logits = jnp.einsum(eq, q_GQRD, kg.astype(dtype), preferred_element_type=jnp.float32)
      kp = jnp.take(kpos_SK, ic, axis=0)[:, :, None]  # [gi, Qb, 1, c, bk]
      qp = qpos_QR[None, :, :, None, None]  # [1, Qb, R, 1, 1]
      em = (jnp.take(kval_SK, ic, axis=0) & vc[..., None])[:, :, None]
      if mask.causal:
        em = em & (kp <= qp)
      if mask.window is not None:
        in_window = (qp - kp) < mask.window
        if mask.sinks:
          in_window |= kp < mask.sinks
        em = em & in_window
      if seg_ is not None:
        qs, ks_seg = seg_
        em = em & (qs[None, :, :, None, None] == jnp.take(ks_seg, ic, axis=0)[:, :, None])
      logits = jnp.where(em, logits * scale, _NEG)
      m_new = jnp.maximum(m_i, jnp.max(logits, axis=(-2, -1)))
      p = jnp.where(em, jnp.exp(logits - m_new[..., None, None]), 0.0)
      corr = jnp.exp(m_i - m_new)
      l_new = l_i * corr + jnp.sum(p, axis=(-2, -1))
      pv = jnp.einsum("gqrcs,gqcsd->gqrd", p.astype(dtype), vg.astype(dtype),
                      preferred_element_type=jnp.float32)
      return (m_new, l_new, acc * corr[..., None] + pv), None

    shape = q_GQRD.shape[:-1]
    init = (jnp.full(shape, _NEG, jnp.float32), jnp.zeros(shape, jnp.float32),
            jnp.zeros((*shape, dh), jnp.float32))
    if n_chunks == 1:
      (m_i, l_i, acc), _ = step(init, 0)
    else:
      (m_i, l_i, acc), _ = jax.lax.scan(step, init, jnp.arange(n_chunks))
    seen = l_i > 0
    out = jnp.where(seen[..., None], acc / jnp.where(seen, l_i, 1.0)[..., None], 0.0)
    return out, jnp.where(seen, m_i + jnp.log(jnp.where(seen, l_i, 1.0)), _NEG)

  # vmap over rows, then kv heads; per-query / per-key mask data has no kv-head axis.
  inner = jax.vmap(one, in_axes=(0, 0, 0, 0, 0, None, None, None, None, 0))
  out, lse = jax.vmap(inner)(q, kb, vb, idx, valid, qpos, kpos, kval, seg, qargs)
  # [B, K, gi, Qb, R, ...] -> [B, T, H, ...]
  if per_head:
    out, lse = jnp.transpose(out, (0, 1, 3, 2, 4, 5)), jnp.transpose(lse, (0, 1, 3, 2, 4))
  out = out.reshape(b, kh, qb, g, bq, dh)
  lse = lse.reshape(b, kh, qb, g, bq)
  out = jnp.transpose(out, (0, 2, 4, 1, 3, 5)).reshape(b, tp, h, dh)[:, :t].astype(dtype)
  if not return_lse:
    return out
  return out, jnp.transpose(lse, (0, 2, 4, 1, 3)).reshape(b, tp, h)[:, :t]


def merge_partials(out_a, lse_a, out_b, lse_b):
  """Exactly merges two attentions over disjoint key sets by their log-sum-exps."""
  lse = jnp.logaddexp(lse_a, lse_b)
  wa = jnp.exp(lse_a - lse)[..., None]
  wb = jnp.exp(lse_b - lse)[..., None]
  out = wa * out_a.astype(jnp.float32) + wb * out_b.astype(jnp.float32)
  return out.astype(out_a.dtype), lse


# --- The layers' door: one forward's positions, mask and cache (`context`), then `attend`.

# Up to this many new tokens, a one-row cached forward attends before it writes. Measured
# (same process, batch 1): a win for 1-token decode steps (bench-25m 7.4 -> 6.6 ms at 256
# slots); a loss for 5-9-token speculative verifies of the 0.82M main-job model, where
# the extra attention and merge ops outweigh the copies they save.
SPLIT_MAX_TOKENS = 1


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Context:
  """What every layer's attention needs in one forward; `attend` returns it updated.

  positions: absolute token positions [B, T] (RoPE).
  mask: the mask of the new tokens against themselves, or against the (suffix) cache.
  cache: None, a KVCache or a PrefixCache; layers write their slots into it.
  prefix_mask: against a PrefixCache's prefix rows (None otherwise).
  """

  positions: Int[Array, "B T"]
  mask: AttentionMask
  cache: KVCache | PrefixCache | None = None
  prefix_mask: AttentionMask | None = None
  # The new tokens' mask positions are consecutive (a row's defaulted positions, or row
  # indices under packing): a key block after a query block is hidden from all of it, which
  # lets `blocked_causal` skip it. False where the caller passed its own positions.
  consecutive: bool = dataclasses.field(default=False, metadata=dict(static=True))


def context(b: int, t: int, *, positions=None, segment_ids=None, cache=None) -> Context:
  """The Context of a forward over [b, t] tokens (positions default to the cache's next)."""
  positions_given = positions
  if cache is None:
    if positions is None:
      positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32)[None], (b, t))
    mask = AttentionMask(q_positions=positions, kv_positions=positions,
                         q_segment_ids=segment_ids, kv_segment_ids=segment_ids)
    if segment_ids is not None:
      # Packed rows: positions restart per segment, so causality must use the row index,
      # which is monotone across segments.
      idx_BT = jnp.broadcast_to(jnp.arange(t)[None], (b, t))
      mask = mask.replace(q_positions=idx_BT, kv_positions=idx_BT)
    return Context(positions, mask, consecutive=positions_given is None or segment_ids is not None)
  if segment_ids is not None:
    raise ValueError("segment_ids (packed rows) cannot be combined with a KV cache")
  if cache.batch != b:
    raise ValueError(f"cache has batch {cache.batch}, the tokens have batch {b}")
  if isinstance(cache, EvictingCache):  # per-head slots: attention masks by slot positions
    positions = cache.positions(t) if positions is None else positions
    return Context(positions, AttentionMask(q_positions=positions, kv_positions=positions), cache)
  if isinstance(cache, PrefixCache) and isinstance(cache.suffix, EvictingCache):
    raise ValueError("KV eviction is not supported under a shared prefix (PrefixCache suffix); "
                     "decode from the Decoder's own EvictingCache")
  if isinstance(cache, KVCache):
    positions = cache.positions(t) if positions is None else positions
    s = cache.max_len
    mask = AttentionMask(q_positions=positions,
                         kv_positions=jnp.broadcast_to(jnp.arange(s)[None], (b, s)))
    return Context(positions, mask, cache, consecutive=positions_given is None)
  if not isinstance(cache, PrefixCache):
    raise ValueError(f"cache must be a KVCache or a PrefixCache, got {type(cache).__name__}")
  bp = cache.prefix.batch
  if bp < 1 or b % bp:
    raise ValueError(f"prefix cache batch {bp} must divide the token batch {b}")
  if cache.prefix.n_layers != cache.suffix.n_layers:
    raise ValueError(f"prefix cache has {cache.prefix.n_layers} layers, the suffix cache "
                     f"{cache.suffix.n_layers}")
  positions = cache.positions(t) if positions is None else positions
  # The suffix mask works on suffix-relative positions (suffix slot j == relative
  # position j), RoPE on absolute ones.
  s, p = cache.suffix.max_len, cache.prefix.max_len
  rel_BT = positions - cache.prefix_lengths[:, None]
  mask = AttentionMask(q_positions=rel_BT,
                       kv_positions=jnp.broadcast_to(jnp.arange(s)[None], (b, s)))
  prefix_mask = AttentionMask(causal=False,
                              kv_valid=jnp.arange(p)[None] < cache.prefix.lengths[:, None])
  return Context(positions, mask, cache, prefix_mask)


def attend(ctx: Context, layer: int, q_BTHD: Float[Array, "B T H Dh"],
           k_BTKD: Float[Array, "B T K Dh"], v_BTKD: Float[Array, "B T K Dh"], *,
           impl: str, qk: str | None = None) -> tuple[Float[Array, "B T H Dh"], Context]:
  """One layer's attention of the new tokens; writes their k, v into `ctx.cache`."""
  cache = ctx.cache
  if cache is None:
    if _blocked(ctx, q_BTHD, impl, qk):
      return blocked_causal(q_BTHD, k_BTKD, v_BTKD, ctx.mask), ctx
    return attention(q_BTHD, k_BTKD, v_BTKD, mask=ctx.mask, impl=impl, qk=qk), ctx
  if isinstance(cache, EvictingCache):
    out, cache = kv_evict.attend(cache, layer, ctx.positions, q_BTHD, k_BTKD, v_BTKD, impl=impl,
                                 qk=qk)
    return out, dataclasses.replace(ctx, cache=cache)
  if isinstance(cache, PrefixCache):
    suffix = cache.suffix.with_layer(layer, *write_layer(cache.suffix, layer, k_BTKD, v_BTKD))
    out_s, lse_s = cache_attention(q_BTHD, suffix, layer, mask=ctx.mask, impl=impl,
                                   return_lse=True, qk=qk)
    b, t, h, dh = q_BTHD.shape
    bp = cache.prefix.batch
    q_PMHD = q_BTHD.reshape(bp, (b // bp) * t, h, dh)  # rows of a group become queries
    out_p, lse_p = cache_attention(q_PMHD, cache.prefix, layer, mask=ctx.prefix_mask,
                                   impl=impl, return_lse=True, qk=qk)
    out, _ = merge_partials(out_p.reshape(b, t, h, dh), lse_p.reshape(b, t, h), out_s, lse_s)
    return out, dataclasses.replace(ctx, cache=dataclasses.replace(cache, suffix=suffix))
  prefill = (_blocked(ctx, q_BTHD, impl, qk) and cache.quant is None and cache.select is None
             and ctx.mask.kv_valid is None)
  split = prefill or (cache.batch == 1 and q_BTHD.shape[1] <= SPLIT_MAX_TOKENS)
  if prefill:
    out = _blocked_prefill(ctx, layer, q_BTHD, k_BTKD, v_BTKD)
  elif split:
    out = _attend_then_write(ctx, layer, q_BTHD, k_BTKD, v_BTKD, impl, qk)
  if split:
    # The writes must come after the reads for XLA to update the cache in place: a data
    # dependency on the attention output orders them (0 * finite = 0).
    dep = 0 * out[:1, :1, :1, :1].astype(k_BTKD.dtype)
    k_BTKD, v_BTKD = k_BTKD + dep, v_BTKD + dep
  cache = cache.with_layer(layer, *write_layer(cache, layer, k_BTKD, v_BTKD))
  if not split:
    out = cache_attention(q_BTHD, cache, layer, mask=ctx.mask, impl=impl, qk=qk)
  return out, dataclasses.replace(ctx, cache=cache)


def _attend_then_write(ctx: Context, layer, q_BTHD, k_BTKD, v_BTKD, impl, qk):
  """Attention of T new tokens to the cache's slots < length plus to themselves.

  Equals attending to the cache after writing the new tokens at slots length..length+T-1,
  merged by log-sum-exp. Used for one row: there the write is a dynamic_update_slice,
  which XLA:CPU duplicates into the reshaping attention read, so every layer's cache was
  copied on every decode step (~1.4 ms of 7 at 256 slots, more at long prompts). Reading
  first and writing after keeps the update in place. Several rows write by scatter,
  which stays in place anyway (and the extra merge costs more than it saves there).
  A quantized cache's new tokens are attended as it will store them (`kv_cache.encode`),
  so one row computes what several rows do.
  """
  cache, mask = ctx.cache, ctx.mask
  t, s = q_BTHD.shape[1], cache.max_len
  old_BS = jnp.arange(s)[None] < cache.lengths[:, None]
  slots_BT = cache.positions(t)
  new_valid = None
  if mask.kv_valid is not None:
    old_BS &= mask.kv_valid
    new_valid = jnp.take_along_axis(mask.kv_valid, jnp.minimum(slots_BT, s - 1), axis=1)
  out_c, lse_c = cache_attention(q_BTHD, cache, layer, mask=mask.replace(kv_valid=old_BS),
                                 impl=impl, return_lse=True, qk=qk)
  new_mask = mask.replace(kv_positions=slots_BT, kv_valid=new_valid)
  if cache.quant is None:
    out_n, lse_n = attention(q_BTHD, k_BTKD.astype(q_BTHD.dtype), v_BTKD.astype(q_BTHD.dtype),
                             mask=new_mask, impl=impl, return_lse=True)
  else:
    enc = kv_cache.encode(cache, layer, k_BTKD, v_BTKD)
    out_n, lse_n = _attend_codes(q_BTHD, enc["k"], enc["v"], new_mask, impl, "seq_major", None,
                                 True, fmt=cache.quant, k_scale=enc["k_scale"],
                                 v_scale=enc["v_scale"], k_mean=enc.get("k_mean"),
                                 int_qk=qk == "int8")
  return merge_partials(out_c, lse_c, out_n, lse_n)[0]


# Long forwards (prefill, long-context eval) attend in query blocks of this many tokens,
# each to the keys up to its end only (`blocked_causal`): no T x T score matrix, and the
# hidden upper triangle is never computed.
BLOCKED_MIN_TOKENS = 512
BLOCKED_BLOCK = 128


def _blocked(ctx: Context, q_BTHD, impl: str, qk) -> bool:
  t = q_BTHD.shape[1]
  return (ctx.consecutive and impl == "xla" and qk is None and ctx.mask.layout is None
          and ctx.mask.causal and t >= BLOCKED_MIN_TOKENS and t % BLOCKED_BLOCK == 0)


def blocked_causal(q_BTHD: Float[Array, "B T H Dh"], k_BTKD: Float[Array, "B T K Dh"],
                   v_BTKD: Float[Array, "B T K Dh"], mask: AttentionMask, *,
                   block: int | None = None, return_lse: bool = False):
  """Causal attention of T tokens to themselves, one query block at a time.

  Query block i attends to keys [0, (i + 1) * block) only, with `mask`'s element mask
  (causal, window + sinks, segments, kv_valid) applied inside; the keys after the block are
  skipped, which is exact when the mask's positions increase along each row (the caller's
  `Context.consecutive`). Peak scores memory is [B, H, block, T] instead of [B, H, T, T],
  and the work is the lower triangle plus the diagonal blocks. block: default
  BLOCKED_BLOCK.
  """
  t = q_BTHD.shape[1]
  block = BLOCKED_BLOCK if block is None else block
  if t % block:
    raise ValueError(f"blocked_causal: T={t} is not a multiple of block={block}")
  cut = lambda x, lo, hi: None if x is None else x[:, lo:hi]
  outs, lses = [], []
  for lo in range(0, t, block):
    hi = lo + block
    m = mask.replace(q_positions=cut(mask.q_positions, lo, hi),
                     kv_positions=cut(mask.kv_positions, 0, hi),
                     q_segment_ids=cut(mask.q_segment_ids, lo, hi),
                     kv_segment_ids=cut(mask.kv_segment_ids, 0, hi),
                     kv_valid=cut(mask.kv_valid, 0, hi))
    if mask.q_segment_ids is not None and mask.kv_segment_ids is None:
      m = m.replace(kv_segment_ids=mask.q_segment_ids[:, :hi])
    o, l = attention(q_BTHD[:, lo:hi], k_BTKD[:, :hi], v_BTKD[:, :hi], mask=m, impl="xla",
                     return_lse=True)
    outs.append(o)
    lses.append(l)
  out, lse = jnp.concatenate(outs, axis=1), jnp.concatenate(lses, axis=1)
  return (out, lse) if return_lse else out


def _blocked_prefill(ctx: Context, layer, q_BTHD, k_BTKD, v_BTKD):
  """A long cached forward: the cache's slots < length (skipped at run time when every row
  is empty, as in a first prefill), merged with `blocked_causal` over the new tokens; the
  caller writes the new k, v after these reads, so the cache is updated in place."""
  cache, mask = ctx.cache, ctx.mask
  b, t, h, _ = q_BTHD.shape
  s = cache.max_len
  old_mask = mask.replace(kv_valid=jnp.arange(s)[None] < cache.lengths[:, None])

  def old(q):
    return cache_attention(q, cache, layer, mask=old_mask, impl="xla", return_lse=True)

  def empty(q):
    return jnp.zeros_like(q), jnp.full((b, t, h), kernel_masks.NEG_INF, jnp.float32)

  out_c, lse_c = jax.lax.cond(jnp.any(cache.lengths > 0), old, empty, q_BTHD)
  slots_BT = cache.positions(t)
  new_mask = mask.replace(kv_positions=slots_BT)
  out_n, lse_n = blocked_causal(q_BTHD, k_BTKD.astype(q_BTHD.dtype),
                                v_BTKD.astype(q_BTHD.dtype), new_mask, return_lse=True)
  return merge_partials(out_c, lse_c, out_n, lse_n)[0]


def finish(ctx: Context, t: int):
  """The cache after a forward over t tokens: every row's length advanced by t."""
  if ctx.cache is None:
    return None
  return ctx.cache.with_lengths(ctx.cache.lengths + t)

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

from model import kv_cache
from model.config import ATTN_QK
from model.kv_cache import KVCache, PrefixCache, write_layer

IMPLS = ("reference", "xla")
_NEG = -1e30  # finite "minus infinity": fully masked rows stay NaN-free


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
  """

  q_positions: Int[Array, "B T"] | None = None
  kv_positions: Int[Array, "B S"] | None = None
  q_segment_ids: Int[Array, "B T"] | None = None
  kv_segment_ids: Int[Array, "B S"] | None = None
  kv_valid: Bool[Array, "B S"] | None = None
  causal: bool = dataclasses.field(default=True, metadata=dict(static=True))
  window: int | None = dataclasses.field(default=None, metadata=dict(static=True))
  sinks: int = dataclasses.field(default=0, metadata=dict(static=True))

  def replace(self, **kw) -> AttentionMask:
    return dataclasses.replace(self, **kw)

  def materialize(self, batch: int, t: int, s: int) -> Bool[Array, "B T S"]:
    """The dense boolean mask, True where a query may attend to a key."""
    qp = self.q_positions if self.q_positions is not None else jnp.arange(t)[None]
    kp = self.kv_positions if self.kv_positions is not None else jnp.arange(s)[None]
    qp, kp = qp[:, :, None], kp[:, None, :]
    m = jnp.ones((batch, t, s), bool)
    if self.causal:
      m &= kp <= qp
    if self.window is not None:
      in_window = (qp - kp) < self.window
      if self.sinks:
        in_window |= kp < self.sinks
      m &= in_window
    if self.q_segment_ids is not None:
      kseg = self.kv_segment_ids if self.kv_segment_ids is not None else self.q_segment_ids
      m &= self.q_segment_ids[:, :, None] == kseg[:, None, :]
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
  if cache.quant is None:
    return _attend(q_BTHD, cache.k[layer], cache.v[layer], mask, impl, cache.layout, None,
                   return_lse)
  k_mean = None if cache.k_mean is None else cache.k_mean[layer]
  return _attend_codes(q_BTHD, cache.k[layer], cache.v[layer], mask, impl, cache.layout, None,
                       return_lse, fmt=cache.quant, k_scale=cache.k_scale[layer],
                       v_scale=cache.v_scale[layer], k_mean=k_mean, int_qk=qk == "int8")


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
  mask_BTS = mask.materialize(b, t, s)
  if impl == "xla" and heads_major:
    return _heads_major(q_BTHD, k, v, mask_BTS, scale, return_lse)
  if heads_major:
    k, v = jnp.transpose(k, (0, 3, 1, 2)), jnp.swapaxes(v, 1, 2)
  if impl == "xla" and not return_lse:
    out = jax.nn.dot_product_attention(
        q_BTHD, k, v, mask=mask_BTS[:, None], scale=scale, implementation="xla")
    return out.astype(q_BTHD.dtype)
  return _reference(q_BTHD, k, v, mask_BTS, scale, return_lse)


def _heads_major(q_BTHD, k_BKDS, v_BKSD, mask_BTS, scale, return_lse):
  """Attention against k [B, K, Dh, S] and v [B, K, S, Dh]: both batched dots find their
  operands in the layout XLA wants, so a KV cache is read in place, never transposed."""
  b, t, h, dh = q_BTHD.shape
  kh = k_BKDS.shape[1]
  dtype = k_BKDS.dtype
  q_BKGTD = jnp.transpose(q_BTHD.reshape(b, t, kh, h // kh, dh), (0, 2, 3, 1, 4)).astype(dtype)
  logits_BKGTS = jnp.einsum("bkgtd,bkds->bkgts", q_BKGTD, k_BKDS,
                            preferred_element_type=jnp.float32) * scale
  logits_BKGTS = jnp.where(mask_BTS[:, None, None], logits_BKGTS, _NEG)
  lse_BKGT = jax.nn.logsumexp(logits_BKGTS, axis=-1)
  probs_BKGTS = jnp.exp(logits_BKGTS - lse_BKGT[..., None]).astype(v_BKSD.dtype)
  out_BKGTD = jnp.einsum("bkgts,bksd->bkgtd", probs_BKGTS, v_BKSD,
                         preferred_element_type=jnp.float32)
  out = jnp.transpose(out_BKGTD, (0, 3, 1, 2, 4)).reshape(b, t, h, dh).astype(q_BTHD.dtype)
  if not return_lse:
    return out
  return out, jnp.transpose(lse_BKGT, (0, 3, 1, 2)).reshape(b, t, h)


def _reference(q_BTHD, k_BSKD, v_BSKD, mask_BTS, scale, return_lse):
  b, t, h, dh = q_BTHD.shape
  kh = k_BSKD.shape[2]
  q_BTKGD = q_BTHD.reshape(b, t, kh, h // kh, dh).astype(jnp.float32)
  logits_BKGTS = jnp.einsum("btkgd,bskd->bkgts", q_BTKGD, k_BSKD.astype(jnp.float32)) * scale
  logits_BKGTS = jnp.where(mask_BTS[:, None, None], logits_BKGTS, _NEG)
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
  b, t, h, dh = q_BTHD.shape
  heads_major, s, kh, scale = _dims(q_BTHD, k, layout, scale)
  mask_BTS = mask.materialize(b, t, s)
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
    return _reference(q_BTHD, k, v, mask_BTS, scale, return_lse)
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
  logits_BKGTS = jnp.where(mask_BTS[:, None, None], logits_BKGTS * scale, _NEG)
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


def context(b: int, t: int, *, positions=None, segment_ids=None, cache=None) -> Context:
  """The Context of a forward over [b, t] tokens (positions default to the cache's next)."""
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
    return Context(positions, mask)
  if segment_ids is not None:
    raise ValueError("segment_ids (packed rows) cannot be combined with a KV cache")
  if cache.batch != b:
    raise ValueError(f"cache has batch {cache.batch}, the tokens have batch {b}")
  if isinstance(cache, KVCache):
    positions = cache.positions(t) if positions is None else positions
    s = cache.max_len
    mask = AttentionMask(q_positions=positions,
                         kv_positions=jnp.broadcast_to(jnp.arange(s)[None], (b, s)))
    return Context(positions, mask, cache)
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
    return attention(q_BTHD, k_BTKD, v_BTKD, mask=ctx.mask, impl=impl, qk=qk), ctx
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
  split = cache.batch == 1 and q_BTHD.shape[1] <= SPLIT_MAX_TOKENS
  if split:
    out = _attend_then_write(ctx, layer, q_BTHD, k_BTKD, v_BTKD, impl, qk)
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


def finish(ctx: Context, t: int):
  """The cache after a forward over t tokens: every row's length advanced by t."""
  if ctx.cache is None:
    return None
  return ctx.cache.with_lengths(ctx.cache.lengths + t)

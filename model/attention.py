"""The attention entry point: `attention(q, k, v, mask=AttentionMask, impl=...)`."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from jaxtyping import Array, Bool, Float, Int

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


def attention(q_BTHD: Float[Array, "B T H Dh"], k: Float[Array, "B S K Dh"],
              v: Float[Array, "B S K Dh"], *, mask: AttentionMask, impl: str = "xla",
              scale: float | None = None, return_lse: bool = False,
              kv_heads_major: bool = False):
  """Softmax attention with grouped kv heads (K divides H).

  k, v are [B, S, K, Dh], or with `kv_heads_major` the KV cache's layouts
  k [B, K, Dh, S] and v [B, K, S, Dh]. Returns out[B, T, H, Dh], and with
  `return_lse` also lse[B, T, H] (natural log of the softmax normaliser) so
  partial attentions can be merged exactly.
  """
  if impl not in ("reference", "xla"):
    raise ValueError(f"attention impl={impl!r}; valid: 'reference', 'xla'")
  b, t, h, dh = q_BTHD.shape
  s, kh = (k.shape[3], k.shape[1]) if kv_heads_major else (k.shape[1], k.shape[2])
  if h % kh:
    raise ValueError(f"kv heads {kh} must divide query heads {h}")
  scale = dh ** -0.5 if scale is None else scale
  mask_BTS = mask.materialize(b, t, s)
  if impl == "xla" and kv_heads_major:
    return _heads_major(q_BTHD, k, v, mask_BTS, scale, return_lse)
  if kv_heads_major:
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


def merge_partials(out_a, lse_a, out_b, lse_b):
  """Exactly merges two attentions over disjoint key sets by their log-sum-exps."""
  lse = jnp.logaddexp(lse_a, lse_b)
  wa = jnp.exp(lse_a - lse)[..., None]
  wb = jnp.exp(lse_b - lse)[..., None]
  out = wa * out_a.astype(jnp.float32) + wb * out_b.astype(jnp.float32)
  return out.astype(out_a.dtype), lse

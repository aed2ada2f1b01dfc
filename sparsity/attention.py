"""Attention sparsity: block layouts (`model.BlockLayout`), cache selectors, Delta
attention, and recall metrics.

Static builders (`sparsity.attention_static`): causal, window (+ sinks), global, segment
layouts, union / intersection. Dynamic builders (`sparsity.attention_dynamic`): Quest
top-k, HiP, SALE. Selectors `TopK`, `HiP`, `SALE` are frozen (hashable) dataclasses a KV
cache carries (`model.Decoder(cfg, attn_select=...)`): attention calls them on every
cached read, `select(q_BTHD, k_BKSD, mask, layer) -> BlockLayout | None` (None: dense
layer). A selector clamps its budget to the cache's kv blocks (the builders raise).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float

from model.attention import AttentionMask, BlockLayout, attention
from sparsity.attention_dynamic import POOLS, hip_layout, hip_rounds, sale_layout, topk_layout
from sparsity.attention_static import (
    causal_layout,
    global_layout,
    intersection,
    segment_layout,
    union,
    window_layout,
)

__all__ = [
    "HiP", "SALE", "SELECTORS", "TopK", "attention_recall", "causal_layout", "delta_attention",
    "global_layout", "hip_layout", "hip_rounds", "intersection", "parse_selector",
    "sale_layout", "segment_layout", "topk_layout", "topk_recall", "union", "window_layout",
]


def _need_int(cls, name, value, low):
  if isinstance(value, bool) or not isinstance(value, int) or value < low:
    raise ValueError(f"{cls}.{name}={value!r} must be an int >= {low}")


def _dense_layers(obj):
  layers = obj.dense_layers
  if isinstance(layers, int) and not isinstance(layers, bool):
    layers = (layers,)
  layers = tuple(layers)
  if any(isinstance(x, bool) or not isinstance(x, int) or x < 0 for x in layers):
    raise ValueError(f"{type(obj).__name__}.dense_layers={obj.dense_layers!r} must be layer "
                     "indices (ints >= 0)")
  object.__setattr__(obj, "dense_layers", layers)


def _check_shared(sel):
  """The fields every selector has: block >= 1, sinks and local >= 0, dense_layers."""
  name = type(sel).__name__
  _need_int(name, "block", sel.block, 1)
  _need_int(name, "sinks", sel.sinks, 0)
  _need_int(name, "local", sel.local, 0)
  _dense_layers(sel)


def _blocks(s, block):
  return -(-s // block)


@dataclasses.dataclass(frozen=True)
class TopK:
  """Quest block top-k selector (`topk_layout`), square blocks of `block` tokens."""

  k: int = 8
  block: int = 64
  pool: str = "minmax"
  sinks: int = 1
  local: int = 1
  dense_layers: tuple[int, ...] = ()

  def __post_init__(self):
    _need_int("TopK", "k", self.k, 1)
    _check_shared(self)
    if self.pool not in POOLS:
      raise ValueError(f"TopK.pool={self.pool!r}; valid: {', '.join(map(repr, POOLS))}")

  def __call__(self, q_BTHD, k_BKSD, mask, layer) -> BlockLayout | None:
    if layer in self.dense_layers:
      return None
    return topk_layout(q_BTHD, k_BKSD, mask, block_q=self.block, block_kv=self.block,
                       k=min(self.k, _blocks(k_BKSD.shape[2], self.block)), pool=self.pool,
                       sinks=self.sinks, local=self.local)


@dataclasses.dataclass(frozen=True)
class HiP:
  """HiP hierarchical top-k selector (`hip_layout`); the paper keeps its first layers
  dense (dense_layers). The mask is recomputed on every read (no refresh interval)."""

  k: int = 8
  block: int = 32
  sinks: int = 1
  local: int = 1
  dense_layers: tuple[int, ...] = ()

  def __post_init__(self):
    _need_int("HiP", "k", self.k, 1)
    _check_shared(self)

  def __call__(self, q_BTHD, k_BKSD, mask, layer) -> BlockLayout | None:
    if layer in self.dense_layers:
      return None
    return hip_layout(q_BTHD, k_BKSD, mask, block_q=self.block, block_kv=self.block,
                      k=min(self.k, _blocks(k_BKSD.shape[2], self.block)), sinks=self.sinks,
                      local=self.local)


@dataclasses.dataclass(frozen=True)
class SALE:
  """SALE-style threshold selector (`sale_layout`): tau one float or one per query head."""

  tau: float | tuple[float, ...] = 0.01
  max_blocks: int = 16
  block: int = 64
  sinks: int = 1
  local: int = 1
  dense_layers: tuple[int, ...] = ()

  def __post_init__(self):
    tau = tuple(self.tau) if isinstance(self.tau, (list, tuple)) else (self.tau,)
    if not tau or any(isinstance(x, bool) or not isinstance(x, (int, float))
                      or not 0.0 <= x < 1.0 for x in tau):
      raise ValueError(f"SALE.tau={self.tau!r} must be a float in [0, 1) or a tuple of them "
                       "(one per query head)")
    if isinstance(self.tau, (list, tuple)):
      object.__setattr__(self, "tau", tau)
    _need_int("SALE", "max_blocks", self.max_blocks, 1)
    _check_shared(self)

  def __call__(self, q_BTHD, k_BKSD, mask, layer) -> BlockLayout | None:
    if layer in self.dense_layers:
      return None
    return sale_layout(q_BTHD, k_BKSD, mask, block_q=self.block, block_kv=self.block,
                       tau=self.tau,
                       max_blocks=min(self.max_blocks, _blocks(k_BKSD.shape[2], self.block)),
                       sinks=self.sinks, local=self.local)


SELECTORS = {"topk": TopK, "hip": HiP, "sale": SALE}


def _parse_value(field, text):
  if field.name == "pool":
    return text
  if field.name in ("dense_layers", "tau"):
    parts = [p for p in text.split(",") if p]
    conv = int if field.name == "dense_layers" else float
    try:
      vals = tuple(conv(p) for p in parts)
    except ValueError:
      raise ValueError(f"selector option {field.name}={text!r}: expected comma-separated "
                       f"{conv.__name__}s") from None
    return vals[0] if field.name == "tau" and len(vals) == 1 else vals
  try:
    return int(text)
  except ValueError:
    raise ValueError(f"selector option {field.name}={text!r}: expected an int") from None


def parse_selector(spec: str):
  """A selector from a CLI spec "name:opt=value:...", e.g. "topk:k=8:block=64",
  "hip:k=4:block=32:dense_layers=0,1", "sale:tau=0.01:max_blocks=16:block=64"."""
  if not isinstance(spec, str) or not spec:
    raise ValueError(f"selector spec {spec!r}; valid names: {', '.join(SELECTORS)}")
  name, *opts = spec.split(":")
  if name not in SELECTORS:
    raise ValueError(f"unknown selector {name!r} in {spec!r}; valid: {', '.join(SELECTORS)}")
  cls = SELECTORS[name]
  fields = {f.name: f for f in dataclasses.fields(cls)}
  kw = {}
  for opt in opts:
    key, eq, text = opt.partition("=")
    if key not in fields or not eq:
      raise ValueError(f"selector {name!r}: bad option {opt!r}; valid options: "
                       f"{', '.join(f'{k}=...' for k in fields)}")
    kw[key] = _parse_value(fields[key], text)
  return cls(**kw)


def delta_attention(q_BTHD: Float[Array, "B T H Dh"], k_BSKD: Float[Array, "B S K Dh"],
                    v_BSKD: Float[Array, "B S K Dh"], *, mask: AttentionMask, gamma: int,
                    impl: str = "xla") -> Float[Array, "B T H Dh"]:
  """Delta attention: sparse attention (over `mask.layout`) for every query, corrected by
  dense attention at one anchor query per group of `gamma` consecutive queries.

  Groups are queries [g * gamma, (g + 1) * gamma); the anchor is each group's last query
  (index i with i % gamma == gamma - 1, or T - 1 for a partial last group), which gets
  its dense output; every other query of the group gets sparse + (dense - sparse) of the
  anchor. gamma=1: every query is an anchor, so the result is dense attention exactly.
  """
  if isinstance(gamma, bool) or not isinstance(gamma, int) or gamma < 1:
    raise ValueError(f"gamma={gamma!r} must be an int >= 1 (queries per dense anchor)")
  if mask.layout is None:
    raise ValueError("delta_attention needs mask.layout (the sparse pattern to correct)")
  if gamma == 1:  # every query is its own anchor: dense attention, computed as such
    return attention(q_BTHD, k_BSKD, v_BSKD, mask=mask.replace(layout=None), impl=impl)
  b, t = q_BTHD.shape[:2]
  sparse = attention(q_BTHD, k_BSKD, v_BSKD, mask=mask, impl=impl)
  n_groups = -(-t // gamma)
  anchors = jnp.minimum((jnp.arange(n_groups) + 1) * gamma, t) - 1
  qpos = jnp.broadcast_to(jnp.arange(t)[None] if mask.q_positions is None
                          else mask.q_positions, (b, t))
  dense_mask = mask.replace(layout=None, q_positions=qpos[:, anchors])
  if mask.q_segment_ids is not None:
    seg = jnp.broadcast_to(mask.q_segment_ids, (b, t))
    kseg = mask.kv_segment_ids if mask.kv_segment_ids is not None else seg
    dense_mask = dense_mask.replace(q_segment_ids=seg[:, anchors], kv_segment_ids=kseg)
  dense = attention(q_BTHD[:, anchors], k_BSKD, v_BSKD, mask=dense_mask, impl=impl)
  group = jnp.arange(t) // gamma
  delta = (dense.astype(jnp.float32) - sparse[:, anchors].astype(jnp.float32))[:, group]
  corrected = (sparse.astype(jnp.float32) + delta).astype(sparse.dtype)
  is_anchor = (jnp.arange(t) == anchors[group])[None, :, None, None]
  return jnp.where(is_anchor, dense[:, group], corrected)


def _probs(q_BTHD, k_BSKD, mask):
  """Dense softmax probabilities [B, H, T, S] (f32) under the element mask (layout aside)
  and whether each query sees any key [B, 1, T]."""
  b, t, h, dh = q_BTHD.shape
  s, kh = k_BSKD.shape[1:3]
  k = jnp.repeat(k_BSKD.astype(jnp.float32), h // kh, axis=2)
  logits = jnp.einsum("bthd,bshd->bhts", q_BTHD.astype(jnp.float32), k) * dh ** -0.5
  m = (AttentionMask() if mask is None else mask).materialize(b, t, s)[:, None]
  p = jax.nn.softmax(jnp.where(m, logits, -jnp.inf), axis=-1)
  return jnp.where(m, p, 0.0), jnp.any(m, axis=-1)


def _layout_heads(layout, h, kh, dense_BHTS):  # a layout's [B', H', ...] -> per query head
  hl = dense_BHTS.shape[1]
  if hl == h or hl == 1:
    return dense_BHTS
  if hl == kh:
    return jnp.repeat(dense_BHTS, h // kh, axis=1)
  raise ValueError(f"layout heads {hl}; valid: 1, {kh} (kv heads) or {h} (query heads)")


def attention_recall(q_BTHD: Float[Array, "B T H Dh"], k_BSKD: Float[Array, "B S K Dh"],
                     mask: AttentionMask | None, layout: BlockLayout) -> Array:
  """Fraction of the true (dense, element-masked) softmax mass inside the layout's active
  blocks, per (row, head) [B, H]: the mean over queries that see any key."""
  b, t, h, _ = q_BTHD.shape
  s, kh = k_BSKD.shape[1:3]
  p, seen = _probs(q_BTHD, k_BSKD, mask)
  inside = _layout_heads(layout, h, kh, layout.to_dense(t, s))
  mass = jnp.sum(p * inside, axis=-1)  # [B, H, T]
  w = jnp.broadcast_to(seen, mass.shape).astype(jnp.float32)
  return jnp.sum(mass * w, axis=-1) / jnp.maximum(jnp.sum(w, axis=-1), 1.0)


def topk_recall(q_BTHD: Float[Array, "B T H Dh"], k_BSKD: Float[Array, "B S K Dh"],
                mask: AttentionMask | None, layout: BlockLayout, *, k: int) -> Array:
  """Recall of the exact top-k kv blocks (by true attention mass summed over the q block's
  queries, per query head) by the layout's active blocks, per (row, head) [B, H]: the
  mean over q blocks with any mass (fewer than k blocks with mass: all of them)."""
  if isinstance(k, bool) or not isinstance(k, int) or k < 1:
    raise ValueError(f"k={k!r} must be an int >= 1")
  b, t, h, _ = q_BTHD.shape
  s, kh = k_BSKD.shape[1:3]
  bq, bk = layout.block_q, layout.block_kv
  qb, sb = -(-t // bq), -(-s // bk)
  layout.check(t, s)
  p, _ = _probs(q_BTHD, k_BSKD, mask)
  p = jnp.pad(p, ((0, 0), (0, 0), (0, qb * bq - t), (0, sb * bk - s)))
  mass = jnp.sum(p.reshape(b, h, qb, bq, sb, bk), axis=(3, 5))  # [B, H, Qb, Sb]
  kk = min(k, sb)
  vals, idx = jax.lax.top_k(mass, kk)
  true_top = jax.nn.one_hot(idx, sb, dtype=bool) & (vals > 0)[..., None]  # [B,H,Qb,kk,Sb]
  active = _layout_heads(layout, h, kh, layout.block_mask(sb))[:, :, :, None]
  hits = jnp.sum(true_top & active, axis=(-2, -1))
  n = jnp.sum(true_top, axis=(-2, -1))
  rec = jnp.where(n > 0, hits / jnp.maximum(n, 1), 0.0)
  has = (n > 0).astype(jnp.float32)
  return jnp.sum(rec * has, axis=-1) / jnp.maximum(jnp.sum(has, axis=-1), 1.0)

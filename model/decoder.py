"""`Decoder(cfg)`: the model's decoding face, the `step_fn` every decoding loop takes.

A frozen, value-hashable dataclass: two equal configs give equal Decoders, so they
share one compilation wherever the step_fn is a static jit argument. Decoding asks
it for caches and for the dimensions its cost records need, never the params or
the cache's arrays.
"""

from __future__ import annotations

import dataclasses

from jaxtyping import Array, Int

from model import kv_evict, transformer
from model.attention import cache_layout
from model.config import ModelConfig
from model.kv_cache import KVCache, init_cache


@dataclasses.dataclass(frozen=True)
class Decoder:
  """`step_fn(params, tokens[B, T], cache) -> (logits[B, T, V] f32, cache)` for `cfg`.

  attn_select: a dynamic block selector (`sparsity.attention`: top-k, HiP, SALE) that
    the caches it makes carry; attention then reads only the blocks it picks, in prefill
    and in every decode step.
  evict: a KV eviction policy (`sparsity.eviction`: H2O, SnapKV, StreamingLLM): the
    caches it makes are `model.kv_evict.EvictingCache`s of min(policy.budget, max_len)
    slots per (row, kv head) that keep up to max_len tokens.
  """

  cfg: ModelConfig
  attn_select: object = dataclasses.field(default=None, kw_only=True)
  evict: object = dataclasses.field(default=None, kw_only=True)

  def __post_init__(self):
    if self.evict is not None:
      kv_evict.check_policy(self.evict)
      if self.evict.budget > self.cfg.max_seq_len:
        raise ValueError(f"Decoder: eviction budget={self.evict.budget} exceeds the model's "
                         f"max_seq_len={self.cfg.max_seq_len}, the most tokens a cache can "
                         f"hold (valid: budget <= {self.cfg.max_seq_len})")
      if self.attn_select is not None:
        raise ValueError("Decoder: evict and attn_select cannot be combined (an EvictingCache "
                         "has no block-sparse read); pass one of them")

  def __call__(self, params, tokens_BT: Int[Array, "B T"], cache):
    return transformer.apply(self.cfg, params, tokens_BT, cache=cache)

  def init_cache(self, batch: int, max_len: int, *, dtype=None,
                 layout: str | None = None) -> KVCache | kv_evict.EvictingCache:
    """An empty cache (zeros, lengths 0) in the layout attention reads fastest here."""
    if self.evict is not None:
      return kv_evict.init(self.cfg, batch, max_len, self.evict, dtype=dtype,
                           layout=layout or cache_layout())
    return init_cache(self.cfg, batch, max_len, dtype=dtype,
                      layout=layout or cache_layout(), select=self.attn_select)

  def read_params(self, params):
    """The part of `params` one step reads (cost accounting); all of it here."""
    return params

  n_heads = property(lambda self: self.cfg.n_heads)
  kv_heads = property(lambda self: self.cfg.n_kv_heads)
  head_dim = property(lambda self: self.cfg.dh)
  n_layers = property(lambda self: self.cfg.n_layers, doc="Layers one step runs (attention cost).")
  vocab_size = property(lambda self: self.cfg.vocab_size)
  max_seq_len = property(lambda self: self.cfg.max_seq_len)

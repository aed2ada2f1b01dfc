"""The KV cache: a fixed-shape pytree, updated in place with dynamic_update_slice."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Int


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class KVCache:
  """Per-layer k, v buffers [B, S_max, K, Dh] and per-row filled lengths.

  Slot j of a row holds the token at position j, so a causal mask on positions
  also hides slots not yet written. Rows advance independently (ragged prompts).
  """

  k: tuple[Float[Array, "B S K Dh"], ...]
  v: tuple[Float[Array, "B S K Dh"], ...]
  lengths: Int[Array, " B"]

  @property
  def batch(self) -> int:
    return self.lengths.shape[0]

  @property
  def max_len(self) -> int:
    return self.k[0].shape[1]

  def replace(self, **kw) -> KVCache:
    return dataclasses.replace(self, **kw)

  @property
  def nbytes(self) -> int:
    return sum(x.size * x.dtype.itemsize for x in (*self.k, *self.v))


def init_cache(cfg, batch: int, max_len: int, dtype=None) -> KVCache:
  """An empty cache for `cfg` (a model.ModelConfig): zeros, lengths 0."""
  if max_len > cfg.max_seq_len:
    raise ValueError(
        f"cache max_len={max_len} exceeds the model's max_seq_len={cfg.max_seq_len}")
  dtype = dtype or cfg.jnp_dtype
  shape = (batch, max_len, cfg.n_kv_heads, cfg.dh)
  zeros = tuple(jnp.zeros(shape, dtype) for _ in range(cfg.n_layers))
  return KVCache(k=zeros, v=tuple(jnp.zeros(shape, dtype) for _ in range(cfg.n_layers)),
                 lengths=jnp.zeros((batch,), jnp.int32))


def write(buf_BSKD: Array, new_BTKD: Array, start_B: Array) -> Array:
  """Writes new[b] into buf[b] at slot start[b], per row (in place inside a jitted loop)."""
  if buf_BSKD.shape[0] == 1:
    # XLA turns a one-row scatter into a select over the whole buffer (a full cache copy
    # per decode step); a plain dynamic_update_slice stays in place.
    return jax.lax.dynamic_update_slice(buf_BSKD, new_BTKD.astype(buf_BSKD.dtype),
                                        (0, start_B[0], 0, 0))
  upd = lambda buf, new, s: jax.lax.dynamic_update_slice(buf, new.astype(buf.dtype), (s, 0, 0))
  return jax.vmap(upd)(buf_BSKD, new_BTKD, start_B)


def gather_rows(cache: KVCache, idx_B: Array) -> KVCache:
  """Reorders / duplicates cache rows (beam search, sample fan-out)."""
  return jax.tree.map(lambda x: jnp.take(x, idx_B, axis=0), cache)

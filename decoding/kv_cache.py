"""The KV cache: a fixed-shape pytree, updated in place with dynamic_update_slice."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Int


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class KVCache:
  """Per-layer buffers k [B, K, Dh, S_max] and v [B, K, S_max, Dh], per-row filled lengths.

  Slot j of a row holds the token at position j, so a causal mask on positions
  also hides slots not yet written. Rows advance independently (ragged prompts).
  The layouts are the operands attention's batched dots want as stored ((batch, kv
  head) leading; q.k contracts Dh, p.v contracts S), so a decode step reads the
  cache in place; XLA:CPU would otherwise transpose every layer's cache per step.
  """

  k: tuple[Float[Array, "B K Dh S"], ...]
  v: tuple[Float[Array, "B K S Dh"], ...]
  lengths: Int[Array, " B"]

  @property
  def batch(self) -> int:
    return self.lengths.shape[0]

  @property
  def max_len(self) -> int:
    return self.v[0].shape[2]

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
  k_shape = (batch, cfg.n_kv_heads, cfg.dh, max_len)
  v_shape = (batch, cfg.n_kv_heads, max_len, cfg.dh)
  return KVCache(k=tuple(jnp.zeros(k_shape, dtype) for _ in range(cfg.n_layers)),
                 v=tuple(jnp.zeros(v_shape, dtype) for _ in range(cfg.n_layers)),
                 lengths=jnp.zeros((batch,), jnp.int32))


def write(buf: Array, new_BTKD: Array, start_B: Array, *, slot_axis: int) -> Array:
  """Writes new[b] (T tokens) into buf[b] from slot start[b] on, per row (in place in a
  jitted loop). buf is [B, K, Dh, S] (slot_axis=3, keys) or [B, K, S, Dh] (2, values)."""
  perm = (0, 2, 3, 1) if slot_axis == 3 else (0, 2, 1, 3)
  new = jnp.transpose(new_BTKD, perm).astype(buf.dtype)
  if buf.shape[0] == 1:
    # XLA turns a one-row scatter into a select over the whole buffer (a full cache copy
    # per decode step); a plain dynamic_update_slice stays in place.
    idx = [0, 0, 0, 0]
    idx[slot_axis] = start_B[0]
    return jax.lax.dynamic_update_slice(buf, new, tuple(idx))

  def upd(buf_row, new_row, s):
    idx = [0, 0, 0]
    idx[slot_axis - 1] = s
    return jax.lax.dynamic_update_slice(buf_row, new_row, tuple(idx))

  return jax.vmap(upd)(buf, new, start_B)


def gather_rows(cache: KVCache, idx_B: Array) -> KVCache:
  """Reorders / duplicates cache rows (beam search, sample fan-out)."""
  return jax.tree.map(lambda x: jnp.take(x, idx_B, axis=0), cache)

"""KV caches: fixed-shape pytrees that attention writes in place (`model.attention`).

Slot j of a row holds the token at position j, so a causal mask on positions also
hides slots not yet written; rows advance independently (ragged prompts). A cache
has a static `layout`, picked per backend by `attention.cache_layout`:
  "heads_major": k [B, K, Dh, S], v [B, K, S, Dh]: the operands the batched dots of
    attention want as stored ((batch, kv head) leading; q.k contracts Dh, p.v
    contracts S), so a decode step reads the cache in place (XLA:CPU otherwise
    transposes every layer's cache on every step);
  "seq_major": k, v [B, S, K, Dh]: what `jax.nn.dot_product_attention` takes.
Nobody outside `model/` indexes cache shapes: ask `batch`, `max_len`, `n_layers`,
`kv_heads`, `head_dim`, `nbytes`.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from jaxtyping import Array, Int

LAYOUTS = ("heads_major", "seq_major")
_SLOT_AXIS = {"heads_major": (3, 2), "seq_major": (1, 1)}  # (k, v) slot axis per layout


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class KVCache:
  """Per-layer k and v buffers and per-row filled lengths (see module docstring)."""

  k: tuple[Array, ...]
  v: tuple[Array, ...]
  lengths: Int[Array, " B"]
  layout: str = dataclasses.field(default="heads_major", metadata=dict(static=True))

  @property
  def batch(self) -> int:
    return self.lengths.shape[0]

  @property
  def max_len(self) -> int:
    """Slots per row."""
    return self.v[0].shape[_SLOT_AXIS[self.layout][1]]

  @property
  def read_len(self) -> int:
    """Key slots one query attends over (as computed)."""
    return self.max_len

  @property
  def n_layers(self) -> int:
    return len(self.k)

  @property
  def kv_heads(self) -> int:
    return self.v[0].shape[1 if self.layout == "heads_major" else 2]

  @property
  def head_dim(self) -> int:
    return self.v[0].shape[-1]

  @property
  def nbytes(self) -> int:
    return sum(x.size * x.dtype.itemsize for x in (*self.k, *self.v))

  def replace(self, **kw) -> KVCache:
    return dataclasses.replace(self, **kw)

  def with_lengths(self, lengths_B: Array) -> KVCache:
    return self.replace(lengths=jnp.asarray(lengths_B, jnp.int32))

  def positions(self, t: int) -> Int[Array, "B T"]:
    """Positions of T new tokens written from each row's length on."""
    return self.lengths[:, None] + jnp.arange(t, dtype=jnp.int32)[None]

  def with_layer(self, i: int, k: Array, v: Array) -> KVCache:
    return self.replace(k=(*self.k[:i], k, *self.k[i + 1:]), v=(*self.v[:i], v, *self.v[i + 1:]))

  def take(self, idx_B: Array) -> KVCache:
    """Rows `idx` (reordered or repeated: beam search, sample fan-out)."""
    return jax.tree.map(lambda x: jnp.take(x, idx_B, axis=0), self)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class PrefixCache:
  """A prefix shared by groups of rows (Hydragen), plus each row's own suffix cache.

  `prefix` holds Bp rows (read-only; Bp divides B); `suffix` holds the B rows being
  decoded, each continuing after its group's prefix (suffix slot j is position
  prefix length + j). Attention reads each group's prefix once, as one batched
  matmul, and merges it with the row's suffix attention by log-sum-exp (exact).
  """

  prefix: KVCache
  suffix: KVCache

  # Rows, lengths, slots and dims are the suffix's; only the reads cover both.
  batch = property(lambda self: self.suffix.batch)
  lengths = property(lambda self: self.suffix.lengths)
  max_len = property(lambda self: self.suffix.max_len)
  read_len = property(lambda self: self.prefix.max_len + self.suffix.max_len)
  n_layers = property(lambda self: self.suffix.n_layers)
  kv_heads = property(lambda self: self.suffix.kv_heads)
  head_dim = property(lambda self: self.suffix.head_dim)

  @property
  def nbytes(self) -> int:
    return self.prefix.nbytes + self.suffix.nbytes

  @property
  def prefix_lengths(self) -> Array:
    """Each row's prefix length [B]."""
    return jnp.repeat(self.prefix.lengths, self.batch // self.prefix.batch)

  def with_lengths(self, lengths_B: Array) -> PrefixCache:
    return dataclasses.replace(self, suffix=self.suffix.with_lengths(lengths_B))

  def positions(self, t: int) -> Int[Array, "B T"]:
    return self.prefix_lengths[:, None] + self.suffix.positions(t)

  def take(self, idx_B: Array) -> PrefixCache:
    raise ValueError("PrefixCache rows cannot be reordered (rows would leave their prefix "
                     "group); decode from a plain KVCache for beam search")


def init_cache(cfg, batch: int, max_len: int, *, dtype=None, layout: str = "heads_major"
               ) -> KVCache:
  """An empty cache for `cfg` (a model.ModelConfig): zeros, lengths 0."""
  if not isinstance(max_len, int) or max_len < 1:
    raise ValueError(f"cache max_len={max_len!r} must be a positive integer")
  if max_len > cfg.max_seq_len:
    raise ValueError(
        f"cache max_len={max_len} exceeds the model's max_seq_len={cfg.max_seq_len}")
  if layout not in LAYOUTS:
    raise ValueError(f"cache layout={layout!r}; valid: {LAYOUTS}")
  dtype = dtype or cfg.jnp_dtype
  kh, dh = cfg.n_kv_heads, cfg.dh
  if layout == "heads_major":
    k_shape, v_shape = (batch, kh, dh, max_len), (batch, kh, max_len, dh)
  else:
    k_shape = v_shape = (batch, max_len, kh, dh)
  return KVCache(k=tuple(jnp.zeros(k_shape, dtype) for _ in range(cfg.n_layers)),
                 v=tuple(jnp.zeros(v_shape, dtype) for _ in range(cfg.n_layers)),
                 lengths=jnp.zeros((batch,), jnp.int32), layout=layout)


def write(buf: Array, new_BTKD: Array, start_B: Array, *, slot_axis: int) -> Array:
  """Writes new[b] (T tokens, [B, T, K, Dh]) into buf[b] from slot start[b] on, per row
  (in place in a jitted loop); `slot_axis` is the buffer's slot axis."""
  perm = {3: (0, 2, 3, 1), 2: (0, 2, 1, 3), 1: (0, 1, 2, 3)}[slot_axis]
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


def write_layer(cache: KVCache, i: int, k_BTKD: Array, v_BTKD: Array) -> tuple[Array, Array]:
  """Layer i's k and v buffers with T new tokens written at each row's length."""
  ka, va = _SLOT_AXIS[cache.layout]
  return (write(cache.k[i], k_BTKD, cache.lengths, slot_axis=ka),
          write(cache.v[i], v_BTKD, cache.lengths, slot_axis=va))

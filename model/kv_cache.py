"""KV caches: fixed-shape pytrees that attention writes in place (`model.attention`).

Slot j of a row holds the token at position j, so a causal mask on positions also
hides slots not yet written; rows advance independently (ragged prompts). A cache
has a static `layout`, picked per backend by `attention.cache_layout`:
  "heads_major": k [B, K, Dh, S], v [B, K, S, Dh]: the operands the batched dots of
    attention want as stored ((batch, kv head) leading; q.k contracts Dh, p.v
    contracts S), so a decode step reads the cache in place (XLA:CPU otherwise
    transposes every layer's cache on every step);
  "seq_major": k, v [B, S, K, Dh]: what `jax.nn.dot_product_attention` takes.
A quantized cache (`quant`: "int8", "int4", "fp8"; `ModelConfig.kv_quant`) holds codes in
k / v (int4 packed two per int8 byte along Dh, so that axis has Dh / 2 entries) and one
symmetric absmax scale per (row, kv head, slot) in `k_scale` / `v_scale` ([B, K, S]
heads_major, [B, S, K] seq_major): value = code * scale. Every format's buffers are
int8: fp8 codes are kept as their e4m3 bit patterns (XLA:CPU copied a float8 buffer on
every in-place write: 64 vs 22 us per layer write, tiny preset, batch 4, 320 slots).
With `k_mean` ([B, K, Dh] per layer, `ModelConfig.attn_qk="int8"`) keys are stored minus
a per-(row, kv head) mean, set when a row is written from slot 0 (its prefill): a smaller
int8 step (SageAttention's K smoothing; softmax(q.k) is unchanged by it), and attention
adds q.mean back, so scores and log-sum-exps are q.k's up to quantization.
Nobody outside `model/` indexes cache shapes: ask `batch`, `max_len`, `n_layers`,
`kv_heads`, `head_dim`, `nbytes`.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Int

from model.config import KV_QUANTS

LAYOUTS = ("heads_major", "seq_major")
_SLOT_AXIS = {"heads_major": (3, 2), "seq_major": (1, 1)}  # (k, v) slot axis per layout
_SCALE_SLOT_AXIS = {"heads_major": 2, "seq_major": 1}  # scales [B, K, S] / [B, S, K]
_QMAX = {"int8": 127.0, "int4": 7.0, "fp8": 448.0}  # e4m3's largest finite value: 448


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class KVCache:
  """Per-layer k and v buffers and per-row filled lengths (see module docstring).

  k_scale / v_scale / k_mean: per-layer scale and key-mean buffers of a quantized cache
  (None for a float cache, and k_mean None unless keys are smoothed).
  select: a dynamic block selector (static; `sparsity.attention` builds them), called by
    attention on every read as `select(q_BTHD, k_BKSD, mask, layer) -> BlockLayout | None`
    (k_BKSD: the layer's keys as floats [B, K, S, Dh]; None: dense for this layer).
  """

  k: tuple[Array, ...]
  v: tuple[Array, ...]
  lengths: Int[Array, " B"]
  layout: str = dataclasses.field(default="heads_major", metadata=dict(static=True))
  k_scale: tuple[Array, ...] | None = None
  v_scale: tuple[Array, ...] | None = None
  k_mean: tuple[Array, ...] | None = None
  quant: str | None = dataclasses.field(default=None, metadata=dict(static=True))
  select: object = dataclasses.field(default=None, metadata=dict(static=True))

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
    return self.v[0].shape[-1] * (2 if self.quant == "int4" else 1)

  @property
  def nbytes(self) -> int:
    """Bytes stored: k and v (codes), plus scales and key means when quantized."""
    bufs = (self.k, self.v, self.k_scale, self.v_scale, self.k_mean)
    return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(bufs))

  def replace(self, **kw) -> KVCache:
    return dataclasses.replace(self, **kw)

  def with_lengths(self, lengths_B: Array) -> KVCache:
    return self.replace(lengths=jnp.asarray(lengths_B, jnp.int32))

  def positions(self, t: int) -> Int[Array, "B T"]:
    """Positions of T new tokens written from each row's length on."""
    return self.lengths[:, None] + jnp.arange(t, dtype=jnp.int32)[None]

  def with_layer(self, i: int, k: Array, v: Array, k_scale: Array | None = None,
                 v_scale: Array | None = None, k_mean: Array | None = None) -> KVCache:
    """Layer i's buffers replaced (scales and key means: those given, i.e. not None)."""
    put = lambda xs, x: (*xs[:i], x, *xs[i + 1:])
    new = dict(k=k, v=v, k_scale=k_scale, v_scale=v_scale, k_mean=k_mean)
    return self.replace(**{name: put(getattr(self, name), x) for name, x in new.items()
                           if x is not None})

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


def init_cache(cfg, batch: int, max_len: int, *, dtype=None, layout: str = "heads_major",
               select=None) -> KVCache:
  """An empty cache for `cfg` (a model.ModelConfig): zeros, lengths 0.

  select: a dynamic block selector attention calls on every read (see KVCache).
  With `cfg.kv_quant` the buffers hold codes and `dtype` (default float32) is the scales'
  and key means' dtype; otherwise `dtype` (default the compute dtype) is k's and v's.
  """
  if not isinstance(max_len, int) or max_len < 1:
    raise ValueError(f"cache max_len={max_len!r} must be a positive integer")
  if max_len > cfg.max_seq_len:
    raise ValueError(
        f"cache max_len={max_len} exceeds the model's max_seq_len={cfg.max_seq_len}")
  if layout not in LAYOUTS:
    raise ValueError(f"cache layout={layout!r}; valid: {LAYOUTS}")
  if select is not None and not callable(select):
    raise ValueError(f"cache select={select!r} must be a block selector (callable) or None")
  if select is not None and cfg.attn_qk is not None:
    raise ValueError(f"a block selector reads float scores; attn_qk={cfg.attn_qk!r} has no "
                     "block-sparse path (valid with select: attn_qk=None)")
  if cfg.attn_qk == "int8" and cfg.kv_quant != "int8":
    raise ValueError(f"attn_qk='int8' reads an int8 KV cache (int8 x int8 Q.K^T), got "
                     f"kv_quant={cfg.kv_quant!r}; valid: kv_quant='int8', or attn_qk=None")
  kh, dh, n = cfg.n_kv_heads, cfg.dh, cfg.n_layers
  quant = cfg.kv_quant
  code_dh = dh // 2 if quant == "int4" else dh
  if layout == "heads_major":
    k_shape, v_shape = (batch, kh, code_dh, max_len), (batch, kh, max_len, code_dh)
    scale_shape = (batch, kh, max_len)
  else:
    k_shape = v_shape = (batch, max_len, kh, code_dh)
    scale_shape = (batch, max_len, kh)
  zeros = lambda shape, dt: tuple(jnp.zeros(shape, dt) for _ in range(n))
  lengths = jnp.zeros((batch,), jnp.int32)
  if quant is None:
    dtype = dtype or cfg.jnp_dtype
    return KVCache(k=zeros(k_shape, dtype), v=zeros(v_shape, dtype), lengths=lengths,
                   layout=layout, select=select)
  dtype = dtype or jnp.float32
  code = jnp.int8
  k_mean = zeros((batch, kh, dh), dtype) if cfg.attn_qk == "int8" else None
  return KVCache(k=zeros(k_shape, code), v=zeros(v_shape, code), lengths=lengths,
                 layout=layout, k_scale=zeros(scale_shape, dtype),
                 v_scale=zeros(scale_shape, dtype), k_mean=k_mean, quant=quant, select=select)


def quantize(x: Float[Array, "... Dh"], fmt: str) -> tuple[Array, Float[Array, "..."]]:
  """Symmetric absmax codes of each vector along the last axis, and its f32 scale.

  scale = max|x| / qmax (qmax 127 int8, 7 int4, 448 fp8 e4m3); int codes are
  round(x / scale), int4 packed two per int8 byte (last axis halved); fp8 codes are
  x / scale rounded to e4m3. An all-zero vector gets scale 0 and codes 0.
  """
  if fmt not in KV_QUANTS:
    raise ValueError(f"KV quant format {fmt!r}; valid: {', '.join(map(repr, KV_QUANTS))}")
  x = x.astype(jnp.float32)
  scale = jnp.max(jnp.abs(x), axis=-1) / _QMAX[fmt]
  y = x / jnp.where(scale > 0, scale, 1.0)[..., None]
  if fmt == "fp8":
    return y.astype(jnp.float8_e4m3fn), scale
  qmax = _QMAX[fmt]
  c = jnp.clip(jnp.round(y), -qmax, qmax).astype(jnp.int8)
  if fmt == "int4":  # codes 2j, 2j + 1 -> the low, high nibble of byte j
    lo, hi = c[..., 0::2].astype(jnp.int32), c[..., 1::2].astype(jnp.int32)
    c = jax.lax.bitcast_convert_type(((lo & 15) | (hi << 4)).astype(jnp.uint8), jnp.int8)
  return c, scale


def codes(buf: Array, fmt: str, axis: int) -> Array:
  """The codes of a code buffer: int8, float8_e4m3fn for fp8 (from its stored bit patterns),
  int4 unpacked (`axis`, the Dh axis, doubles)."""
  if fmt == "fp8" and buf.dtype == jnp.int8:
    return jax.lax.bitcast_convert_type(buf, jnp.float8_e4m3fn)
  if fmt != "int4":
    return buf
  axis = axis % buf.ndim
  lo = jnp.right_shift(jnp.left_shift(buf, 4), 4)  # arithmetic shifts sign-extend a nibble
  hi = jnp.right_shift(buf, 4)
  shape = (*buf.shape[:axis], 2 * buf.shape[axis], *buf.shape[axis + 1:])
  return jnp.stack([lo, hi], axis=axis + 1).reshape(shape)


def dequantize(buf: Array, scale: Array, fmt: str, axis: int, dtype=jnp.float32) -> Array:
  """code * scale of a code buffer whose Dh axis is `axis` (scale lacks that axis)."""
  c = codes(buf, fmt, axis).astype(jnp.float32)
  return (c * jnp.expand_dims(scale.astype(jnp.float32), axis)).astype(dtype)


def _write_rows(buf: Array, new: Array, start_B: Array, slot_axis: int) -> Array:
  """Writes new[b] (in buf's axis order) into buf[b] from slot start[b] on."""
  if buf.shape[0] == 1:
    # XLA turns a one-row scatter into a select over the whole buffer (a full cache copy
    # per decode step); a plain dynamic_update_slice stays in place.
    idx = [0] * buf.ndim
    idx[slot_axis] = start_B[0]
    return jax.lax.dynamic_update_slice(buf, new, tuple(idx))

  def upd(buf_row, new_row, s):
    idx = [0] * (buf.ndim - 1)
    idx[slot_axis - 1] = s
    return jax.lax.dynamic_update_slice(buf_row, new_row, tuple(idx))

  return jax.vmap(upd)(buf, new, start_B)


def write(buf: Array, new_BTKD: Array, start_B: Array, *, slot_axis: int) -> Array:
  """Writes new[b] (T tokens, [B, T, K, Dh]) into buf[b] from slot start[b] on, per row
  (in place in a jitted loop); `slot_axis` is the buffer's slot axis."""
  perm = {3: (0, 2, 3, 1), 2: (0, 2, 1, 3), 1: (0, 1, 2, 3)}[slot_axis]
  return _write_rows(buf, jnp.transpose(new_BTKD, perm).astype(buf.dtype), start_B, slot_axis)


def encode(cache: KVCache, i: int, k_BTKD: Array, v_BTKD: Array) -> dict[str, Array]:
  """T new tokens as layer i of a quantized cache stores them, in token order: int8 codes
  k, v [B, T, K, Dh (int4: Dh / 2)] (fp8: e4m3 bit patterns), scales k_scale, v_scale
  [B, T, K], and k_mean [B, K, Dh] (smoothed keys: the rows' mean, taken from these tokens
  where a row is at length 0)."""
  enc = {}
  if cache.k_mean is not None:
    k_BTKD = k_BTKD.astype(jnp.float32)
    fresh_B11 = (cache.lengths == 0)[:, None, None]
    mean_BKD = jnp.where(fresh_B11, jnp.mean(k_BTKD, axis=1), cache.k_mean[i])
    enc["k_mean"] = mean_BKD.astype(cache.k_mean[i].dtype)
    k_BTKD = k_BTKD - enc["k_mean"].astype(jnp.float32)[:, None]
  enc["k"], enc["k_scale"] = quantize(k_BTKD, cache.quant)
  enc["v"], enc["v_scale"] = quantize(v_BTKD, cache.quant)
  if cache.quant == "fp8":
    for name in ("k", "v"):
      enc[name] = jax.lax.bitcast_convert_type(enc[name], jnp.int8)
  return enc


def write_layer(cache: KVCache, i: int, k_BTKD: Array, v_BTKD: Array) -> tuple[Array, ...]:
  """Layer i's buffers with T new tokens written at each row's length, for
  `cache.with_layer(i, *...)`: (k, v), and for a quantized cache (k, v, k_scale, v_scale,
  k_mean or None) with the tokens stored as `encode` gives them."""
  ka, va = _SLOT_AXIS[cache.layout]
  start = cache.lengths
  if cache.quant is None:
    return (write(cache.k[i], k_BTKD, start, slot_axis=ka),
            write(cache.v[i], v_BTKD, start, slot_axis=va))
  enc = encode(cache, i, k_BTKD, v_BTKD)
  sa = _SCALE_SLOT_AXIS[cache.layout]
  scales = []
  for name in ("k_scale", "v_scale"):
    buf, s_BTK = getattr(cache, name)[i], enc[name]
    new = jnp.swapaxes(s_BTK, 1, 2) if sa == 2 else s_BTK
    scales.append(_write_rows(buf, new.astype(buf.dtype), start, sa))
  return (write(cache.k[i], enc["k"], start, slot_axis=ka),
          write(cache.v[i], enc["v"], start, slot_axis=va), *scales, enc.get("k_mean"))

"""NMArray: an N:M compressed sparse weight leaf ("load as sparse, compute as dense").

A kernel `[in, out]` is N:M sparse along the input axis when every group of `m`
consecutive rows holds at most `n` non-zeros per output column (sparq convention:
`n` is the number kept, so 2:4 keeps half). An NMArray stores only the kept values,
`values[in * n / m, out]` (group-major: rows `g*n .. g*n+n-1` are group g's kept
rows, in ascending position), plus each kept value's position inside its group,
`ceil(log2 m)` bits rounded up to 1, 2, 4 or 8 and packed `8 // bits` per uint8 along
axis 0 (2:4: 2 bits, four per byte; 4:8: 3 bits stored in 4-bit nibbles). `values`
may itself be a `QArray` (`with_values`), so 2:4 + int4 composes: int4 codes of the
kept values plus 2-bit indices. `shape` and `dtype` are the logical (dense) ones;
Linen shape checks and `model.ops` use them, and `nbytes` counts what is stored.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Bool, Float

from model.qarray import QArray, dequantize, is_qarray

MAX_M = 256  # positions must fit an 8-bit index
INDEX_BITS = (1, 2, 4, 8)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class NMArray:
  """N:M compressed kernel. `decompress(a)` is exact for the stored values.

  values: the kept values `[shape[0] * n // m, shape[1]]`, a plain array or a QArray
    (per-tensor, per-output-channel or per-group with `group_size % n == 0`).
  indices: uint8, the in-group position of each kept value, `index_bits` bits each,
    packed `8 // index_bits` per byte along axis 0 (zero-padded to whole bytes).
  """

  values: Any
  indices: Array
  n: int = dataclasses.field(default=2, metadata=dict(static=True))
  m: int = dataclasses.field(default=4, metadata=dict(static=True))
  shape: tuple[int, ...] = dataclasses.field(default=(), metadata=dict(static=True))
  dtype: Any = dataclasses.field(default=jnp.float32, metadata=dict(static=True))

  @property
  def ndim(self) -> int:
    return len(self.shape)

  @property
  def size(self) -> int:
    """Logical number of weights (what the decompressed array holds)."""
    return int(np.prod(self.shape))

  @property
  def index_bits(self) -> int:
    return index_bits(self.m)

  @property
  def nbytes(self) -> int:
    """Bytes actually stored: values (a QArray's codes + scales) + packed index bytes."""
    v = self.values.nbytes if is_qarray(self.values) else _nbytes(self.values)
    return v + _nbytes(self.indices)

  def __repr__(self) -> str:
    v = repr(self.values) if is_qarray(self.values) else jnp.dtype(self.values.dtype).name
    return f"NMArray({self.n}:{self.m}, shape={self.shape}, values={v})"


def _nbytes(x) -> int:
  return int(np.prod(x.shape)) * jnp.dtype(x.dtype).itemsize


def is_nmarray(x) -> bool:
  """Whether `x` is an NMArray leaf."""
  return isinstance(x, NMArray)


def index_bits(m: int) -> int:
  """Bits stored per in-group position: ceil(log2 m) rounded up to 1, 2, 4 or 8."""
  need = max(1, math.ceil(math.log2(m)))
  return next(b for b in INDEX_BITS if b >= need)


def _check_nm(n, m, rows: int | None = None, where: str = "compress_nm") -> None:
  for name, v in (("m", m), ("n", n)):
    if not isinstance(v, (int, np.integer)) or isinstance(v, bool):
      raise ValueError(f"{where}: {name}={v!r} must be an int")
  if not 1 <= m <= MAX_M:
    raise ValueError(f"{where}: m={m} must be in [1, {MAX_M}] (group size; indices are 8-bit)")
  if not 1 <= n <= m:
    raise ValueError(f"{where}: n={n} must be in [1, m={m}] (n is the number kept per group)")
  if rows is not None and rows % m:
    raise ValueError(f"{where}: m={m} must divide the kernel's input axis (shape[0]={rows})")


def _check_kernel(kernel, where: str = "compress_nm") -> None:
  if is_qarray(kernel) or is_nmarray(kernel):
    raise ValueError(f"{where}: kernel={kernel!r} is already transformed; compress the float "
                     "kernel, then quantize its values (with_values)")
  shape = tuple(getattr(kernel, "shape", ()))
  if len(shape) != 2:
    raise ValueError(f"{where}: kernel must be a 2-D [in, out] array, got shape {shape}")
  if not jnp.issubdtype(kernel.dtype, jnp.floating):
    raise ValueError(f"{where}: kernel must be floating, got dtype {kernel.dtype}")


def compress_nm(kernel: Float[Array, "In Out"], n: int, m: int, *,
                mask: Bool[Array, "In Out"] | None = None) -> NMArray:
  """Compresses an N:M sparse kernel (its non-zeros, or the True entries of `mask`).

  A group with fewer than `n` kept entries stores zeros in the spare slots (at the
  lowest free positions); a group with more is a ValueError naming the first one.
  Host-side (the N:M check reads the data); not for use under `jit`.
  """
  _check_kernel(kernel)
  _check_nm(n, m, kernel.shape[0])
  if mask is not None:
    if tuple(getattr(mask, "shape", ())) != tuple(kernel.shape):
      raise ValueError(f"compress_nm: mask shape {tuple(getattr(mask, 'shape', ()))} must "
                       f"equal the kernel shape {tuple(kernel.shape)}")
    if jnp.dtype(mask.dtype) != jnp.bool_:
      raise ValueError(f"compress_nm: mask must be boolean, got dtype {mask.dtype}")
    keep = jnp.asarray(mask)
  else:
    keep = jnp.asarray(kernel) != 0
  counts = np.asarray(_group_counts(keep, m))  # [in // m, out]
  bad = np.argwhere(counts > n)
  if bad.size:
    g, o = (int(v) for v in bad[0])
    what = "mask entries" if mask is not None else "non-zeros"
    raise ValueError(f"compress_nm: kernel is not {n}:{m} sparse along the input axis: group "
                     f"{g} (rows {g * m}..{g * m + m - 1}), column {o} has {counts[g, o]} "
                     f"{what} > n={n} ({len(bad)} such (group, column) pairs)")
  values, indices = _compress(jnp.asarray(kernel), keep, n=n, m=m)
  return NMArray(values=values, indices=indices, n=int(n), m=int(m),
                 shape=tuple(int(d) for d in kernel.shape), dtype=jnp.dtype(kernel.dtype))


def abstract_compress_nm(kernel, n: int, m: int) -> NMArray:
  """The NMArray `compress_nm(kernel, n, m)` would give, as ShapeDtypeStructs (no compute)."""
  _check_kernel(kernel, "abstract_compress_nm")
  _check_nm(n, m, kernel.shape[0], "abstract_compress_nm")
  i, o = (int(d) for d in kernel.shape)
  k, per = i // m * n, 8 // index_bits(m)
  return NMArray(values=jax.ShapeDtypeStruct((k, o), kernel.dtype),
                 indices=jax.ShapeDtypeStruct((-(-k // per), o), jnp.uint8), n=int(n),
                 m=int(m), shape=(i, o), dtype=jnp.dtype(kernel.dtype))


@functools.partial(jax.jit, static_argnums=1)
def _group_counts(keep, m: int):
  i, o = keep.shape
  return jnp.sum(keep.reshape(i // m, m, o), axis=1, dtype=jnp.int32)


@functools.partial(jax.jit, static_argnames=("n", "m"))
def _compress(kernel, keep, *, n: int, m: int):
  i, o = kernel.shape
  g = i // m
  keep_GMO = keep.reshape(g, m, o)
  pos_M = jnp.arange(m, dtype=jnp.int32)[None, :, None]
  # Kept positions sort before free ones; the first n are all kept entries plus the
  # lowest free positions (zero-valued padding), then put back in ascending order.
  key = jnp.where(keep_GMO, pos_M, pos_M + m)
  idx_GNO = jnp.sort(jnp.sort(key, axis=1)[:, :n] % m, axis=1)
  w_GMO = jnp.where(keep_GMO, kernel.reshape(g, m, o), jnp.zeros((), kernel.dtype))
  values = jnp.take_along_axis(w_GMO, idx_GNO, axis=1).reshape(g * n, o)
  return values, pack_indices(idx_GNO.reshape(g * n, o), index_bits(m))


def pack_indices(idx: Array, bits: int) -> Array:
  """Packs positions in [0, 2^bits) `8 // bits` per uint8 along axis 0 (zero-padded)."""
  per = 8 // bits
  k = idx.shape[0]
  rows = -(-k // per)
  c = jnp.pad(idx.astype(jnp.int32), [(0, rows * per - k)] + [(0, 0)] * (idx.ndim - 1))
  c = c.reshape(rows, per, *idx.shape[1:])
  return sum(c[:, j] << (bits * j) for j in range(per)).astype(jnp.uint8)


def unpack_indices(a: NMArray) -> Array:
  """The in-group position of every kept value, int32 `[shape[0] * n // m, shape[1]]`."""
  bits = a.index_bits
  per, k = 8 // bits, a.shape[0] // a.m * a.n
  p = a.indices.astype(jnp.int32)
  parts = [(p >> (bits * j)) & ((1 << bits) - 1) for j in range(per)]
  return jnp.stack(parts, axis=1).reshape(-1, *p.shape[1:])[:k]


@functools.partial(jax.jit, static_argnames=("dtype",))
def decompress(a: NMArray, dtype=None) -> Array:
  """The dense `[in, out]` kernel (QArray values dequantized first); exact."""
  dtype = a.dtype if dtype is None else dtype
  i, o = a.shape
  g, n, m = i // a.m, a.n, a.m
  v = dequantize(a.values, dtype) if is_qarray(a.values) else a.values.astype(dtype)
  v_GNO = v.reshape(g, n, o)
  idx_GNO = unpack_indices(a).reshape(g, n, o)
  pos_M = jnp.arange(m, dtype=jnp.int32)[None, None, :, None]
  # A gather-free expansion: dense[g, p, o] = the slot whose index is p (or 0). The
  # indices in a group are distinct, so the sum adds one value to zeros: exact.
  hit = idx_GNO[:, :, None, :] == pos_M  # [G, N, M, O]
  dense = jnp.sum(jnp.where(hit, v_GNO[:, :, None, :], jnp.zeros((), dtype)), axis=1)
  return dense.reshape(i, o)


def with_values(a: NMArray, values) -> NMArray:
  """`a` with its kept values replaced, e.g. by a QArray of `a.values` (2:4 + int4).

  A QArray must be per-tensor, per-output-channel, or per-group along axis 0 with
  `group_size` a multiple of n (so each quantization group covers whole N:M groups,
  `group_size * m / n` dense input rows). Per-row scales are refused: a compressed
  row mixes different dense rows across columns.
  """
  if not is_nmarray(a):
    raise ValueError(f"with_values: a must be an NMArray, got {type(a).__name__}")
  want = (a.shape[0] // a.m * a.n, a.shape[1])
  got = tuple(getattr(values, "shape", ()))
  if got != want:
    raise ValueError(f"with_values: values shape {got} must equal the compressed shape {want}")
  if is_nmarray(values):
    raise ValueError("with_values: values must be a plain array or a QArray, got an NMArray")
  if jnp.dtype(values.dtype) != jnp.dtype(a.dtype):
    raise ValueError(f"with_values: values dtype {jnp.dtype(values.dtype).name} must equal the "
                     f"NMArray dtype {jnp.dtype(a.dtype).name}")
  if is_qarray(values):
    _check_qvalues(values, a.n)
  return dataclasses.replace(a, values=values)


def _check_qvalues(q: QArray, n: int) -> None:
  rows, cols = q.scale.shape
  if cols not in (1, q.shape[1]):
    raise ValueError(f"with_values: QArray scale shape {q.scale.shape} must have 1 or "
                     f"{q.shape[1]} columns")
  if q.group_size:
    if q.group_size % n:
      raise ValueError(f"with_values: QArray group_size={q.group_size} must be a multiple of "
                       f"n={n} (quantization groups must cover whole N:M groups)")
  elif rows != 1:
    raise ValueError(f"with_values: QArray scale shape {q.scale.shape} has per-row scales over "
                     "the compressed axis; use per-tensor, per-channel or per-group values")


def check(a: NMArray, where: str = "NMArray") -> NMArray:
  """Validates an NMArray's static fields against its arrays (e.g. one read from disk)."""
  _check_nm(a.n, a.m, a.shape[0] if len(a.shape) == 2 else None, where)
  if len(a.shape) != 2:
    raise ValueError(f"{where}: shape={a.shape} must be 2-D [in, out]")
  k, per = a.shape[0] // a.m * a.n, 8 // index_bits(a.m)
  vshape = tuple(a.values.shape)
  if vshape != (k, a.shape[1]):
    raise ValueError(f"{where}: values shape {vshape} must be {(k, a.shape[1])} for "
                     f"{a.n}:{a.m} of {a.shape}")
  ishape = (-(-k // per), a.shape[1])
  if tuple(a.indices.shape) != ishape or jnp.dtype(a.indices.dtype) != jnp.uint8:
    raise ValueError(f"{where}: indices {tuple(a.indices.shape)} {a.indices.dtype} must be "
                     f"uint8 {ishape}")
  if is_qarray(a.values):
    _check_qvalues(a.values, a.n)
  return a

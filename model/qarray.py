"""QArray: a quantized weight leaf that model code consumes unchanged.

A QArray stores integer (or float8) codes plus scales (same rank as the
weight) and an optional zero point. Sub-byte integer codes are packed along
axis 0 (the input axis of a `[in, out]` kernel): int4 two per int8 byte, int2
four per byte, so memory and disk hold the honest number of bytes. `shape` is
the logical (dequantized) shape; Linen shape checks and `model.ops` use it.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array

INT_BITS = (2, 4, 8)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class QArray:
  """Quantized tensor. `dequantize(q)` is exact for the stored codes.

  values: codes; int8 with `packing` codes per byte along axis 0 (int formats),
    or a float8 dtype (fp formats).
  scale: same rank as the logical shape; per-tensor / per-channel shapes
    broadcast, per-group scales have `shape[0] // group_size` rows.
  zero: optional zero point in code units (asymmetric formats), shaped like scale.
  act_bits: None for weight-only; 8 for W8A8: `model.ops.dot` quantizes the
    activations per token (dynamic symmetric int8) and multiplies int8 x int8.
  """

  values: Array
  scale: Array
  zero: Array | None = None
  shape: tuple[int, ...] = dataclasses.field(default=(), metadata=dict(static=True))
  bits: int = dataclasses.field(default=8, metadata=dict(static=True))
  fmt: str = dataclasses.field(default="int", metadata=dict(static=True))
  group_size: int | None = dataclasses.field(default=None, metadata=dict(static=True))
  dtype: Any = dataclasses.field(default=jnp.float32, metadata=dict(static=True))
  act_bits: int | None = dataclasses.field(default=None, metadata=dict(static=True))

  @property
  def packing(self) -> int:
    return 8 // self.bits if self.fmt == "int" and self.bits < 8 else 1

  @property
  def ndim(self) -> int:
    return len(self.shape)

  @property
  def size(self) -> int:
    """Logical number of weights (what the dequantized array holds)."""
    return int(np.prod(self.shape))

  @property
  def nbytes(self) -> int:
    """Bytes actually stored (codes + scales + zero points)."""
    n = _nbytes(self.values) + _nbytes(self.scale)
    return n + (_nbytes(self.zero) if self.zero is not None else 0)

  def __repr__(self) -> str:
    g = f", group={self.group_size}" if self.group_size else ""
    z = ", asym" if self.zero is not None else ""
    name = f"int{self.bits}" if self.fmt == "int" else f"fp8_{self.fmt}"
    a = f", a{self.act_bits}" if self.act_bits else ""
    return f"QArray({name}, shape={self.shape}{g}{z}{a})"


def _nbytes(x) -> int:
  return int(np.prod(x.shape)) * jnp.dtype(x.dtype).itemsize


def pack(codes: Array, bits: int) -> Array:
  """Packs signed codes in [-2^(bits-1), 2^(bits-1)) `8 // bits` per int8 along axis 0."""
  per = 8 // bits
  if per == 1:
    return codes.astype(jnp.int8)
  if codes.shape[0] % per:
    raise ValueError(f"axis 0 of length {codes.shape[0]} is not divisible by packing {per}")
  c = codes.astype(jnp.int32) & ((1 << bits) - 1)
  c = c.reshape(codes.shape[0] // per, per, *codes.shape[1:])
  packed = sum(c[:, i] << (bits * i) for i in range(per))
  return jax.lax.bitcast_convert_type(packed.astype(jnp.uint8), jnp.int8)


def unpack(values: Array, bits: int) -> Array:
  """Inverse of `pack`: int8 codes with axis 0 expanded `8 // bits` times."""
  per = 8 // bits
  if per == 1:
    return values
  v = values.astype(jnp.int32)
  # Sign-extend each field: shift it to the top of a 32-bit word, then shift back.
  parts = [(v << (32 - bits * (i + 1))) >> (32 - bits) for i in range(per)]
  out = jnp.stack(parts, axis=1)
  return out.reshape(values.shape[0] * per, *values.shape[1:]).astype(jnp.int8)


def codes(q: QArray) -> Array:
  """The unpacked codes of `q` (int8, or the float8 values)."""
  return unpack(q.values, q.bits) if q.fmt == "int" else q.values


def dequantize(q: QArray, dtype=None) -> Array:
  """Reconstructs the real-valued tensor: (codes - zero) * scale."""
  dtype = dtype or q.dtype
  c = codes(q).astype(jnp.float32)
  if q.zero is not None:
    c = c - _expand(q.zero.astype(jnp.float32), q)
  out = c * _expand(q.scale.astype(jnp.float32), q)
  return out.astype(dtype)


def _expand(s: Array, q: QArray) -> Array:
  """Repeats per-group rows of `s` so it broadcasts against the logical shape."""
  if q.group_size and s.shape[0] not in (1, q.shape[0]):
    s = jnp.repeat(s, q.group_size, axis=0)
  return s


def is_qarray(x) -> bool:
  return isinstance(x, QArray)


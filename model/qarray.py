"""QArray: a quantized weight leaf that model code consumes unchanged.

A QArray stores codes plus scales (same rank as the weight) and an optional zero
point. Formats (`fmt`, with its code width `bits`):
  int        signed integer codes, 8 / 4 / 2 bits (asymmetric: plus an int8 zero point)
  e4m3 e5m2  float8 codes, stored as the float8 array itself
  e2m3 e3m2  float6 codes (the `float6_*fn` bit patterns), four 6-bit fields in three bytes
  e2m1       float4 codes (the `float4_e2m1fn` bit pattern), two 4-bit fields per byte
  nf4        NormalFloat4 (QLoRA): the index into `NF4`, two 4-bit fields per byte
Sub-byte codes are packed along axis 0 (the input axis of a `[in, out]` kernel) into
int8 (int4 / fp4 / nf4 two per byte, int2 four per byte, fp6 four per three bytes), so
memory and disk hold the honest number of bytes. `shape` is the logical (dequantized)
shape; Linen shape checks and `model.ops` use it.
"""

from __future__ import annotations

import dataclasses
from fractions import Fraction
from typing import Any

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from jaxtyping import Array

INT_BITS = (2, 4, 8)
# fmt -> the code widths it supports.
FMT_BITS = {"int": INT_BITS, "e4m3": (8,), "e5m2": (8,), "e2m3": (6,), "e3m2": (6,),
            "e2m1": (4,), "nf4": (4,)}
# The floating formats and their ml_dtypes types (the rounding oracle of `quant.rtn`).
FLOAT_DTYPES = {"e4m3": ml_dtypes.float8_e4m3fn, "e5m2": ml_dtypes.float8_e5m2,
                "e2m3": ml_dtypes.float6_e2m3fn, "e3m2": ml_dtypes.float6_e3m2fn,
                "e2m1": ml_dtypes.float4_e2m1fn}
FP8_FMTS = ("e4m3", "e5m2")

# NormalFloat4, as printed in QLoRA (Dettmers et al. 2023, appendix E) and hard-coded in
# bitsandbytes (`functional.create_normal_map`, the CUDA `dDequantizeNF4`): quantiles of
# N(0, 1) with 8 positive and 7 negative levels plus an exact 0, normalised to [-1, 1].
# Ascending, so the stored 4-bit field is the index into this table.
NF4 = np.array([
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0], np.float32)


def _bit_pattern_values(dt, bits: int) -> np.ndarray:
  """The real value of every `bits`-wide bit pattern of a sub-byte ml_dtypes float."""
  return np.arange(2 ** bits, dtype=np.uint8).view(dt).astype(np.float32)


# fmt -> the real value of each stored field (field = bit pattern, or the NF4 index).
CODE_TABLES = {"e2m3": _bit_pattern_values(ml_dtypes.float6_e2m3fn, 6),
               "e3m2": _bit_pattern_values(ml_dtypes.float6_e3m2fn, 6),
               "e2m1": _bit_pattern_values(ml_dtypes.float4_e2m1fn, 4), "nf4": NF4}


def fmt_name(fmt: str, bits: int) -> str:
  """The recipe-style name of a format: int4, fp8_e4m3, fp6_e2m3, fp4_e2m1, nf4."""
  return {"int": f"int{bits}", "nf4": "nf4"}.get(fmt, f"fp{bits}_{fmt}")


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class QArray:
  """Quantized tensor. `dequantize(q)` is exact for the stored codes.

  values: codes; int8 holding `packing` codes per byte along axis 0 (int, fp6, fp4,
    nf4), or a float8 array (fp8).
  scale: same rank as the logical shape; per-tensor / per-channel shapes
    broadcast, per-group scales have `shape[0] // group_size` rows.
  zero: optional zero point in code units (asymmetric int formats), shaped like scale.
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
  def packing(self) -> Fraction:
    """Codes per stored byte along axis 0: 1, 2 (int4 / fp4 / nf4), 4 (int2) or 4/3 (fp6)."""
    return Fraction(1) if self.fmt in FP8_FMTS else Fraction(8, self.bits)

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
    a = f", a{self.act_bits}" if self.act_bits else ""
    return f"QArray({fmt_name(self.fmt, self.bits)}, shape={self.shape}{g}{z}{a})"


def _nbytes(x) -> int:
  return int(np.prod(x.shape)) * jnp.dtype(x.dtype).itemsize


def pack(codes: Array, bits: int) -> Array:
  """Packs `bits`-wide fields into int8 along axis 0 (little-endian within a byte / word).

  bits 2 / 4: `8 // bits` fields per byte; field i of a byte sits at bits
  [bits*i, bits*(i+1)). bits 6: four fields per 24-bit word stored as three bytes (low
  byte first), field i at word bits [6i, 6i+6). bits 8: a plain int8 cast. Codes may be
  signed (two's complement in the field) or unsigned (< 2^bits); only the low `bits`
  bits of each code are kept.
  """
  if bits == 8:
    return codes.astype(jnp.int8)
  per = 4 if bits == 6 else 8 // bits
  if codes.shape[0] % per:
    raise ValueError(f"pack: axis 0 of length {codes.shape[0]} is not divisible by {per} "
                     f"({bits}-bit fields)")
  c = codes.astype(jnp.int32) & ((1 << bits) - 1)
  c = c.reshape(codes.shape[0] // per, per, *codes.shape[1:])
  word = sum(c[:, i] << (bits * i) for i in range(per))
  if bits == 6:
    word = jnp.stack([(word >> (8 * j)) & 0xFF for j in range(3)], axis=1)
    word = word.reshape(codes.shape[0] // 4 * 3, *codes.shape[1:])
  return jax.lax.bitcast_convert_type(word.astype(jnp.uint8), jnp.int8)


def unpack(values: Array, bits: int, signed: bool = True) -> Array:
  """Inverse of `pack`: the fields, axis 0 expanded; int8 (signed) or uint8 (unsigned)."""
  if bits == 8:
    return values
  v = jax.lax.bitcast_convert_type(values, jnp.uint8).astype(jnp.int32)
  if bits == 6:
    if values.shape[0] % 3:
      raise ValueError(f"unpack: axis 0 of length {values.shape[0]} is not divisible by 3 "
                       "(6-bit fields, four per three bytes)")
    v = v.reshape(values.shape[0] // 3, 3, *values.shape[1:])
    v = v[:, 0] | (v[:, 1] << 8) | (v[:, 2] << 16)
  per = 4 if bits == 6 else 8 // bits
  if signed:
    # Sign-extend each field: shift it to the top of a 32-bit word, then shift back.
    parts = [(v << (32 - bits * (i + 1))) >> (32 - bits) for i in range(per)]
  else:
    parts = [(v >> (bits * i)) & ((1 << bits) - 1) for i in range(per)]
  out = jnp.stack(parts, axis=1).reshape(v.shape[0] * per, *v.shape[1:])
  return out.astype(jnp.int8 if signed else jnp.uint8)


def codes(q: QArray) -> Array:
  """The unpacked codes of `q`: int8 (int), the float8 array (fp8), or the real code
  values in float32 (fp6 / fp4 / nf4, decoded from their fields)."""
  if q.fmt == "int":
    return unpack(q.values, q.bits)
  if q.fmt in FP8_FMTS:
    return q.values
  fields = unpack(q.values, q.bits, signed=False).astype(jnp.int32)
  return jnp.asarray(CODE_TABLES[q.fmt])[fields]


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

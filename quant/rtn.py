"""Round-to-nearest (RTN) quantization of one tensor into a QArray.

Scales are shared along the reduction `axis` (default 0, the input axis of an
`[in, out]` kernel, giving one scale per output channel), or per group of
`group_size` rows of axis 0 (scale rows = `in // group_size`). Symmetric int
codes use `[-qmax, qmax]`; asymmetric codes use the full signed range with an
integer zero point, chosen so that 0.0 is exactly representable. float8
formats (`e4m3`, `e5m2`) scale the absmax onto the format's largest finite value.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float

from model.qarray import INT_BITS, QArray, pack

FP_DTYPES = {"e4m3": jnp.float8_e4m3fn, "e5m2": jnp.float8_e5m2}
FMTS = ("int", *FP_DTYPES)

Axis = int | Sequence[int] | None


def quantize_tensor(w: Float[Array, "..."], *, bits: int = 8, fmt: str = "int",
                    group_size: int | None = None, symmetric: bool = True,
                    axis: Axis = 0) -> QArray:
  """Quantizes `w` with round-to-nearest; `axis` is the axis (or axes) a scale is shared along.

  Args:
    w: a floating tensor (a 2-D `[in, out]` kernel for model weights).
    bits: 8, 4 or 2 for `fmt="int"` (4 and 2 are packed along axis 0); 8 for float8.
    fmt: "int", "e4m3" or "e5m2".
    group_size: rows of axis 0 sharing one scale (per-group); requires `axis=0`.
    symmetric: False adds an int8 zero point (int formats only).
    axis: reduction axis / axes of the scale; 0 = per output channel for a kernel,
      None = per tensor.
  """
  axes = _check_args(w.shape, w.dtype, bits, fmt, group_size, symmetric, axis)
  return _quantize(w, bits=bits, fmt=fmt, group_size=group_size, symmetric=symmetric,
                   axes=axes)


def _check_args(shape, dtype, bits, fmt, group_size, symmetric, axis) -> tuple[int, ...]:
  """Validates user arguments before any compute; returns the normalised reduction axes."""
  if not jnp.issubdtype(dtype, jnp.floating):
    raise ValueError(f"quantize_tensor: w must be floating, got dtype {dtype}")
  if len(shape) < 1:
    raise ValueError("quantize_tensor: w must have rank >= 1, got a scalar")
  if fmt not in FMTS:
    raise ValueError(f"quantize_tensor: fmt={fmt!r}; valid: {FMTS}")
  if fmt == "int" and bits not in INT_BITS:
    raise ValueError(f"quantize_tensor: bits={bits!r} for fmt='int'; valid: {INT_BITS}")
  if fmt != "int" and bits != 8:
    raise ValueError(f"quantize_tensor: bits={bits!r} for fmt={fmt!r}; valid: 8")
  if fmt != "int" and not symmetric:
    raise ValueError(f"quantize_tensor: symmetric=False needs fmt='int', got fmt={fmt!r}")
  ndim = len(shape)
  if axis is None:
    axes = tuple(range(ndim))
  else:
    axes = (axis,) if isinstance(axis, int) else tuple(axis)
    if not axes or any(not -ndim <= a < ndim for a in axes):
      raise ValueError(f"quantize_tensor: axis={axis!r} out of range for rank {ndim}")
    axes = tuple(sorted({a % ndim for a in axes}))
  if group_size is not None:
    if not isinstance(group_size, int) or group_size < 1:
      raise ValueError(f"quantize_tensor: group_size={group_size!r} must be a positive int")
    if axes != (0,):
      raise ValueError(f"quantize_tensor: group_size needs axis=0 (groups run along axis 0), "
                       f"got axis={axis!r}")
    if shape[0] % group_size:
      raise ValueError(f"quantize_tensor: group_size={group_size} must divide axis 0 of "
                       f"shape {tuple(shape)}")
  per = 8 // bits if fmt == "int" else 1
  if shape[0] % per:
    raise ValueError(f"quantize_tensor: int{bits} packs {per} codes per byte along axis 0, "
                     f"so axis 0 of shape {tuple(shape)} must be divisible by {per}")
  return axes


@functools.partial(jax.jit, static_argnames=("bits", "fmt", "group_size", "symmetric", "axes"))
def _quantize(w, *, bits, fmt, group_size, symmetric, axes) -> QArray:
  shape = tuple(w.shape)
  w32 = w.astype(jnp.float32)
  if group_size:  # [in, ...] -> [G, g, ...]; reduce over g.
    w32 = w32.reshape(shape[0] // group_size, group_size, *shape[1:])
    axes = (1,)
  if fmt != "int":
    values, scale, zero = _fp_codes(w32, axes, FP_DTYPES[fmt])
  elif symmetric:
    values, scale, zero = _sym_codes(w32, axes, bits)
  else:
    values, scale, zero = _asym_codes(w32, axes, bits)
  if group_size:
    values = values.reshape(shape)
    scale = scale.reshape(shape[0] // group_size, *shape[1:])
    zero = None if zero is None else zero.reshape(scale.shape)
  if fmt == "int":
    values = pack(values, bits)
  return QArray(values=values, scale=scale, zero=zero, shape=shape, bits=bits, fmt=fmt,
                group_size=group_size, dtype=w.dtype)


def _safe_scale(span, levels):
  # A constant-zero slice gets scale 1 (its codes are 0, so it dequantizes exactly);
  # tiny spans are floored at the smallest normal f32 so w / scale never overflows.
  tiny = jnp.finfo(jnp.float32).tiny
  return jnp.where(span > 0, jnp.maximum(span / levels, tiny), 1.0)


def _sym_codes(w, axes, bits):
  qmax = 2 ** (bits - 1) - 1
  scale = _safe_scale(jnp.max(jnp.abs(w), axis=axes, keepdims=True), qmax)
  values = jnp.clip(jnp.round(w / scale), -qmax, qmax).astype(jnp.int8)
  return values, scale, None


def _asym_codes(w, axes, bits):
  qmin, qmax = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
  lo = jnp.minimum(jnp.min(w, axis=axes, keepdims=True), 0.0)
  hi = jnp.maximum(jnp.max(w, axis=axes, keepdims=True), 0.0)
  scale = _safe_scale(hi - lo, qmax - qmin)
  # lo <= 0 <= hi keeps the zero point inside [qmin, qmax], so it is stored as int8.
  zero = jnp.clip(qmin - jnp.round(lo / scale), qmin, qmax)
  values = jnp.clip(jnp.round(w / scale) + zero, qmin, qmax).astype(jnp.int8)
  return values, scale, zero.astype(jnp.int8)


def _fp_codes(w, axes, fp_dtype):
  fmax = float(jnp.finfo(fp_dtype).max)
  scale = _safe_scale(jnp.max(jnp.abs(w), axis=axes, keepdims=True), fmax)
  values = jnp.clip(w / scale, -fmax, fmax).astype(fp_dtype)
  return values, scale, None


def symmetric_scale(w: Float[Array, "In Out"], bits: int) -> Float[Array, "1 Out"]:
  """Per-output-channel symmetric int scale of a kernel (absmax / qmax), as `quantize_tensor`."""
  _check_args(w.shape, w.dtype, bits, "int", None, True, 0)
  qmax = 2 ** (bits - 1) - 1
  return _safe_scale(jnp.max(jnp.abs(w.astype(jnp.float32)), axis=0, keepdims=True), qmax)


def fake_quantize_row(scale_O: Float[Array, " Out"], row_O: Float[Array, " Out"], index,
                      bits: int) -> Float[Array, " Out"]:
  """One kernel row rounded onto the symmetric grid `scale * k`, |k| <= 2^(bits-1) - 1."""
  del index
  qmax = 2 ** (bits - 1) - 1
  return jnp.clip(jnp.round(row_O / scale_O), -qmax, qmax) * scale_O


def on_grid(w: Float[Array, "In Out"], scale: Float[Array, "1 Out"], bits: int) -> QArray:
  """The QArray of a kernel whose values already lie on the grid `scale * k` (exact codes).

  For solvers that quantize while they update (joint SparseGPT + int, GPTQ with fixed
  per-channel scales): re-deriving the scale from the result would move the grid.
  """
  qmax = 2 ** (bits - 1) - 1
  codes = jnp.clip(jnp.round(w.astype(jnp.float32) / scale), -qmax, qmax).astype(jnp.int8)
  return QArray(values=pack(codes, bits), scale=scale, zero=None, shape=tuple(w.shape),
                bits=bits, fmt="int", group_size=None, dtype=w.dtype)

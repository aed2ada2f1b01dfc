"""Round-to-nearest (RTN) quantization of one tensor into a QArray.

Scales are shared along the reduction `axis` (default 0, the input axis of an
`[in, out]` kernel, giving one scale per output channel), or per group of
`group_size` rows of axis 0 (scale rows = `in // group_size`).

Formats (`model.qarray.FMT_BITS`): symmetric int codes use `[-qmax, qmax]`;
asymmetric int codes use the full signed range with an integer zero point, chosen
so that 0.0 is exactly representable. Floating formats (fp8 `e4m3` / `e5m2`, fp6
`e2m3` / `e3m2`, fp4 `e2m1`) map the range onto the format's largest finite value
and round to nearest even, as the ml_dtypes cast does; `nf4` maps it onto 1.0 and
takes the nearest NormalFloat4 level. Only int formats have an asymmetric variant.

Clipping (`clip`) picks the range per scale slice: "absmax" (max |w|, or [min, max]
for asym), "pP" (the P-th percentile of |w|; asym: the (100-P)-th and P-th
percentiles of w), or "mse" (the shrink `f * absmax`, f from `MSE_GRID`, minimising
the slice's squared error; the first best wins, so a tie keeps absmax). Values beyond
the range saturate at the largest code.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import ml_dtypes
from jaxtyping import Array, Float

from model.qarray import CODE_TABLES, FLOAT_DTYPES, FMT_BITS, FP8_FMTS, NF4, QArray, fmt_name, pack
from model.tree import NonFiniteError, first_nonfinite

FMTS = tuple(FMT_BITS)
# "mse" clipping: shrink factors f = 1 - i/100, i = 0..79 (1.00 down to 0.21), tried in order.
MSE_GRID = tuple(1.0 - i / 100 for i in range(80))
CLIPS = ("absmax", "mse", "pP (0 < P <= 100, e.g. p99.9)")

Axis = int | Sequence[int] | None


def quantize_tensor(w: Float[Array, "..."], *, bits: int | None = None, fmt: str = "int",
                    group_size: int | None = None, symmetric: bool = True, axis: Axis = 0,
                    clip: str = "absmax") -> QArray:
  """Quantizes `w` with round-to-nearest; `axis` is the axis (or axes) a scale is shared along.

  Args:
    w: a floating tensor (a 2-D `[in, out]` kernel for model weights), finite.
    bits: the code width, one of `FMT_BITS[fmt]`: 8, 4 or 2 for "int" (4 and 2 packed
      along axis 0); 8 for fp8, 6 for fp6, 4 for fp4 / nf4. None: the format's widest.
    fmt: "int", "e4m3" / "e5m2" (fp8), "e2m3" / "e3m2" (fp6), "e2m1" (fp4) or "nf4".
    group_size: rows of axis 0 sharing one scale (per-group); requires `axis=0`.
    symmetric: False adds an int8 zero point (int formats only).
    axis: reduction axis / axes of the scale; 0 = per output channel for a kernel,
      None = per tensor.
    clip: the range of each scale slice: "absmax", "mse" or "pP" (module docstring).
  """
  if isinstance(w, QArray):
    raise ValueError(f"quantize_tensor: w is already quantized ({w!r}); pass the float "
                     "array (dequantize it first to requantize)")
  if not (hasattr(w, "shape") and hasattr(w, "dtype")):
    raise ValueError(f"quantize_tensor: w must be an array, got {type(w).__name__}")
  axes = _check_args(w.shape, w.dtype, bits, fmt, group_size, symmetric, axis, clip)
  bad = first_nonfinite(w)  # None for a Tracer: jitted callers are not checked
  if bad is not None:  # NaN / Inf would round to code 0 without a trace
    raise NonFiniteError(f"quantize_tensor: w contains NaN or Inf ({bad[1]} non-finite "
                         f"value(s) of {bad[2]}); refusing to quantize it")
  bits = FMT_BITS[fmt][-1] if bits is None else bits
  return _quantize(w, bits=bits, fmt=fmt, group_size=group_size, symmetric=symmetric,
                   axes=axes, clip=clip)


def _check_args(shape, dtype, bits, fmt, group_size, symmetric, axis,
                clip="absmax") -> tuple[int, ...]:
  """Validates user arguments before any compute; returns the normalised reduction axes."""
  if not jnp.issubdtype(dtype, jnp.floating):
    raise ValueError(f"quantize_tensor: w must be floating, got dtype {dtype}")
  if len(shape) < 1:
    raise ValueError("quantize_tensor: w must have rank >= 1, got a scalar")
  if not isinstance(fmt, str) or fmt not in FMTS:
    raise ValueError(f"quantize_tensor: fmt={fmt!r}; valid: {FMTS}")
  if bits is None:
    bits = FMT_BITS[fmt][-1]
  if isinstance(bits, bool) or not isinstance(bits, int) or bits not in FMT_BITS[fmt]:
    raise ValueError(f"quantize_tensor: bits={bits!r} for fmt={fmt!r}; valid: {FMT_BITS[fmt]}")
  if fmt != "int" and not symmetric:
    raise ValueError(f"quantize_tensor: symmetric=False needs fmt='int', got fmt={fmt!r}")
  _percentile(clip)
  ndim = len(shape)
  if axis is None:
    axes = tuple(range(ndim))
  else:
    axes = (axis,) if isinstance(axis, int) else tuple(axis)
    if not axes or any(not -ndim <= a < ndim for a in axes):
      raise ValueError(f"quantize_tensor: axis={axis!r} out of range for rank {ndim}")
    axes = tuple(sorted({a % ndim for a in axes}))
  if group_size is not None:
    if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 1:
      raise ValueError(f"quantize_tensor: group_size={group_size!r} must be a positive int")
    if axes != (0,):
      raise ValueError(f"quantize_tensor: group_size needs axis=0 (groups run along axis 0), "
                       f"got axis={axis!r}")
    if shape[0] % group_size:
      raise ValueError(f"quantize_tensor: group_size={group_size} must divide axis 0 of "
                       f"shape {tuple(shape)}")
  per, layout = {2: (4, "4 codes per byte"), 4: (2, "2 codes per byte"),
                 6: (4, "4 codes into 3 bytes")}.get(bits, (1, ""))
  if shape[0] % per:
    raise ValueError(f"quantize_tensor: {fmt_name(fmt, bits)} packs {layout} along axis 0, "
                     f"so axis 0 of shape {tuple(shape)} must be divisible by {per}")
  return axes


def _percentile(clip) -> float | None:
  """P of a "pP" clip (None for "absmax" / "mse"); raises on anything else."""
  if clip in ("absmax", "mse"):
    return None
  m = re.fullmatch(r"p(\d+(?:\.\d*)?)", clip) if isinstance(clip, str) else None
  if m is None or not 0.0 < float(m.group(1)) <= 100.0:
    raise ValueError(f"quantize_tensor: clip={clip!r}; valid: {list(CLIPS)}")
  return float(m.group(1))


@functools.partial(jax.jit, static_argnames=("bits", "fmt", "group_size", "symmetric", "axes",
                                             "clip"))
def _quantize(w, *, bits, fmt, group_size, symmetric, axes, clip) -> QArray:
  shape = tuple(w.shape)
  w32 = w.astype(jnp.float32)
  if group_size:  # [in, ...] -> [G, g, ...]; reduce over g.
    w32 = w32.reshape(shape[0] // group_size, group_size, *shape[1:])
    axes = (1,)
  grid = functools.partial(_on_grid, fmt=fmt, bits=bits)
  lo, hi = _clip_range(w32, axes, clip, symmetric, grid)
  c, scale, zero = grid(w32, lo, hi)
  if group_size:
    c = c.reshape(shape)
    scale = scale.reshape(shape[0] // group_size, *shape[1:])
    zero = None if zero is None else zero.reshape(scale.shape)
  values, zero = _store(c, zero, fmt, bits)
  return QArray(values=values, scale=scale, zero=zero, shape=shape, bits=bits, fmt=fmt,
                group_size=group_size, dtype=w.dtype)


def _top(fmt, bits) -> float:
  """The largest code magnitude the range maps onto."""
  if fmt == "int":
    return float(2 ** (bits - 1) - 1)
  return 1.0 if fmt == "nf4" else float(ml_dtypes.finfo(FLOAT_DTYPES[fmt]).max)


def _safe_scale(span, levels):
  # A constant-zero slice gets scale 1 (its codes are 0, so it dequantizes exactly);
  # tiny spans are floored at the smallest normal f32 so w / scale never overflows.
  tiny = jnp.finfo(jnp.float32).tiny
  return jnp.where(span > 0, jnp.maximum(span / levels, tiny), 1.0)


def _on_grid(w, lo, hi, *, fmt, bits):
  """(code values in f32, scale, zero) for the range [lo, hi]; lo None: symmetric [-hi, hi]."""
  if lo is not None:  # asymmetric int
    qmin, qmax = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    scale = _safe_scale(hi - lo, qmax - qmin)
    # lo <= 0 <= hi keeps the zero point inside [qmin, qmax], so it is stored as int8.
    zero = jnp.clip(qmin - jnp.round(lo / scale), qmin, qmax)
    return jnp.clip(jnp.round(w / scale) + zero, qmin, qmax), scale, zero
  top = _top(fmt, bits)
  scale = _safe_scale(hi, top)
  v = jnp.clip(w / scale, -top, top)
  if fmt == "int":
    c = jnp.round(v)
  elif fmt in FP8_FMTS:
    c = v.astype(FLOAT_DTYPES[fmt]).astype(jnp.float32)
  elif fmt == "nf4":
    c = _nearest_nf4(v)
  else:
    c = _round_fp(v, FLOAT_DTYPES[fmt])
  return c, scale, None


def _round_fp(v, dt):
  """Rounds v (|v| <= max of `dt`) to nearest even on the grid of float `dt`, exactly as the
  ml_dtypes cast does; by hand because XLA cannot lower float6 converts on every backend."""
  fi = ml_dtypes.finfo(dt)
  _, e = jnp.frexp(v)  # v = m * 2^e with 0.5 <= |m| < 1: the binade's exponent is e - 1
  k = jnp.maximum(e - 1, fi.minexp) - fi.nmant  # log2 of the grid step (subnormals: fixed)
  return jnp.ldexp(jnp.round(jnp.ldexp(v, -k)), k)  # power-of-two scalings are exact


def _nearest_nf4(v):
  """The NF4 level nearest to v in [-1, 1]; a tie goes to the lower level (lower index)."""
  t = jnp.asarray(NF4)
  i = jnp.clip(jnp.searchsorted(t, v, side="left"), 1, len(NF4) - 1)  # t[i-1] < v <= t[i]
  below, above = t[i - 1], t[i]
  return jnp.where(v - below <= above - v, below, above)


def _clip_range(w, axes, clip, symmetric, grid):
  """(lo, hi) of each scale slice (lo None: symmetric, hi the magnitude) under `clip`."""
  p = _percentile(clip)
  if p is not None:
    if symmetric:
      return None, jnp.percentile(jnp.abs(w), p, axis=axes, keepdims=True)
    lo = jnp.percentile(w, 100.0 - p, axis=axes, keepdims=True)
    hi = jnp.percentile(w, p, axis=axes, keepdims=True)
    return jnp.minimum(lo, 0.0), jnp.maximum(hi, 0.0)
  if symmetric:
    lo, hi = None, jnp.max(jnp.abs(w), axis=axes, keepdims=True)
  else:
    lo = jnp.minimum(jnp.min(w, axis=axes, keepdims=True), 0.0)
    hi = jnp.maximum(jnp.max(w, axis=axes, keepdims=True), 0.0)
  return _mse_range(w, lo, hi, axes, grid) if clip == "mse" else (lo, hi)


def _mse_range(w, lo, hi, axes, grid):
  """Shrinks the absmax range by the f of `MSE_GRID` with the least squared error per slice."""
  fs = jnp.asarray(MSE_GRID, jnp.float32)

  def sq_err(f):
    c, scale, zero = grid(w, None if lo is None else f * lo, f * hi)
    d = w - _dequant(c, scale, zero)
    return jnp.sum(d * d, axis=axes, keepdims=True)

  def body(i, best):  # strict <: the first (largest) f wins a tie
    err, f = best
    e = sq_err(fs[i])
    return jnp.where(e < err, e, err), jnp.where(e < err, fs[i], f)

  # One grid point per iteration keeps a few copies of w live, not len(MSE_GRID).
  _, f = jax.lax.fori_loop(1, len(MSE_GRID), body, (sq_err(fs[0]), jnp.ones_like(hi)))
  return (None if lo is None else f * lo), f * hi


def _dequant(c, scale, zero):
  """(c - zero) * scale, as `model.qarray.dequantize` computes it from the stored codes."""
  return (c if zero is None else c - zero) * scale


def _store(c, zero, fmt, bits):
  """(stored values, stored zero) for code values `c` on the format's grid."""
  if fmt == "int":
    return pack(c.astype(jnp.int8), bits), None if zero is None else zero.astype(jnp.int8)
  if fmt in FP8_FMTS:
    return c.astype(FLOAT_DTYPES[fmt]), None
  if fmt == "nf4":
    return pack(jnp.searchsorted(jnp.asarray(NF4), c), bits), None
  # fp4 / fp6 bit pattern: sign bit on top of the magnitude's index among the non-negative
  # values, which the first half of the patterns enumerate in increasing order.
  mags = jnp.asarray(CODE_TABLES[fmt][: 2 ** (bits - 1)])
  fields = jnp.searchsorted(mags, jnp.abs(c)) | (jnp.signbit(c).astype(jnp.int32) << (bits - 1))
  return pack(fields, bits), None


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

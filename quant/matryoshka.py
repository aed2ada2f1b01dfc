"""Matryoshka quantization (MatQuant): int4 / int2 are the most significant bits of one int8 code.

Nair et al., "Matryoshka Quantization" (arXiv 2502.06786). One c = 8-bit code per weight
from per-output-channel asymmetric MinMax quantization (eq. 1 of the paper):

  alpha = (max(w) - min(w)) / (2^c - 1),  z = -min(w) / alpha,
  q^c   = clamp(round(w / alpha + z), 0, 2^c - 1)

and the r-bit model is sliced from its r most significant bits with rounding (eq. 6):

  S(q^c, r) = clamp(round(q^c / 2^(c-r)), 0, 2^r - 1) * 2^(c-r),   w_r = (S(q^c, r) - z) * alpha.

Choices of this implementation: the range is widened to include 0 (min <= 0 <= max)
and z is rounded to an integer, as `quant.rtn`'s asymmetric codes, so that 0.0 is
exact and z lies in [0, 2^c - 1]; round is round-half-to-even (`jnp.round`). The
r-bit weights become an ordinary r-bit QArray (signed codes S / 2^(c-r) - 2^(r-1),
packed, scale alpha * 2^(c-r), f32 zero z / 2^(c-r) - 2^(r-1)); every factor is a power
of two, so `dequantize` of it is bit for bit `(S - z) * alpha`.

Training (`fake_quant_sliced`) uses the straight-through estimator of `quant.qat`;
the multi-bit loss (sum over bit widths of the LM loss) lives in `scripts.qat_lib`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float

from model.qarray import QArray, pack
from model.tree import check_finite, is_weight_leaf
from quant.qat import _map_paths, straight_through
from quant.rtn import _safe_scale
from quant.transform import plan

C = 8  # bits of the shared code
BITS = (8, 4, 2)  # the nested widths a QArray can hold (packed along axis 0)


def _check_bits(bits, name: str = "bits") -> int:
  if isinstance(bits, bool) or bits not in BITS:
    raise ValueError(f"matryoshka: {name}={bits!r}; valid: {list(BITS)}")
  return bits


def _check_kernel(w) -> None:
  if is_weight_leaf(w) or not hasattr(w, "shape") or not jnp.issubdtype(w.dtype, jnp.floating):
    raise ValueError(f"matryoshka: expected a float [in, out] kernel, got {w!r}")
  if len(w.shape) != 2 or w.shape[0] % 4:
    raise ValueError(f"matryoshka: kernel shape {tuple(w.shape)} must be 2-D [in, out] with in "
                     "divisible by 4 (int2 packs 4 codes per byte along axis 0)")


def int8_codes(w: Float[Array, "In Out"]) -> tuple[Array, Array, Array]:
  """(q^8 in [0, 255] as f32, alpha [1, Out], z [1, Out] integer-valued f32): MinMax per channel."""
  w32 = w.astype(jnp.float32)
  lo = jnp.minimum(jnp.min(w32, axis=0, keepdims=True), 0.0)
  hi = jnp.maximum(jnp.max(w32, axis=0, keepdims=True), 0.0)
  levels = 2 ** C - 1
  alpha = _safe_scale(hi - lo, levels)
  z = jnp.clip(jnp.round(-lo / alpha), 0, levels)
  q = jnp.clip(jnp.round(w32 / alpha + z), 0, levels)
  return q, alpha, z


def slice_codes(q8: Array, bits: int) -> Array:
  """S(q^8, r): the r most significant bits of the 8-bit codes, rounded, back on the 8-bit grid."""
  _check_bits(bits)
  step = 2 ** (C - bits)
  return jnp.clip(jnp.round(q8 / step), 0, 2 ** bits - 1) * step


def sliced_weight(w: Float[Array, "In Out"], bits: int) -> Float[Array, "In Out"]:
  """(S(q^8(w), r) - z) * alpha in w's dtype: the r-bit Matryoshka weight (no gradient)."""
  _check_bits(bits)
  q, alpha, z = int8_codes(w)
  return ((slice_codes(q, bits) - z) * alpha).astype(w.dtype)


def fake_quant_sliced(w: Float[Array, "In Out"], bits: int) -> Float[Array, "In Out"]:
  """`sliced_weight` forward with the straight-through gradient (MinMax: w is never clipped)."""
  _check_bits(bits)
  w0 = jax.lax.stop_gradient(w)
  lo = jnp.broadcast_to(jnp.min(w0, axis=0, keepdims=True), w.shape)
  hi = jnp.broadcast_to(jnp.max(w0, axis=0, keepdims=True), w.shape)
  return straight_through(w, sliced_weight(w0, bits), lo, hi)


def quantize_kernel(w: Float[Array, "In Out"], bits: int) -> QArray:
  """The r-bit Matryoshka kernel as a packed QArray (what the model consumes)."""
  _check_bits(bits)
  _check_kernel(w)
  q, alpha, z = int8_codes(w)
  step, half = 2 ** (C - bits), 2 ** (bits - 1)
  codes = (slice_codes(q, bits) / step - half).astype(jnp.int8)
  return QArray(values=pack(codes, bits), scale=alpha * step, zero=z / step - half,
                shape=tuple(w.shape), bits=bits, fmt="int", group_size=None, dtype=w.dtype)


def matryoshka_plan(params, *, rules=()) -> tuple[str, ...]:
  """The kernel paths Matryoshka quantizes: PTQ's selection (`quant.transform.plan`) for int2.

  rules: `(regex, spec)` as for PTQ; a None spec keeps a kernel float, any other spec
  selects it (the bit width comes from the caller).
  """
  paths, specs, leaves = plan(params, "int2", rules=rules)
  out = []
  for path, s, leaf in zip(paths, specs, leaves, strict=True):
    if s is not None:
      _check_kernel(leaf)
      out.append(path)
  return tuple(out)


def matryoshka_quantize(params, bits: int, *, rules=()) -> dict:
  """Params with the selected kernels as r-bit QArrays sliced from their shared int8 code."""
  _check_bits(bits)
  paths = matryoshka_plan(params, rules=rules)
  check_finite(params, "matryoshka_quantize: params")  # NaN / Inf would become silent codes
  return _map_paths(params, {p: (lambda w: quantize_kernel(w, bits)) for p in paths})


def fake_quant_params(params, bits: int, paths: tuple[str, ...]) -> dict:
  """Params with the kernels at `paths` replaced by their r-bit sliced weights (STE)."""
  _check_bits(bits)
  return _map_paths(params, {p: (lambda w: fake_quant_sliced(w, bits)) for p in paths})

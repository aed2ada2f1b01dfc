"""The one dispatch point for weight use.

Every matmul against a parameter goes through `dot` (or `einsum`). A weight
may be a plain array, a `model.qarray.QArray`, or a `model.nm_array.NMArray` (N:M
compressed, its values plain or a QArray). This module is the only place that may
call a low-bit Pallas kernel.

NMArray ("load as sparse, compute as dense"): on CPU the kernel is expanded to its
dense `[in, out]` form (values dequantized at their compressed size, then placed by
their packed in-group indices) and enters an ordinary dot; that dense copy is the only
one. Accelerators would take a sparse kernel here instead (2:4 sparse tensor cores
consume the compressed values and 2-bit indices directly).
"""

from __future__ import annotations

import jax.numpy as jnp
from jaxtyping import Array, Float

from model.nm_array import NMArray
from model.nm_array import decompress as decompress_nm
from model.qarray import QArray, codes, dequantize
from pallas_kernels import api as kernels


def dot(x: Float[Array, "... In"], w, *, impl: str = "xla", dtype=None) -> Float[Array, "... Out"]:
  """x[..., in] @ w[in, out] with f32 accumulation, result in `dtype` (default x.dtype)."""
  dtype = dtype or x.dtype
  if isinstance(w, QArray):
    return _qdot(x, w, impl=impl, dtype=dtype)
  if isinstance(w, NMArray):
    w = decompress_nm(w, dtype)  # see the module docstring: dense on CPU
  x = x.astype(dtype)
  y = jnp.matmul(x, w.astype(dtype), preferred_element_type=jnp.float32)
  return y.astype(dtype)


def einsum(eq: str, x: Array, w, *, dtype=None) -> Array:
  """Einsum against a weight (QArray leaves dequantized, NMArray leaves decompressed first)."""
  dtype = dtype or x.dtype
  if isinstance(w, QArray):
    w = dequantize(w, dtype)
  elif isinstance(w, NMArray):
    w = decompress_nm(w, dtype)
  return jnp.einsum(eq, x.astype(dtype), w.astype(dtype),
                    preferred_element_type=jnp.float32).astype(dtype)


def _qdot(x: Float[Array, "... In"], w: QArray, *, impl: str, dtype) -> Float[Array, "... Out"]:
  """x @ w for a QArray (per-channel: codes enter the dot, scales hit the f32 accumulator)."""
  x = x.astype(dtype)
  if w.ndim != 2:
    return jnp.matmul(x, dequantize(w, dtype), preferred_element_type=jnp.float32).astype(dtype)
  per_channel = not w.group_size and w.scale.shape[0] == 1  # scale [1, N] or [1, 1]
  if impl == "pallas" and w.fmt == "int" and w.bits == 8 and w.zero is None and per_channel:
    lead, n = x.shape[:-1], w.shape[1]
    scale_1N = jnp.broadcast_to(w.scale, (1, n))
    y = kernels.int8_matmul(x.reshape(-1, x.shape[-1]), w.values, scale_1N)
    return y.reshape(*lead, n).astype(dtype)
  if per_channel:
    # Codes (|int| <= 128, or float8 values) are exact in bf16 / f16 / f32.
    c_KN = codes(w).astype(dtype)
    # Integer codes enter the dot directly; the per-output-channel scale (and the
    # zero point, through the row sums of x) is applied to the f32 accumulator,
    # so no dequantized copy of W is formed.
    acc = jnp.matmul(x, c_KN, preferred_element_type=jnp.float32)
    if w.zero is not None:
      x_sum = jnp.sum(x, axis=-1, keepdims=True, dtype=jnp.float32)
      acc = acc - x_sum * w.zero.astype(jnp.float32).reshape(-1)
    return (acc * w.scale.astype(jnp.float32).reshape(-1)).astype(dtype)
  # Per-group scales vary along the contraction axis, so they cannot be pulled out of
  # the dot. Partial dots per group scaled in f32 were 1.3-3x slower than this fused
  # dequantize-then-dot on the 2-core CPU (K=N=1024, g=128, M=1..512); accelerators
  # take the low-bit Pallas kernels instead.
  return jnp.matmul(x, dequantize(w, dtype), preferred_element_type=jnp.float32).astype(dtype)


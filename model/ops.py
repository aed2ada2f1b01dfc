"""The one dispatch point for weight use.

Every matmul against a parameter goes through `dot` (or `einsum`). A weight
may be a plain array, or a `quant.QArray`; sparse formats plug in here later.
This module is the only place that may call a low-bit Pallas kernel.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float

from quant.qarray import QArray, codes, dequantize


def dot(x: Float[Array, "... In"], w, *, impl: str = "xla", dtype=None) -> Float[Array, "... Out"]:
  """x[..., in] @ w[in, out] with f32 accumulation, result in `dtype` (default x.dtype)."""
  dtype = dtype or x.dtype
  if isinstance(w, QArray):
    return _qdot(x, w, impl=impl, dtype=dtype)
  x = x.astype(dtype)
  y = jnp.matmul(x, w.astype(dtype), preferred_element_type=jnp.float32)
  return y.astype(dtype)


def einsum(eq: str, x: Array, w, *, dtype=None) -> Array:
  """Einsum against a weight (QArray leaves are dequantized first)."""
  dtype = dtype or x.dtype
  if isinstance(w, QArray):
    w = dequantize(w, dtype)
  return jnp.einsum(eq, x.astype(dtype), w.astype(dtype),
                    preferred_element_type=jnp.float32).astype(dtype)


def _qdot(x: Array, w: QArray, *, impl: str, dtype) -> Array:
  if impl == "pallas" and w.fmt == "int" and w.bits == 8 and w.zero is None and w.ndim == 2:
    from pallas_kernels import api  # imported lazily: kernels are optional on CPU

    lead = x.shape[:-1]
    y = api.int8_matmul(x.reshape(-1, x.shape[-1]).astype(dtype), w.values, w.scale)
    return y.reshape(*lead, w.shape[1]).astype(dtype)
  per_channel = w.zero is None and not w.group_size and w.scale.shape[0] == 1
  if per_channel:
    # Integer codes enter the dot directly; the per-output-channel scale is
    # applied to the f32 accumulator, so no dequantized copy of W is needed.
    acc = jnp.matmul(x.astype(dtype), codes(w).astype(dtype),
                     preferred_element_type=jnp.float32)
    return (acc * w.scale.astype(jnp.float32).reshape(-1)).astype(dtype)
  return jnp.matmul(x.astype(dtype), dequantize(w, dtype),
                    preferred_element_type=jnp.float32).astype(dtype)


def param_shape(w) -> tuple[int, ...]:
  """Logical shape of a weight leaf (plain array or QArray)."""
  return tuple(w.shape)


def is_weight_leaf(x) -> bool:
  return isinstance(x, (QArray, jax.Array)) or hasattr(x, "shape")

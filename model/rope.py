"""Rotary position embeddings (HF Llama "rotate half" layout) with optional scaling."""

from __future__ import annotations

import math

import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float, Int

from model.config import RopeScaling


def inv_frequencies(head_dim: int, theta: float, scaling: RopeScaling | None) -> np.ndarray:
  """Per-pair inverse frequencies, f32[Dh/2], with Llama-3 or linear scaling applied."""
  inv = 1.0 / (theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim))
  if scaling is None:
    return inv.astype(np.float32)
  if scaling.type == "linear":
    return (inv / scaling.factor).astype(np.float32)
  # llama3: long wavelengths are divided by `factor`, short ones kept, and the
  # band in between interpolated smoothly.
  old = scaling.original_max_position_embeddings
  low_wavelen = old / scaling.low_freq_factor
  high_wavelen = old / scaling.high_freq_factor
  wavelen = 2 * math.pi / inv
  scaled = np.where(wavelen > low_wavelen, inv / scaling.factor, inv)
  smooth = (old / wavelen - scaling.low_freq_factor) / (
      scaling.high_freq_factor - scaling.low_freq_factor)
  smoothed = (1 - smooth) * scaled / scaling.factor + smooth * scaled
  medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
  return np.where(medium, smoothed, scaled).astype(np.float32)


def apply_rope(x_BTHD: Float[Array, "B T H Dh"], positions_BT: Int[Array, "B T"], *,
               theta: float, scaling: RopeScaling | None = None) -> Float[Array, "B T H Dh"]:
  """Rotates pairs (i, i + Dh/2) of every head by position * frequency."""
  dh = x_BTHD.shape[-1]
  inv = jnp.asarray(inv_frequencies(dh, theta, scaling))
  angles_BTd = positions_BT[..., None].astype(jnp.float32) * inv
  cos = jnp.cos(angles_BTd)[:, :, None, :]
  sin = jnp.sin(angles_BTd)[:, :, None, :]
  x = x_BTHD.astype(jnp.float32)
  x1, x2 = x[..., : dh // 2], x[..., dh // 2 :]
  out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
  return out.astype(x_BTHD.dtype)

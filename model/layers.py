"""Small Linen layers; every weight use goes through `model.ops`."""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from model import ops


def weight(module: nn.Module, name: str, init, shape: tuple[int, ...], dtype):
  """Fetches a weight leaf, accepting transformed leaves (QArray, sparse) in apply.

  Linen's `self.param` compares the stored leaf's first pytree leaf with the
  initializer's shape, which a packed QArray (codes [in/2, out]) would fail.
  When the param already exists we read it directly and check its *logical*
  shape instead, so plain arrays and every QArray format pass the same check.
  """
  if module.has_variable("params", name):
    w = module.get_variable("params", name)
    if tuple(w.shape) != tuple(shape):
      raise ValueError(
          f"param {'/'.join(module.scope.path)}/{name} has shape {tuple(w.shape)}, "
          f"the model config expects {tuple(shape)}")
    return w
  return module.param(name, init, shape, dtype)


class Dense(nn.Module):
  """y = x @ kernel (+ bias) with kernel [in, out]."""

  features: int
  use_bias: bool = False
  impl: str = "xla"
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32
  kernel_init: Any = nn.initializers.lecun_normal()

  @nn.compact
  def __call__(self, x):
    kernel = weight(self, "kernel", self.kernel_init, (x.shape[-1], self.features),
                    self.param_dtype)
    y = ops.dot(x, kernel, impl=self.impl, dtype=self.dtype)
    if self.use_bias:
      bias = self.param("bias", nn.initializers.zeros, (self.features,), self.param_dtype)
      y = y + bias.astype(self.dtype)
    return y


class RMSNorm(nn.Module):
  """RMS normalisation in f32 with a learned scale (HF Llama numerics)."""

  eps: float = 1e-5
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    scale = self.param("scale", nn.initializers.ones, (x.shape[-1],), self.param_dtype)
    x32 = x.astype(jnp.float32)
    x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
    return (scale.astype(jnp.float32) * x32).astype(self.dtype)


class Embed(nn.Module):
  """Token embedding [V, D]; `attend` gives tied-head logits x @ E^T."""

  vocab_size: int
  features: int
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  def setup(self):
    self.embedding = self.param("embedding",
                                nn.initializers.normal(stddev=self.features ** -0.5),
                                (self.vocab_size, self.features), self.param_dtype)

  def __call__(self, tokens):
    return jnp.take(self.embedding, tokens, axis=0).astype(self.dtype)

  def attend(self, x):
    return ops.einsum("...d,vd->...v", x, self.embedding, dtype=self.dtype)

"""Masked optax wrapper: pruned weights stay exactly zero while fine-tuning.

In the spirit of jaxpruner's `wrap_optax`. The masks live in the optimizer
state, so they checkpoint (orbax) and shard with it. In the state a dense leaf
(mask None) is stored as a boolean scalar True: the state tree then has one
array per param, with no None holes, and the scalar costs one byte.

Gradients are masked before the inner optimizer (pruned entries leave Adam's
moments and a global-norm clip untouched) and updates after it. For pruned
entries the update is `-param` (or 0 without params), so after any step,
with any learning rate or weight decay, they are exactly zero, even if the
params were not masked before the first step.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax


class MaskedState(NamedTuple):
  """State of `masked`: the inner optimizer's state plus the masks it enforces."""

  inner_state: Any
  masks: Any


def state_masks(params, masks):
  """Params-structured booleans: the mask for pruned leaves, scalar True for dense ones."""

  def one(p, m):
    if m is None:
      return jnp.ones((), jnp.bool_)
    if tuple(m.shape) != tuple(p.shape):
      raise ValueError(f"mask shape {tuple(m.shape)} does not match param shape "
                       f"{tuple(p.shape)}")
    return jnp.asarray(m, jnp.bool_)

  return jax.tree.map(one, params, masks)


def _mask(updates, masks, params):
  def one(u, m, p):
    if m.ndim == 0:  # dense leaf (static under jit)
      return u
    fill = jnp.zeros((), u.dtype) if p is None else -p.astype(u.dtype)
    return jnp.where(m, u, fill)

  if params is None:
    return jax.tree.map(lambda u, m: one(u, m, None), updates, masks)
  return jax.tree.map(one, updates, masks, params)


def masked(inner: optax.GradientTransformation, masks) -> optax.GradientTransformationExtraArgs:
  """Wraps `inner` so entries where `masks` is False never move from zero.

  Args:
    inner: any optax transformation (e.g. `optax.adamw(...)`, a chain with clipping).
    masks: a mask tree (bool arrays, True = keep; None = dense leaf), e.g. from
      `sparsity.prune_with_masks`. It is copied into the state at `init`.

  Unlike `optax.masked` (which selects params an optimizer applies to), this
  keeps masked-out weights at zero.
  """
  inner = optax.with_extra_args_support(inner)

  def init(params):
    return MaskedState(inner.init(params), state_masks(params, masks))

  def update(updates, state, params=None, **extra_args):
    updates = _mask(updates, state.masks, None)
    updates, inner_state = inner.update(updates, state.inner_state, params, **extra_args)
    return _mask(updates, state.masks, params), MaskedState(inner_state, state.masks)

  return optax.GradientTransformationExtraArgs(init, update)


def masks_from_state(opt_state):
  """The mask tree (None = dense leaf) held by the first `MaskedState` in `opt_state`."""
  found = [s for s in jax.tree.leaves(opt_state, is_leaf=lambda x: isinstance(x, MaskedState))
           if isinstance(s, MaskedState)]
  if not found:
    raise ValueError("opt_state holds no sparsity.MaskedState (was the optimizer `masked`?)")
  return jax.tree.map(lambda m: None if m.ndim == 0 else m, found[0].masks)

"""PDP: parameter-free differentiable pruning (Cho et al. 2023) as a loss wrapper.

The loss sees soft-masked weights w * m(w), with per tensor

  m(w) = sigmoid((w^2 - t) / (tau * mean(w^2))),

where t is the target-sparsity quantile of w^2: halfway between the k-th and the
(k+1)-th smallest w^2, k = `masks.n_pruned(sparsity, n)`, so exactly k entries
have m < 1/2. t and the scale are held constant in the backward pass
(stop_gradient); gradients flow to every weight through w * m(w), pushing the
weights near the threshold to one side of it. `tau` is relative to the tensor's
mean w^2 (smaller: closer to a hard mask). No parameters are added: after
training, `harden` keeps the top-(1 - sparsity) |w| of each tensor (the entries
with m >= 1/2), giving exact sparsity.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import jax
import jax.numpy as jnp

from sparsity import masks as masks_lib
from sparsity import rules as rules_lib


def _check_tau(tau) -> float:
  if isinstance(tau, bool) or not isinstance(tau, (int, float)) or not 0 < tau < math.inf:
    raise ValueError(f"tau={tau!r} must be a finite number > 0")
  return float(tau)


def soft_mask(w: jax.Array, sparsity: float, *, tau: float) -> jax.Array:
  """The PDP soft mask of one tensor (float32, same shape; < 1/2 at the pruned entries)."""
  sparsity = rules_lib.check_sparsity(sparsity)
  tau = _check_tau(tau)
  w2 = jnp.square(w.astype(jnp.float32))
  k = masks_lib.n_pruned(sparsity, w2.size)
  if k == 0:
    return jnp.ones(w2.shape, jnp.float32)
  ranked = jnp.sort(jax.lax.stop_gradient(w2).reshape(-1))
  t = (ranked[k - 1] + ranked[k]) / 2
  scale = tau * jnp.maximum(jnp.mean(ranked), jnp.finfo(jnp.float32).tiny)
  return jax.nn.sigmoid((w2 - t) / scale)


def soft_masked_params(params, sparsity: float, *, tau: float, rules: rules_lib.Rules = ()):
  """`params` with every prunable leaf (the pruning rules) replaced by w * m(w)."""
  paths, leaves, treedef, target, _ = masks_lib.plan(params, sparsity, rules)
  out = [w if target[p] is None else (w * soft_mask(w, target[p], tau=tau)).astype(w.dtype)
         for p, w in zip(paths, leaves, strict=True)]
  return jax.tree_util.tree_unflatten(treedef, out)


def pdp_loss(loss_fn: Callable, *, sparsity: float, tau: float = 0.1,
             rules: rules_lib.Rules = ()) -> Callable:
  """Wraps `loss_fn(model_cfg, params, batch) -> (loss, metrics)` to see soft-masked params."""
  sparsity = rules_lib.check_sparsity(sparsity)
  tau = _check_tau(tau)
  rules = tuple(rules)

  def wrapped(model_cfg, params, batch):
    return loss_fn(model_cfg, soft_masked_params(params, sparsity, tau=tau, rules=rules), batch)

  return wrapped


def harden(params, sparsity: float, *, rules: rules_lib.Rules = ()):
  """(params with the smallest-|w| fraction of each prunable tensor zeroed, their masks)."""
  masks = masks_lib.magnitude_masks(params, sparsity, rules=rules)
  return masks_lib.apply_masks(params, masks), masks


def soft_density(params, sparsity: float, *, tau: float, rules: rules_lib.Rules = ()) -> float:
  """Mean soft-mask value over the prunable entries (-> 1 - sparsity as masks harden)."""
  paths, leaves, _, target, _ = masks_lib.plan(params, sparsity, rules)
  total, mass = 0, 0.0
  for p, w in zip(paths, leaves, strict=True):
    if target[p] is not None:
      mass += float(jnp.sum(soft_mask(w, target[p], tau=tau)))
      total += w.size
  return mass / total if total else 1.0


"""Polarization-regularized neuron gates (Zhuang et al. 2020): one-pass structured pruning.

Every FFN neuron j of layer i gets a gate g_ij in [0, 1] (a `neuron_gates` subtree
next to the model's params) that scales its output: the `down` kernel's row j is
multiplied by g_ij, so the gated model is an ordinary model. Training adds

  R(g) = t * ||g||_1 - ||g - mean(g)||_1          (per layer, averaged over neurons)

to the loss: the L1 term pushes gates down, the polarization term pushes them
away from their mean, so gates split into a group near 0 and a group near 1
instead of all shrinking together. At the end `harden` folds the gates into the
down kernels (exact) and keeps, in every layer, the `F - n_pruned(sparsity, F)`
neurons with the largest gates; `structured.shrink` then slices them out.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from model.config import ModelConfig
from sparsity import structured
from sparsity.masks import n_pruned
from sparsity.rules import check_sparsity

GATES = "neuron_gates"


def init_gates(cfg: ModelConfig, value: float = 1.0) -> dict:
  """{"layers_i": f32[F]} gates, all `value` (1: the gated model equals the ungated one)."""
  return {f"layers_{i}": jnp.full((cfg.ffn_dim,), value, jnp.float32)
          for i in range(cfg.n_layers)}


def with_gates(cfg: ModelConfig, params) -> dict:
  """`params` plus a fresh `neuron_gates` subtree."""
  if GATES in params:
    raise ValueError(f"params already hold a {GATES!r} subtree")
  return {**params, GATES: init_gates(cfg)}


def _split(params) -> tuple[dict, dict]:
  if GATES not in params:
    raise ValueError(f"params hold no {GATES!r} subtree (use polarization.with_gates)")
  rest = {k: v for k, v in params.items() if k != GATES}
  return rest, params[GATES]


def clip_gates(gates):
  return jax.tree.map(lambda g: jnp.clip(g, 0.0, 1.0), gates)


def fold(params) -> dict:
  """The model params with each layer's gates multiplied into its `down` kernel rows."""
  rest, gates = _split(params)
  out = dict(rest)
  for name, g in clip_gates(gates).items():
    layer = dict(out[name])
    mlp = dict(layer["mlp"])
    down = dict(mlp["down"])
    down["kernel"] = down["kernel"] * g[:, None].astype(down["kernel"].dtype)
    mlp["down"], layer["mlp"] = down, mlp
    out[name] = layer
  return out


def regularizer(gates, t: float) -> jax.Array:
  """Mean over layers of t * mean|g| - mean|g - mean(g)| on gates clipped to [0, 1]."""
  terms = [t * jnp.mean(jnp.abs(g)) - jnp.mean(jnp.abs(g - jnp.mean(g)))
           for g in jax.tree.leaves(clip_gates(gates))]
  return jnp.mean(jnp.stack(terms))


def _check(strength, t) -> None:
  if not (isinstance(strength, (int, float)) and strength >= 0):
    raise ValueError(f"polarization strength={strength!r} must be a number >= 0")
  if not (isinstance(t, (int, float)) and t > 0):
    raise ValueError(f"polarization t={t!r} must be a number > 0 (larger prunes more)")


def polarization_loss(loss_fn: Callable, *, strength: float = 1e-2, t: float = 1.0) -> Callable:
  """A `(model_cfg, params, batch) -> (loss, metrics)` with gates folded in and R(g) added."""
  _check(strength, t)

  def loss(model_cfg, params, batch):
    base, metrics = loss_fn(model_cfg, fold(params), batch)
    reg = regularizer(params[GATES], t)
    g = jnp.concatenate([x.reshape(-1) for x in jax.tree.leaves(clip_gates(params[GATES]))])
    return base + strength * reg, {**metrics, "polarization": reg,
                                   "gates_below_0.1": jnp.mean(g < 0.1)}

  return loss


def harden(cfg: ModelConfig, params, sparsity: float) -> tuple[ModelConfig, dict, dict]:
  """(smaller cfg, shrunk params, report): per layer the largest-gate neurons are kept."""
  check_sparsity(sparsity, "sparsity")
  folded = fold(params)
  gates = clip_gates(params[GATES])
  f = cfg.ffn_dim
  k = f - n_pruned(sparsity, f)
  if k < 1:
    raise ValueError(f"sparsity={sparsity} would remove every one of the {f} neurons")
  keep = []
  for i in range(cfg.n_layers):
    g = np.asarray(gates[f"layers_{i}"])
    order = np.argsort(-g, kind="stable")  # ties: the lower index is kept
    keep.append(structured.LayerKeep(np.sort(order[:k]).astype(np.int32),
                                     np.arange(cfg.n_heads, dtype=np.int32),
                                     np.arange(cfg.n_kv_heads, dtype=np.int32)))
  small_cfg, small = structured.shrink(cfg, folded, tuple(keep))
  g_all = np.concatenate([np.asarray(x) for x in jax.tree.leaves(gates)])
  report = dict(method="polarization", sparsity=sparsity, ffn_dim_before=f, ffn_dim_after=k,
                gates_below_0_1=float(np.mean(g_all < 0.1)),
                gates_above_0_9=float(np.mean(g_all > 0.9)))
  return small_cfg, small, report

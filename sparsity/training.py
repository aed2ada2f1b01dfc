"""Training-time sparsity as optax wrappers: gradual magnitude and movement pruning.

Every method (here and in `sparsity.dst`: SET, RigL, GraNet) wraps an optax
transformation like `sparsity.masked` and keeps its masks, an update counter, a
PRNG key and (movement) score accumulators in a `SparseTrainState`, so they
checkpoint with the optimizer state and a resumed run is bit-exact. The state
holds a `sparsity.MaskedState`, so `sparsity.masks_from_state(opt_state)` returns
the current masks.

Each `update(grads, state, params)` (grads dense, as the trainer passes them):
  1. the masked step: grads are masked, the inner optimizer runs, and pruned
     entries get update -param (they are exactly 0 afterwards);
  2. at a scheduled step (`lax.cond`, fixed shapes, jit-safe) the masks change,
     scored on the post-step weights w + u and the dense grads; the inner state's
     params-shaped leaves (Adam moments, momentum) are zeroed wherever a mask
     entry changed, and the update is re-masked: newly pruned entries end at 0 and
     newly grown ones stay at 0 (they were pruned, so their update was -0).
`step` in schedules is the update count before the update (0 first).

Prune counts are exact and static (`sparsity.train_plan`): at each scheduled step a
leaf of n entries at sparsity s has `masks.n_pruned(s, n)` pruned entries (global
scope: the pooled leaves together). Ties rank by flat index (stable sort), lower
pruned first.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from sparsity import optim, schedules
from sparsity import rules as rules_lib
from sparsity.train_plan import Spec, TrainPlan, check_spec, make_plan


class SparseTrainState(NamedTuple):
  """State of a training-time sparsity wrapper (all arrays: checkpointable as they are)."""

  masked: optim.MaskedState  # the inner optimizer's state and the current masks
  count: jax.Array  # int32: updates done so far
  key: jax.Array  # uint32 raw PRNG key data (random regrowth)
  scores: Any  # movement scores (params-structured; scalar 0 for dense leaves) or scalar 0


def select_lowest(score: jax.Array, k) -> jax.Array:
  """True at the `k` (traced) lowest entries of `score`; ties go to the lower flat index."""
  flat = score.reshape(-1)
  order = jnp.argsort(flat, stable=True)
  sel = jnp.zeros(flat.shape, jnp.bool_).at[order].set(jnp.arange(flat.size) < k)
  return sel.reshape(score.shape)


def prune_to(lay: TrainPlan, scores: list, row) -> list:
  """Masks keeping all but the lowest scores: row[i] per leaf, row[-1] over the pooled leaves."""
  out = [None] * len(scores)
  pooled = [i for i, g in enumerate(lay.pooled) if g]
  for i, s in enumerate(scores):
    if not lay.pooled[i]:
      out[i] = ~select_lowest(s, row[i])
  if pooled:
    flat = jnp.concatenate([scores[i].reshape(-1) for i in pooled])
    keep = ~select_lowest(flat, row[-1])
    start = 0
    for i in pooled:
      out[i] = keep[start:start + scores[i].size].reshape(scores[i].shape)
      start += scores[i].size
  return out


def magnitude_score(masks: list, weights: list) -> list:
  """|w| with already-pruned entries at -inf (pruned first, so they stay pruned)."""
  return [jnp.where(m, jnp.abs(w).astype(jnp.float32), -jnp.inf)
          for m, w in zip(masks, weights, strict=True)]


class Context(NamedTuple):
  """What a mask-update rule sees (lists over the prunable leaves)."""

  masks: list  # current masks
  weights: list  # post-step weights w + u
  grads: list  # dense grads
  scores: list | None  # movement scores
  key: jax.Array  # a fresh PRNG key
  count: jax.Array  # the step (update count before this update)
  row: jax.Array  # the scheduled prune counts at this step


UpdateRule = Callable[[Spec, TrainPlan, Context], list]


def _full(lay: TrainPlan, prunable_leaves: list, fill):
  leaves = [fill] * len(lay.shapes)
  for i, x in zip(lay.prunable, prunable_leaves, strict=True):
    leaves[i] = x
  return jax.tree_util.tree_unflatten(lay.treedef, leaves)


def _pick(lay: TrainPlan, tree) -> list:
  leaves = lay.treedef.flatten_up_to(tree)
  return [leaves[i] for i in lay.prunable]


def initial_masks(spec: Spec, lay: TrainPlan, params, key: jax.Array) -> list:
  """The masks at init: lowest |w| (or random, per leaf) at the initial sparsity."""
  leaves = _pick(lay, params)
  if spec.init == "random":  # layerwise, whatever the scope
    return [~select_lowest(jax.random.uniform(jax.random.fold_in(key, j), w.shape), k)
            for j, (w, k) in enumerate(zip(leaves, lay.init_row, strict=False))]
  return prune_to(lay, [jnp.abs(w).astype(jnp.float32) for w in leaves], lay.init_row)


def sparse_training(inner: optax.GradientTransformation, spec: Spec,
                    rule: UpdateRule) -> optax.GradientTransformationExtraArgs:
  """The wrapper behind every method: `rule` computes new masks at scheduled steps."""
  inner = optax.with_extra_args_support(inner)
  base = optim.masked(inner, masks=None)  # its update reads the masks from the state
  movement_scores = spec.name == "movement"

  def init(params):
    lay = make_plan(spec, params)
    init_key, key = jax.random.split(jax.random.key(spec.seed))
    masks = _full(lay, initial_masks(spec, lay, params, init_key), None)
    scores = (_full(lay, [jnp.zeros(w.shape, jnp.float32) for w in _pick(lay, params)],
                    jnp.zeros((), jnp.float32)) if movement_scores else jnp.zeros((), jnp.float32))
    return SparseTrainState(optim.MaskedState(inner.init(params), optim.state_masks(params, masks)),
                            jnp.zeros([], jnp.int32), jax.random.key_data(key), scores)

  def update(updates, state, params=None, **extra_args):
    if params is None:
      raise ValueError(f"sparsity method {spec.name!r} needs params in update(...)")
    lay = make_plan(spec, params)
    scores = state.scores
    if movement_scores:  # S += -w * g (dense grads, pre-step weights)
      moved = [s - w.astype(jnp.float32) * g.astype(jnp.float32) for s, w, g in
               zip(_pick(lay, scores), _pick(lay, params), _pick(lay, updates), strict=True)]
      scores = _full(lay, moved, jnp.zeros((), jnp.float32))
    u, masked_state = base.update(updates, state.masked, params, **extra_args)
    on = schedules.is_update_step(state.count, begin_step=spec.begin_step,
                                  end_step=spec.end_step, every=spec.every)

    def change(operand):
      u, masked_state, raw_key = operand
      key, use = jax.random.split(jax.random.wrap_key_data(raw_key))
      j = jnp.clip((state.count - spec.begin_step) // spec.every, 0, len(lay.table) - 1)
      old = _pick(lay, masked_state.masks)
      uu, pp = _pick(lay, u), _pick(lay, params)
      ctx = Context(old, [w + d for w, d in zip(pp, uu, strict=True)], _pick(lay, updates),
                    _pick(lay, scores) if movement_scores else None, use, state.count,
                    jnp.asarray(lay.table)[j])
      new = rule(spec, lay, ctx)
      changed = _full(lay, [a != b for a, b in zip(old, new, strict=True)],
                      jnp.zeros((), jnp.bool_))
      inner_state = optax.tree_map_params(
          inner, lambda x, c: jnp.where(c, jnp.zeros((), x.dtype), x),
          masked_state.inner_state, changed)
      uu = [jnp.where(m, d, -w.astype(d.dtype)) for m, d, w in zip(new, uu, pp, strict=True)]
      leaves = lay.treedef.flatten_up_to(u)
      for i, d in zip(lay.prunable, uu, strict=True):
        leaves[i] = d
      masks = _full(lay, new, jnp.ones((), jnp.bool_))
      masked_state = optim.MaskedState(inner_state, masks)
      return jax.tree_util.tree_unflatten(lay.treedef, leaves), masked_state, \
          jax.random.key_data(key)

    u, masked_state, raw_key = jax.lax.cond(on, change, lambda o: o,
                                            (u, masked_state, state.key))
    return u, SparseTrainState(masked_state, optax.safe_int32_increment(state.count), raw_key,
                               scores)

  return optax.GradientTransformationExtraArgs(init, update)


def _gradual_rule(spec: Spec, lay: TrainPlan, ctx: Context) -> list:
  return prune_to(lay, magnitude_score(ctx.masks, ctx.weights), ctx.row)


def _movement_rule(spec: Spec, lay: TrainPlan, ctx: Context) -> list:
  return prune_to(lay, ctx.scores, ctx.row)


def gradual_magnitude(inner: optax.GradientTransformation, *, target: float, end_step: int,
                      initial: float = 0.0, begin_step: int = 0, every: int = 1,
                      power: float = 3.0, scope: str = "layerwise",
                      distribution: str = "uniform", rules: rules_lib.Rules = ()
                      ) -> optax.GradientTransformationExtraArgs:
  """Gradual magnitude pruning (Zhu & Gupta): |w| masks on the polynomial schedule.

  Masks start at `initial` sparsity (smallest |w| of the initial params) and, at
  steps begin_step, begin_step + every, ..., end_step, shrink to exactly the
  scheduled sparsity (`schedules.polynomial_sparsity`); pruned weights stay pruned.
  scope="global" ranks all default-prunable leaves together; distribution="erk"
  (layerwise) spreads each scheduled sparsity over layers by ERK.
  """
  spec = check_spec(Spec("gradual", target, initial, begin_step, end_step, every, power, scope,
                         distribution, rules=tuple(rules)))
  return sparse_training(inner, spec, _gradual_rule)


def movement(inner: optax.GradientTransformation, *, target: float, end_step: int,
             initial: float = 0.0, begin_step: int = 0, every: int = 1, power: float = 3.0,
             scope: str = "layerwise", rules: rules_lib.Rules = ()
             ) -> optax.GradientTransformationExtraArgs:
  """Movement pruning (Sanh et al. 2020): keep the top scores S = sum_t -w_t * g_t.

  Scores accumulate every step in the state; at the schedule's steps the masks
  become the top-(1 - s_t) of S (pruned weights are 0, so their scores freeze; one
  may regrow, from 0, if others fall below it).
  """
  spec = check_spec(Spec("movement", target, initial, begin_step, end_step, every, power,
                         scope, rules=tuple(rules)))
  return sparse_training(inner, spec, _movement_rule)


def sparse_state(opt_state) -> SparseTrainState:
  """The first `SparseTrainState` in `opt_state` (ValueError if there is none)."""
  found = [s for s in jax.tree.leaves(opt_state, is_leaf=lambda x: isinstance(x, SparseTrainState))
           if isinstance(s, SparseTrainState)]
  if not found:
    raise ValueError("opt_state holds no sparsity.training.SparseTrainState")
  return found[0]


def training_masks(opt_state):
  """The current mask tree (None = dense leaf) of a training-time sparsity state."""
  return optim.masks_from_state(sparse_state(opt_state).masked)

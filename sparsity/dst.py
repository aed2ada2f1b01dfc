"""Dynamic sparse training as optax wrappers: SET, RigL and GraNet.

All three drop and regrow connections at scheduled steps, inside the optimizer
update (`sparsity.training.sparse_training`: masks, counter and PRNG key live in
the optimizer state, so runs checkpoint and resume exactly):

  SET (Mocanu et al. 2018)   drop the smallest |w| active fraction, regrow as many
                             uniformly at random among the inactive positions;
  RigL (Evci et al. 2020)    regrow where the dense gradient |g| is largest;
  GraNet (Liu et al. 2021)   first prune by |w| to the gradual (polynomial)
                             schedule's sparsity, then drop-and-regrow by |g|.

The drop fraction decays on `schedules.cosine_drop_fraction` until `end_step`. A
leaf with n_a active entries drops k = round(f * n_a) of them and regrows exactly
k (among all positions inactive after the drop, so a dropped one may come straight
back), so SET and RigL keep every layer's sparsity exactly constant. Regrown
weights start at exactly 0 and their inner optimizer moments are reset to 0
(those of dropped entries too). Initial masks are random at each layer's sparsity
from the `distribution` ("erk" or "uniform").
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from sparsity import rules as rules_lib
from sparsity import schedules
from sparsity import training as tr


def drop_and_regrow(mask: jax.Array, weight: jax.Array, grow_score: jax.Array,
                    fraction) -> jax.Array:
  """Drops round(fraction * active) smallest-|w| active entries, regrows as many top scores."""
  n_active = jnp.sum(mask, dtype=jnp.int32)
  k = jnp.floor(fraction * n_active.astype(jnp.float32) + 0.5).astype(jnp.int32)
  drop = tr.select_lowest(jnp.where(mask, jnp.abs(weight).astype(jnp.float32), jnp.inf), k)
  kept = mask & ~drop
  grow = tr.select_lowest(jnp.where(kept, jnp.inf, -grow_score.astype(jnp.float32)), k)
  return kept | grow


def _fraction(spec: tr.Spec, ctx: tr.Context):
  return schedules.cosine_drop_fraction(ctx.count, initial=spec.drop_fraction,
                                        end_step=max(spec.end_step, 1))


def _set_rule(spec: tr.Spec, lay: tr.TrainPlan, ctx: tr.Context) -> list:
  f = _fraction(spec, ctx)
  return [drop_and_regrow(m, w, jax.random.uniform(jax.random.fold_in(ctx.key, i), m.shape), f)
          for i, (m, w) in enumerate(zip(ctx.masks, ctx.weights, strict=True))]


def _rigl_rule(spec: tr.Spec, lay: tr.TrainPlan, ctx: tr.Context) -> list:
  f = _fraction(spec, ctx)
  return [drop_and_regrow(m, w, jnp.abs(g), f)
          for m, w, g in zip(ctx.masks, ctx.weights, ctx.grads, strict=True)]


def _granet_rule(spec: tr.Spec, lay: tr.TrainPlan, ctx: tr.Context) -> list:
  pruned = tr.prune_to(lay, tr.magnitude_score(ctx.masks, ctx.weights), ctx.row)
  return _rigl_rule(spec, lay, ctx._replace(masks=pruned))


def _dst(name: str, rule, inner, *, sparsity: float, update_every: int, end_step: int,
         drop_fraction: float, begin_step: int, seed: int, distribution: str,
         rules: rules_lib.Rules):
  spec = tr.check_spec(tr.Spec(
      name, sparsity, sparsity, begin_step, end_step, update_every, distribution=distribution,
      drop_fraction=drop_fraction, seed=seed, rules=tuple(rules), init="random",
      scheduled=False))
  return tr.sparse_training(inner, spec, rule)


def set_training(inner: optax.GradientTransformation, *, sparsity: float, update_every: int,
                 end_step: int, drop_fraction: float = 0.3, begin_step: int = 0, seed: int = 0,
                 distribution: str = "erk", rules: rules_lib.Rules = ()
                 ) -> optax.GradientTransformationExtraArgs:
  """SET: constant sparsity; every `update_every` steps until `end_step`, magnitude drop and
  random regrowth (drop fraction cosine-decayed from `drop_fraction`)."""
  return _dst("set", _set_rule, inner, sparsity=sparsity, update_every=update_every,
              end_step=end_step, drop_fraction=drop_fraction, begin_step=begin_step, seed=seed,
              distribution=distribution, rules=rules)


def rigl(inner: optax.GradientTransformation, *, sparsity: float, update_every: int,
         end_step: int, drop_fraction: float = 0.3, begin_step: int = 0, seed: int = 0,
         distribution: str = "erk", rules: rules_lib.Rules = ()
         ) -> optax.GradientTransformationExtraArgs:
  """RigL: like `set_training`, but regrowth by the largest dense-gradient magnitude."""
  return _dst("rigl", _rigl_rule, inner, sparsity=sparsity, update_every=update_every,
              end_step=end_step, drop_fraction=drop_fraction, begin_step=begin_step, seed=seed,
              distribution=distribution, rules=rules)


def granet(inner: optax.GradientTransformation, *, target: float, end_step: int,
           initial: float = 0.0, begin_step: int = 0, every: int = 1, power: float = 3.0,
           drop_fraction: float = 0.3, scope: str = "layerwise", distribution: str = "uniform",
           seed: int = 0, rules: rules_lib.Rules = ()) -> optax.GradientTransformationExtraArgs:
  """GraNet: gradual magnitude pruning from `initial` (random masks) to `target`, with
  RigL-style gradient regrowth of a cosine-decaying fraction at every pruning step."""
  spec = tr.check_spec(tr.Spec(
      "granet", target, initial, begin_step, end_step, every, power, scope, distribution,
      drop_fraction, seed, tuple(rules), init="random"))
  return tr.sparse_training(inner, spec, _granet_rule)

"""Pruning recipes: `METHOD:ARG[:ARG...]` strings, one registry, one transform.

  prune(params, "magnitude:0.5")          # per-tensor |w|, 50% of each kernel
  prune(params, "magnitude_global:0.5")   # one |w| threshold over all kernels
  prune(params, "random:0.5", key=key)    # seeded random baseline

A method registers a `PruneMethod`: a parser turning the recipe's arguments
into keyword arguments (validated before any compute) and a function
`fn(params, *, rules, calib, key, **kwargs) -> (params, masks)`, so methods that
update the kept weights (SparseGPT) fit the same slot as mask-only ones.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

from sparsity import masks as masks_lib
from sparsity import rules as rules_lib
from sparsity.report import sparsity_report


@dataclasses.dataclass(frozen=True)
class PruneMethod:
  """A registry entry: `parse(args) -> kwargs`, then `fn(params, ..., **kwargs)`."""

  fn: Callable[..., tuple[Any, Any]]
  parse: Callable[[tuple[str, ...], str], dict]
  usage: str
  needs_key: bool = False
  needs_calib: bool = False


PRUNE_METHODS: dict[str, PruneMethod] = {}


def register(name: str, method: PruneMethod) -> None:
  """Adds a method to the recipe registry (later issues: wanda, sparsegpt, ...)."""
  if name in PRUNE_METHODS:
    raise ValueError(f"pruning method {name!r} is already registered")
  PRUNE_METHODS[name] = method


def parse_sparsity(value: str, recipe: str) -> float:
  """A recipe's SPARSITY argument as a float in [0, 1)."""
  try:
    s = float(value)
  except ValueError:
    raise ValueError(f"sparsity {value!r} in recipe {recipe!r} is not a number; "
                     "valid range [0, 1)") from None
  return rules_lib.check_sparsity(s, f"sparsity in recipe {recipe!r}")


def parse_recipe(recipe: str) -> tuple[str, dict]:
  """'magnitude:0.5' -> ('magnitude', {'sparsity': 0.5}); ValueError lists valid methods."""
  if not isinstance(recipe, str) or not recipe.strip():
    raise ValueError(f"pruning recipe {recipe!r} must be a string 'METHOD:ARGS'; "
                     f"methods: {_usages()}")
  name, *args = [a.strip() for a in recipe.strip().split(":")]
  if name not in PRUNE_METHODS:
    raise ValueError(f"unknown pruning method {name!r} in recipe {recipe!r}; "
                     f"valid: {_usages()}")
  return name, PRUNE_METHODS[name].parse(tuple(args), recipe)


def _usages() -> str:
  return ", ".join(m.usage for m in PRUNE_METHODS.values())


def prune_with_masks(params, spec: str, *, calib=None, key=None,
                     rules: rules_lib.Rules = ()) -> tuple[Any, Any, dict]:
  """Like `prune`, also returning the mask tree (for the masked optimizer)."""
  name, kwargs = parse_recipe(spec)
  method = PRUNE_METHODS[name]
  if method.needs_key and key is None:
    raise ValueError(f"recipe {spec!r} needs key= (a jax.random key); got None")
  if method.needs_calib and calib is None:
    raise ValueError(f"recipe {spec!r} needs calib= (calibration batches); got None")
  new_params, masks = method.fn(params, rules=rules, calib=calib, key=key, **kwargs)
  report = dict(recipe=spec, method=name, **kwargs,
                rules=[[rx, s] for rx, s in rules],
                **sparsity_report(new_params, masks, dense=params))
  return new_params, masks, report


def prune(params, spec: str, *, calib=None, key=None,
          rules: rules_lib.Rules = ()) -> tuple[Any, dict]:
  """Transform `(params, recipe) -> (pruned params, JSON-able report)`.

  Args:
    params: a plain params tree.
    spec: a recipe string, e.g. "magnitude:0.5"; see `PRUNE_METHODS`.
    calib: calibration batches, for data-aware methods.
    key: jax.random key, for stochastic methods.
    rules: `(regex, spec)` pairs tried before `rules.DEFAULT_RULES`; spec is
      None (dense), `rules.PRUNE` (the recipe's sparsity) or a sparsity override.
  """
  new_params, _, report = prune_with_masks(params, spec, calib=calib, key=key, rules=rules)
  return new_params, report


def _sparsity_only(name: str) -> Callable[[tuple[str, ...], str], dict]:
  def parse(args: tuple[str, ...], recipe: str) -> dict:
    if len(args) != 1:
      raise ValueError(f"recipe {recipe!r}: method {name!r} takes one argument, the "
                       f"sparsity in [0, 1), e.g. '{name}:0.5'")
    return dict(sparsity=parse_sparsity(args[0], recipe))
  return parse


def _mask_then_apply(mask_fn) -> Callable[..., tuple[Any, Any]]:
  def fn(params, *, rules, calib, key, sparsity):
    del calib
    masks = mask_fn(params, sparsity, rules=rules, key=key)
    return masks_lib.apply_masks(params, masks), masks
  return fn


register("magnitude", PruneMethod(
    fn=_mask_then_apply(lambda p, s, rules, key: masks_lib.magnitude_masks(p, s, rules=rules)),
    parse=_sparsity_only("magnitude"), usage="magnitude:SPARSITY"))
register("magnitude_global", PruneMethod(
    fn=_mask_then_apply(lambda p, s, rules, key: masks_lib.magnitude_masks(
        p, s, rules=rules, scope="global")),
    parse=_sparsity_only("magnitude_global"), usage="magnitude_global:SPARSITY"))
register("random", PruneMethod(
    fn=_mask_then_apply(lambda p, s, rules, key: masks_lib.random_masks(
        p, s, rules=rules, key=key)),
    parse=_sparsity_only("random"), usage="random:SPARSITY", needs_key=True))

"""Pruning recipes: `METHOD:TARGET[:KEY=VALUE...]` strings, one registry, one transform.

TARGET is a sparsity in [0, 1) or `N:M` (at most N non-zeros kept in every M
consecutive inputs of each output column: 2:4, 1:4, 4:8).

  prune(params, "magnitude:0.5")                 # per-tensor |w|, 50% of each kernel
  prune(params, "magnitude:2:4")                 # 2:4 along the input axis
  prune(params, "magnitude:0.5:block=4x4")       # 4x4 tiles by their summed |w|
  prune(params, "magnitude:0.8:dist=erk")        # ERK per-layer sparsities, 80% overall
  prune(params, "magnitude_global:0.5")          # one |w| threshold over all kernels
  prune(params, "random:0.5", key=key)           # seeded random baseline
  prune(params, "wanda:0.5", calib=calib)        # |w| * ||x||, per output (no update)
  prune(params, "sparsegpt:2:4", calib=calib)    # OBS sweep with weight update
  prune(params, "wanda:0.7:dist=owl", calib=calib)   # OWL outlier-weighted layer ratios
  prune(params, "saliency:0.5", calib=calib)     # |w * dL/dw| on the calibration batches
  prune(params, "neurons:0.5", cfg=cfg)          # whole FFN neurons (see scripts.prune_lib
                                                 #   for the physically shrunk model)
  prune(params, "heads:0.5", cfg=cfg)            # query heads, the same count per KV group

Options: `mode=sequential|one_pass` (calibration), `blocksize=`, `damp=` (SparseGPT's
relative damping), `bits=8|4|2` (SparseGPT: joint prune + per-channel int quantization in
one OBS pass, QArray leaves out; "sparsegpt:2:4:bits=4"), `lambda=` / `M=` (OWL),
`score=weight|activation` (structured).
A method registers a `PruneMethod`: a parser turning the recipe's arguments into
keyword arguments (validated before any compute) and a function
`fn(params, *, rules, calib, key, cfg, **kwargs) -> (params, masks)`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from model.calibration import Calibration, calibrate, check_calibration
from model.config import ModelConfig
from model.tree import flatten
from sparsity import calibrated, distributions, structured, structures
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
  needs_cfg: bool = False
  structured: bool = False


PRUNE_METHODS: dict[str, PruneMethod] = {}


def register(name: str, method: PruneMethod) -> None:
  """Adds a method to the recipe registry."""
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


def check_nm(n, m, name: str = "N:M") -> tuple[int, int]:
  """(n, m) as ints with 1 <= n <= m, or ValueError."""
  for v, what in ((n, "N"), (m, "M")):
    if isinstance(v, bool) or not isinstance(v, int) or v < 1:
      raise ValueError(f"{name}: {what}={v!r} must be a positive integer")
  if n > m:
    raise ValueError(f"{name}: N={n} must be <= M={m} (N non-zeros kept of every M)")
  return n, m


def prune_with_masks(params, spec: str, *, calib=None, key=None, cfg: ModelConfig | None = None,
                     rules: rules_lib.Rules = ()) -> tuple[Any, Any, dict]:
  """Like `prune`, also returning the mask tree (for the masked optimizer)."""
  name, kwargs = parse_recipe(spec)
  method = PRUNE_METHODS[name]
  if method.needs_key and key is None:
    raise ValueError(f"recipe {spec!r} needs key= (a jax.random key); got None")
  if method.needs_calib or (method.structured and kwargs.get("score") == "activation"):
    check_calibration(calib, params)
  if method.needs_cfg:
    cfg = cfg if cfg is not None else getattr(calib, "cfg", None)
    if not isinstance(cfg, ModelConfig):
      raise ValueError(f"recipe {spec!r} needs cfg= (the model.ModelConfig of the params) "
                       "or calib=")
  new_params, masks = method.fn(params, rules=rules, calib=calib, key=key, cfg=cfg, **kwargs)
  shown = {k: v for k, v in kwargs.items() if isinstance(v, (int, float, str, type(None)))}
  report = dict(recipe=spec, method=name, **shown,
                rules=[[rx, s] for rx, s in rules],
                **sparsity_report(new_params, masks, dense=params))
  return new_params, masks, report


def prune(params, spec: str, *, calib=None, key=None, cfg: ModelConfig | None = None,
          rules: rules_lib.Rules = ()) -> tuple[Any, dict]:
  """Transform `(params, recipe) -> (pruned params, JSON-able report)`.

  Args:
    params: a plain params tree.
    spec: a recipe string, e.g. "wanda:0.5"; see `PRUNE_METHODS` and the module doc.
    calib: a `model.calibration.Calibration` (config, token batches, mode), for
      data-aware methods (wanda, sparsegpt, saliency, dist=owl, score=activation).
    key: jax.random key, for stochastic methods.
    cfg: the params' ModelConfig, for structured methods (or taken from calib).
    rules: `(regex, spec)` pairs tried before `rules.DEFAULT_RULES`; spec is
      None (dense), `rules.PRUNE` (the recipe's sparsity) or a sparsity override.
  """
  new_params, _, report = prune_with_masks(params, spec, calib=calib, key=key, cfg=cfg,
                                           rules=rules)
  return new_params, report


# --- Parsing: a target (SPARSITY or N:M) then KEY=VALUE options.

def _choice(*valid: str):
  def conv(v: str) -> str:
    if v not in valid:
      raise ValueError(f"{v!r} is not valid; choose one of {valid}")
    return v
  return conv


def _positive_int(v: str) -> int:
  if not v.isdigit() or int(v) < 1:
    raise ValueError(f"{v!r} must be a positive integer")
  return int(v)


def _positive_float(v: str) -> float:
  f = float(v)
  if not f > 0:
    raise ValueError(f"{v!r} must be > 0")
  return f


def _block(v: str) -> tuple[int, int]:
  a, sep, b = v.lower().partition("x")
  if not sep:
    a = b = v
  return _positive_int(a), _positive_int(b)


_OPTIONS = {
    "dist": ("dist", _choice("uniform", "erk", "owl")),
    "block": ("block", _block),
    "mode": ("mode", _choice("sequential", "one_pass")),
    "blocksize": ("blocksize", _positive_int),
    "damp": ("percdamp", _positive_float),
    "lambda": ("owl_lambda", float),
    "M": ("owl_m", _positive_float),
    "score": ("score", _choice("weight", "activation")),
    "bits": ("bits", lambda v: int(_choice("2", "4", "8")(v))),
    "scope": ("scope", _choice(*masks_lib.SCOPES)),
}


def _parser(name: str, *, nm: bool, options: tuple[str, ...]):
  target = "SPARSITY|N:M" if nm else "SPARSITY"
  opt_usage = "".join(f"[:{o}=...]" for o in options)
  usage = f"{name}:{target}{opt_usage}"

  def parse(args: tuple[str, ...], recipe: str) -> dict:
    pos = [a for a in args if "=" not in a]
    kv = [a for a in args if "=" in a]
    out: dict[str, Any] = {}
    if len(pos) == 1:
      out["sparsity"] = parse_sparsity(pos[0], recipe)
    elif len(pos) == 2 and nm:
      try:
        n, m = int(pos[0]), int(pos[1])
      except ValueError:
        raise ValueError(f"recipe {recipe!r}: N:M must be two integers, e.g. "
                         f"'{name}:2:4'") from None
      out["n"], out["m"] = check_nm(n, m, f"recipe {recipe!r}")
    else:
      raise ValueError(f"recipe {recipe!r}: method {name!r} takes one target, "
                       f"{target} (e.g. '{name}:0.5'), then options; usage {usage}")
    for item in kv:
      key, _, value = item.partition("=")
      if key not in options:
        raise ValueError(f"recipe {recipe!r}: unknown option {key!r} for {name!r}; "
                         f"valid: {list(options)}")
      field, conv = _OPTIONS[key]
      try:
        out[field] = conv(value)
      except ValueError as e:
        raise ValueError(f"recipe {recipe!r}: option {key}={value!r}: {e}") from None
    if "block" in out and "n" in out:
      raise ValueError(f"recipe {recipe!r}: block= applies to a SPARSITY target, not N:M")
    if out.get("dist", "uniform") != "uniform" and "n" in out:
      raise ValueError(f"recipe {recipe!r}: dist= applies to a SPARSITY target, not N:M")
    return out

  return parse, usage


def _register(name: str, fn, *, nm: bool, options: tuple[str, ...] = (), **kw) -> None:
  parse, usage = _parser(name, nm=nm, options=options)
  register(name, PruneMethod(fn=fn, parse=parse, usage=usage, **kw))


# --- Methods.

def _layer_sparsities(params, sparsity, rules, dist, calib, **owl) -> dict[str, float] | None:
  """Per-path sparsities of a distribution (None: uniform)."""
  if dist in (None, "uniform"):
    return None
  paths, leaves, _ = flatten(params)
  spec = rules_lib.resolve(paths, rules)
  chosen = {p: tuple(x.shape) for p, x in zip(paths, leaves, strict=True)
            if spec[p] == rules_lib.PRUNE}
  if dist == "erk":
    return {p: 1.0 - d for p, d in distributions.erk_densities(chosen, sparsity).items()}
  check_calibration(calib, params)
  targets = calibrated.plan_targets(params, calibrated.Target(sparsity=sparsity), rules)
  owl = {k: v for k, v in dict(lam=owl.get("owl_lambda"), outlier_m=owl.get("owl_m")).items()
         if v is not None}
  chosen_targets = {p: t for p, t in targets.items() if p in chosen}
  return calibrated.owl_sparsities(params, chosen_targets, calib, sparsity, **owl)


def _score_masks(params, score_fn, targets: dict[str, calibrated.Target], block=None):
  """Masks from `score_fn(path, leaf)` per target: top-k, N:M or b x b tiles."""
  paths, leaves, treedef = flatten(params)
  out = []
  for path, leaf in zip(paths, leaves, strict=True):
    t = targets.get(path)
    if t is None:
      out.append(None)
      continue
    score = score_fn(path, leaf)
    if t.n is not None:
      out.append(structures.nm_mask(score, t.n, t.m, axis=0))
    elif block is not None:
      out.append(structures.block_mask(score, t.sparsity, block))
    else:
      out.append(masks_lib.keep_mask(score, t.sparsity))
  return jax.tree_util.tree_unflatten(treedef, out)


def _targets(params, rules, calib, *, sparsity=None, n=None, m=None, dist=None, **kw):
  per_path = _layer_sparsities(params, sparsity, rules, dist, calib, **kw) if n is None else None
  return calibrated.plan_targets(params, calibrated.Target(sparsity, n, m), rules, per_path)


def _check_block(params, targets, block):
  if block is None:
    return
  leaves = dict(zip(*flatten(params)[:2], strict=True))
  for p in targets:
    shape = tuple(leaves[p].shape)
    if shape[0] % block[0] or shape[1] % block[1]:
      raise ValueError(f"block={block[0]}x{block[1]} does not divide {p} of shape {shape}")


def _magnitude(params, *, rules, calib, key, cfg, block=None, **target):
  del key, cfg
  targets = _targets(params, rules, calib, **target)
  _check_block(params, targets, block)
  masks = _score_masks(params, lambda p, w: jnp.abs(w), targets, block)
  return masks_lib.apply_masks(params, masks), masks


def _magnitude_global(params, *, rules, calib, key, cfg, sparsity):
  del calib, key, cfg
  calibrated.plan_targets(params, calibrated.Target(sparsity), rules)  # validates, NaN check
  masks = masks_lib.magnitude_masks(params, sparsity, rules=rules, scope="global")
  return masks_lib.apply_masks(params, masks), masks


def _random(params, *, rules, calib, key, cfg, **target):
  del cfg
  targets = _targets(params, rules, calib, **target)
  index = {p: i for i, p in enumerate(flatten(params)[0])}
  score = lambda p, w: jax.random.uniform(jax.random.fold_in(key, index[p]), w.shape)
  masks = _score_masks(params, score, targets)
  return masks_lib.apply_masks(params, masks), masks


def _one_shot(method: str):
  def fn(params, *, rules, calib, key, cfg, mode=None, blocksize=128, percdamp=0.01,
         bits=None, **target):
    del key, cfg
    targets = _targets(params, rules, calib, **target)
    if mode is not None:
      calib = dataclasses.replace(calib, sequential=mode == "sequential")
    return calibrated.prune_calibrated(params, method, targets, calib, blocksize=blocksize,
                                       percdamp=percdamp, bits=bits)
  return fn


def _saliency(params, *, rules, calib, key, cfg, scope="layerwise", sparsity):
  del key, cfg
  targets = calibrated.plan_targets(params, calibrated.Target(sparsity), rules)
  grads = calibrated.calibration_grads(params, calib)
  gpaths, gleaves, _ = flatten(grads)
  g = dict(zip(gpaths, gleaves, strict=True))
  score = lambda p, w, i=None: jnp.abs(w * g[p])
  if scope == "global":
    masks = masks_lib.masks_from_scores(params, lambda p, w, i: score(p, w), sparsity,
                                        rules=rules, scope="global")
  else:
    masks = _score_masks(params, score, targets)
  return masks_lib.apply_masks(params, masks), masks


def structured_kwargs(name: str, sparsity: float) -> dict:
  """The `structured.structured_masks` fractions of a structured recipe."""
  if name == "neurons":
    return dict(neurons=sparsity)
  return dict(heads=sparsity, head_mode="heads" if name == "heads" else "kv_groups")


def _structured(name: str):
  def fn(params, *, rules, calib, key, cfg, sparsity, score="weight"):
    del key
    if rules:
      raise ValueError(f"structured recipe {name!r} does not take rules (it prunes whole "
                       "neurons / heads in every layer)")
    stats = None
    if score == "activation":
      stats = _structured_stats(cfg, params, calib)
    masks, _ = structured.structured_masks(cfg, params, **structured_kwargs(name, sparsity),
                                           calib=stats)
    return masks_lib.apply_masks(params, masks), masks
  return fn


def _structured_stats(cfg, params, calib: Calibration):
  return calibrate(cfg, params, calib.batches, hessian=False)


def shrink_recipe(params, spec: str, *, cfg: ModelConfig, calib: Calibration | None = None):
  """A structured recipe as a physically smaller model: (new cfg, new params, report).

  The kept neurons / heads are those `prune(params, spec, cfg=cfg)` keeps (same scores),
  so the shrunk model's logits equal the masked model's.
  """
  name, kwargs = parse_recipe(spec)
  if not PRUNE_METHODS[name].structured:
    raise ValueError(f"recipe {spec!r} is not structured; shrinking needs one of "
                     f"{[n for n, m in PRUNE_METHODS.items() if m.structured]}")
  stats = None
  if kwargs.get("score") == "activation":
    check_calibration(calib, params)
    stats = _structured_stats(cfg, params, calib)
  return structured.prune_structured(cfg, params, **structured_kwargs(name, kwargs["sparsity"]),
                                     calib=stats)


_register("magnitude", _magnitude, nm=True, options=("dist", "block"))
_register("magnitude_global", _magnitude_global, nm=False)
_register("random", _random, nm=True, options=("dist",), needs_key=True)
_register("wanda", _one_shot("wanda"), nm=True, options=("dist", "mode", "lambda", "M"),
          needs_calib=True)
_register("sparsegpt", _one_shot("sparsegpt"), nm=True,
          options=("dist", "mode", "blocksize", "damp", "lambda", "M", "bits"), needs_calib=True)
_register("saliency", _saliency, nm=False, options=("scope",), needs_calib=True)
for _name in ("neurons", "heads", "kv_groups"):
  _register(_name, _structured(_name), nm=False, options=("score",), needs_cfg=True,
            structured=True)

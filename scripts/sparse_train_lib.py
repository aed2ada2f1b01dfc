"""Training-time sparsity through the trainer's config: a `sparsity` section -> `Hooks`.

  method    what trains
  none      dense (plain `train_lib` training)
  oneshot   masks from a pruning recipe (`recipe`, on the fresh init or on
            `init_checkpoint`), then the masked optimizer keeps them fixed
  gradual   Zhu & Gupta gradual magnitude pruning (`sparsity.training`)
  movement  movement pruning, scores accumulated in the optimizer state
  set/rigl  dynamic sparse training at constant sparsity (`sparsity.dst`)
  granet    gradual pruning plus gradient regrowth
  pdp       soft masks in the loss (`sparsity.pdp`), hardened for eval and at the end
  polarization  FFN neuron gates with the polarization regularizer
            (`sparsity.polarization`); at the end the model is shrunk to
            `workdir/shrunk` keeping 1 - sparsity of the neurons per layer

Masks (and counters, keys, scores) live in the optimizer state, so they are in
every checkpoint and a resumed run is bit-exact. `train_sparse` adds the final
masks' sparsity to summary.json; pdp also saves the hardened params to
`workdir/hardened`.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os

import jax
import ml_collections
import optax

import model
import sparsity
from scripts import checkpoint_lib, eval_lib, train_lib
from sparsity import dst, pdp, polarization, training
from sparsity import rules as rules_lib

METHODS = ("none", "oneshot", "gradual", "set", "rigl", "granet", "movement", "pdp",
           "polarization")
WRAPPED = ("gradual", "set", "rigl", "granet", "movement")


def default_config(method: str = "gradual") -> ml_collections.ConfigDict:
  """The `sparsity` section's fields and defaults (ERK layer sparsities for set/rigl)."""
  return ml_collections.ConfigDict(dict(
      method=method,
      sparsity=0.8,  # target (final) sparsity of the prunable kernels
      initial_sparsity=0.0,  # gradual / movement / granet: the sparsity at begin_step
      begin_step=0, end_step=-1,  # -1: 3/4 of train.steps, on the update_every grid
      update_every=10,  # mask updates every this many steps
      power=3.0,  # of the polynomial schedule (3: Zhu & Gupta's cubic)
      scope="layerwise",  # or "global" (gradual / movement / granet)
      distribution="erk" if method in ("set", "rigl") else "uniform",
      drop_fraction=0.3,  # set / rigl / granet: cosine-decayed to 0 at end_step
      seed=0,  # random masks and regrowth
      rules="",  # ";"-separated REGEX=SPEC (SPEC: none | prune | a sparsity)
      recipe="",  # oneshot: a pruning recipe; "": magnitude:<sparsity>
      init_checkpoint="",  # oneshot: prune this checkpoint instead of the fresh init
      pdp_tau=0.1,  # pdp: soft-mask temperature, relative to each tensor's mean w^2
      polarization_t=0.5,  # polarization: the L1 weight t (< 1 polarizes, larger prunes more)
      polarization_strength=0.01))  # polarization: the regularizer's weight in the loss


def _fail(name: str, value, valid: str):
  raise ValueError(f"config.sparsity.{name}={value!r}; valid: {valid}")


def parse_rules(text: str) -> tuple:
  """'REGEX=SPEC;REGEX=SPEC' -> ((regex, spec), ...)."""
  return tuple(rules_lib.parse_rule(r.strip()) for r in (text or "").split(";") if r.strip())


def end_step(sc, steps: int) -> int:
  """config.sparsity.end_step, resolved (-1: the last update step <= 3/4 of the run)."""
  begin, every, end = sc.begin_step, sc.update_every, sc.end_step
  if end == -1:
    end = begin + max(int(0.75 * steps) - begin, 0) // every * every
  if not begin <= end <= steps - 1:
    _fail("end_step", sc.end_step, f"{begin} (begin_step) .. {steps - 1} (train.steps - 1), "
          "or -1 for 3/4 of train.steps")
  return end


def validate(sc, steps: int) -> dict:
  """Checks the section (ValueError naming the field); returns the method's keyword args."""
  if sc.method not in METHODS:
    _fail("method", sc.method, f"one of {METHODS}")
  if sc.method == "none":
    return {}
  for name, ok, valid in [
      ("update_every", isinstance(sc.update_every, int) and sc.update_every >= 1, ">= 1"),
      ("begin_step", isinstance(sc.begin_step, int) and 0 <= sc.begin_step < steps,
       f"0 .. {steps - 1} (train.steps - 1)"),
      ("pdp_tau", sc.pdp_tau > 0, "> 0")]:
    if not ok:
      _fail(name, getattr(sc, name), valid)
  try:
    rules = parse_rules(sc.rules)
  except ValueError as e:
    raise ValueError(f"config.sparsity.rules={sc.rules!r}: {e}") from None
  target = sparsity.check_sparsity(sc.sparsity, "config.sparsity.sparsity")
  if sc.method == "polarization":
    return dict(sparsity=target, t=sc.polarization_t, strength=sc.polarization_strength)
  if sc.method in ("oneshot", "pdp"):
    if sc.method == "oneshot":
      sparsity.parse_recipe(sc.recipe or f"magnitude:{target}")
    return dict(sparsity=target, rules=rules)
  end = end_step(sc, steps)
  if sc.method in ("set", "rigl"):
    return dict(sparsity=target, update_every=sc.update_every, end_step=end,
                drop_fraction=sc.drop_fraction, begin_step=sc.begin_step, seed=sc.seed,
                distribution=sc.distribution, rules=rules)
  kw = dict(target=target, end_step=end, initial=sc.initial_sparsity, begin_step=sc.begin_step,
            every=sc.update_every, power=sc.power, scope=sc.scope, rules=rules)
  if sc.method == "granet":
    kw.update(drop_fraction=sc.drop_fraction, distribution=sc.distribution, seed=sc.seed)
  elif sc.method == "gradual":
    kw.update(distribution=sc.distribution)
  return kw


_WRAPPERS = {"gradual": training.gradual_magnitude, "movement": training.movement,
             "set": dst.set_training, "rigl": dst.rigl, "granet": dst.granet}


@dataclasses.dataclass(frozen=True)
class Wrapper:
  """`tx -> method(tx, **kwargs)`, equal by value: equal configs reuse the compiled step."""

  method: str
  kwargs: tuple

  def __call__(self, inner: optax.GradientTransformation) -> optax.GradientTransformation:
    return _WRAPPERS[self.method](inner, **dict(self.kwargs))


def _hard_eval(target: float, rules: tuple):
  def evaluate(model_cfg, params, batches, put_batch):
    hard, _ = pdp.harden(params, target, rules=rules)
    r = eval_lib.evaluate(model_cfg, hard, batches, put_batch=put_batch)
    return {k: r[k] for k in ("loss", "bpb", "ppl")}

  return evaluate


def _folded_eval(model_cfg, params, batches, put_batch):
  r = eval_lib.evaluate(model_cfg, polarization.fold(params), batches, put_batch=put_batch)
  return {k: r[k] for k in ("loss", "bpb", "ppl")}


def hooks_from_config(sc, params, *, steps: int, masks=None) -> train_lib.Hooks:
  """`Hooks` for the section's method; `params` may be abstract (ShapeDtypeStructs).

  oneshot needs `masks` (a mask tree, e.g. from `sparsity.prune_with_masks`). The
  wrapper is built and initialised abstractly here, so bad settings and rules
  fail before any compute.
  """
  kw = validate(sc, steps)
  if sc.method == "none":
    return train_lib.Hooks()
  if sc.method == "oneshot":
    if masks is None:
      raise ValueError("config.sparsity.method='oneshot' needs masks (none were given)")
    return train_lib.Hooks(wrap_optimizer=functools.partial(sparsity.masked, masks=masks))
  if sc.method == "polarization":
    return train_lib.Hooks(
        loss_fn=polarization.polarization_loss(train_lib.nll_loss, t=kw["t"],
                                               strength=kw["strength"]),
        eval_fn=_folded_eval, trainable=".")  # "." admits the extra gates subtree
  if sc.method == "pdp":
    return train_lib.Hooks(
        loss_fn=pdp.pdp_loss(train_lib.nll_loss, tau=sc.pdp_tau, **kw),
        eval_fn=_hard_eval(kw["sparsity"], kw["rules"]))
  try:
    wrap = Wrapper(sc.method, tuple(sorted(kw.items())))
    jax.eval_shape(wrap(optax.identity()).init, params)
  except ValueError as e:
    raise ValueError(f"config.sparsity (method={sc.method!r}): {e}") from None
  return train_lib.Hooks(wrap_optimizer=wrap)


def restore_opt_state(config, workdir: str, hooks: train_lib.Hooks, model_cfg):
  """The optimizer state of the latest train checkpoint in `workdir` (of a run with `hooks`)."""
  tx = hooks.wrap_optimizer(train_lib.make_optimizer(config.opt, config.train.steps)[0])
  abs_params = model.param_shapes(model_cfg)
  dev = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  place = lambda t: jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=dev),
                                 t)
  mgr = checkpoint_lib.manager(workdir)
  try:
    step, state = checkpoint_lib.restore_newest_train_state(
        mgr, place(abs_params), place(jax.eval_shape(tx.init, abs_params)), set_aside=False)
    if not step:
      raise ValueError(f"--workdir={workdir!r} holds no train checkpoint")
    opt_state = state[1]
  finally:
    mgr.close()
  return opt_state


def final_masks(config, workdir: str, hooks: train_lib.Hooks, model_cfg):
  """The mask tree held in the optimizer state of the latest checkpoint in `workdir`."""
  return sparsity.masks_from_state(restore_opt_state(config, workdir, hooks, model_cfg))


def _summary(method: str, target: float, params, masks) -> dict:
  paths, ms, _ = model.flatten(masks, is_leaf=lambda x: x is None)
  layers = {p: 1.0 - float(m.mean()) for p, m in zip(paths, ms, strict=True) if m is not None}
  totals = sparsity.sparsity_report(params, masks)["totals"]
  return {"method": method, "target": target, "mask_sparsity": sparsity.mask_sparsity(masks),
          "weight_sparsity": totals["masked_sparsity"], "layers": layers}


def train_sparse(config, workdir: str) -> train_lib.TrainResult:
  """Trains with `config.sparsity` (resumable); summary.json gains a `sparsity` entry."""
  sc, steps = config.sparsity, config.train.steps
  init_params, model_cfg = None, None
  if sc.method == "oneshot" and sc.init_checkpoint:
    init_params, model_cfg, _ = checkpoint_lib.load_params(sc.init_checkpoint)
  model_cfg = train_lib.validate_config(config, workdir, model_cfg)
  masks = None
  if sc.method == "oneshot":
    validate(sc, steps)
    if init_params is None:
      init_params = model.init(model_cfg, jax.random.key(config.train.seed))
    init_params, masks, _ = sparsity.prune_with_masks(
        init_params, sc.recipe or f"magnitude:{sc.sparsity}", rules=parse_rules(sc.rules),
        key=jax.random.key(sc.seed))
  if sc.method == "polarization":
    validate(sc, steps)
    init_params = polarization.with_gates(model_cfg,
                                          model.init(model_cfg, jax.random.key(config.train.seed)))
  hooks = hooks_from_config(sc, model.param_shapes(model_cfg), steps=steps, masks=masks)
  result = train_lib.train_and_evaluate(
      config, workdir, init_params=init_params, hooks=hooks, model_cfg=model_cfg,
      meta={"sparsity": sc.to_dict()})
  if sc.method == "none":
    return result
  params = result.params
  if sc.method == "polarization":
    small_cfg, small, rep = polarization.harden(result.model_cfg, params, sc.sparsity)
    path = os.path.join(workdir, "shrunk")
    checkpoint_lib.save_params(path, small, small_cfg, step=steps,
                               meta={"sparsity": sc.to_dict()}, replace=True)
    summary = dict(result.summary, sparsity=dict(rep, path=path,
                                                 model_config=small_cfg.to_dict()))
    with open(os.path.join(workdir, "summary.json"), "w") as f:
      json.dump(summary, f, indent=2)
    return train_lib.TrainResult(summary, small, small_cfg)
  if sc.method == "pdp":
    params, masks = pdp.harden(params, sc.sparsity, rules=parse_rules(sc.rules))
    checkpoint_lib.save_params(os.path.join(workdir, "hardened"), params, result.model_cfg,
                               step=steps, meta={"sparsity": sc.to_dict()}, replace=True)
  else:
    masks = final_masks(config, workdir, hooks, result.model_cfg)
  summary = dict(result.summary, sparsity=_summary(sc.method, sc.sparsity, params, masks))
  with open(os.path.join(workdir, "summary.json"), "w") as f:
    json.dump(summary, f, indent=2)
  return train_lib.TrainResult(summary, params, result.model_cfg)


def train(config, workdir: str) -> train_lib.TrainResult:
  """`train_sparse` for configs with a `sparsity` section, else plain `train_and_evaluate`."""
  if "sparsity" not in config:
    return train_lib.train_and_evaluate(config, workdir)
  return train_sparse(config, workdir)

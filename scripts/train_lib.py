"""Training loop: config validation, sharded state, jitted step, checkpoints, metrics.

`train_and_evaluate(config, workdir)` is the one trainer: every run (LM training,
masked fine-tuning of a pruned model, draft models, early-exit distillation)
resumes, logs and checkpoints the same way. What differs is in `Hooks`: the loss,
the validation metrics, the trainable subset of the params and an optimizer
wrapper; `init_params` starts from given params instead of a fresh init.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import json
import math
import os
import time
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import logging
from ml_collections import config_dict

from model import sharding, transformer
from model.config import ModelConfig, get_preset
from model.tree import flatten, is_weight_leaf, match_rules, tree_size
from scripts import checkpoint_lib, data_lib, eval_lib, metrics_lib

WrapOptimizer = Callable[[optax.GradientTransformation], optax.GradientTransformation]


class TrainResult(NamedTuple):
  """What `train_and_evaluate` returns: the summary.json dict, final params, ModelConfig."""

  summary: dict
  params: dict
  model_cfg: ModelConfig


class NonFiniteLossError(RuntimeError):
  """Raised when the loss or the params become NaN/Inf; the last good checkpoint is kept."""


# ModelConfig fields a config's `model` section may override (typed placeholders: None keeps
# the preset's value).
MODEL_FIELDS = {
    "vocab_size": int, "d_model": int, "n_layers": int, "n_heads": int, "n_kv_heads": int,
    "head_dim": int, "ffn_dim": int, "max_seq_len": int, "rope_theta": float,
    "norm_eps": float, "qk_norm": bool, "qkv_bias": bool, "tie_embeddings": bool,
    "param_dtype": str, "dtype": str, "attn_impl": str, "matmul_impl": str,
}


def default_config(preset: str = "tiny") -> ml_collections.ConfigDict:
  """A run's sections with their defaults: model (a preset), data, opt, train, ckpt, mesh."""
  c = ml_collections.ConfigDict()
  c.model = ml_collections.ConfigDict({"preset": preset})
  for name, typ in MODEL_FIELDS.items():
    c.model[name] = config_dict.placeholder(typ)
  c.data = data_lib.default_config()
  c.opt = ml_collections.ConfigDict(dict(
      lr=3e-3, warmup_steps=100,
      min_lr_ratio=0.1,  # cosine decays to lr * min_lr_ratio
      b1=0.9, b2=0.95, eps=1e-8,
      weight_decay=0.1,  # on 2-D kernels and embeddings only
      grad_clip=1.0))  # global norm; 0 disables
  c.train = ml_collections.ConfigDict(dict(
      steps=1000, seed=0,  # seed: parameter init
      log_every=25, eval_every=250,  # 0: only at the end
      eval_batches=16))  # validation batches per periodic eval; 0: whole split
  c.ckpt = ml_collections.ConfigDict(dict(every=250, keep=3))
  c.mesh = ml_collections.ConfigDict(dict(
      data=-1,  # -1: all devices not used by the other axes
      fsdp=1, tensor=1))
  return c


def model_config(model) -> ModelConfig:
  """The ModelConfig of a `model` config section: the preset with non-None fields replaced."""
  overrides = {k: v for k, v in model.items() if k != "preset" and v is not None}
  try:
    return get_preset(model.preset, **overrides)
  except (ValueError, TypeError) as e:
    raise ValueError(f"config.model (preset={model.preset!r}): {e}") from None


def validate_config(config, workdir: str, model_cfg: ModelConfig | None = None) -> ModelConfig:
  """Checks every field a run uses (before any compute or write); returns the ModelConfig."""
  model_cfg = model_cfg or model_config(config.model)
  data_lib.validate(config.data)
  data_lib.check_vocab(model_cfg.vocab_size, f"config.model.vocab_size (preset "
                       f"{config.model.preset!r})" if "preset" in config.model else
                       "the model's vocab_size")
  if config.data.seq_len > model_cfg.max_seq_len:
    raise ValueError(f"config.data.seq_len={config.data.seq_len} exceeds the model's "
                     f"max_seq_len={model_cfg.max_seq_len}; valid: 1..{model_cfg.max_seq_len}")
  opt, tr, ck = config.opt, config.train, config.ckpt
  checks = [
      ("opt.lr", opt.lr, 0 < opt.lr < math.inf, "a finite value > 0"),
      ("opt.warmup_steps", opt.warmup_steps, opt.warmup_steps >= 0, ">= 0"),
      ("opt.min_lr_ratio", opt.min_lr_ratio, 0 <= opt.min_lr_ratio <= 1, "[0, 1]"),
      ("opt.b1", opt.b1, 0 <= opt.b1 < 1, "[0, 1)"), ("opt.b2", opt.b2, 0 <= opt.b2 < 1, "[0, 1)"),
      ("opt.weight_decay", opt.weight_decay, opt.weight_decay >= 0, ">= 0"),
      ("opt.grad_clip", opt.grad_clip, opt.grad_clip >= 0, ">= 0 (0 disables)"),
      ("train.steps", tr.steps, tr.steps >= 1, ">= 1"),
      ("train.log_every", tr.log_every, tr.log_every >= 1, ">= 1"),
      ("train.eval_every", tr.eval_every, tr.eval_every >= 0, ">= 0 (0: only at the end)"),
      ("train.eval_batches", tr.eval_batches, tr.eval_batches >= 0, ">= 0 (0: whole split)"),
      ("ckpt.every", ck.every, ck.every >= 1, ">= 1"), ("ckpt.keep", ck.keep, ck.keep >= 1, ">= 1"),
  ]
  for name, value, ok, valid in checks:
    if not ok:
      raise ValueError(f"config.{name}={value}; valid: {valid}")
  checkpoint_lib.check_writable_dir(workdir, "--workdir")
  return model_cfg


def make_optimizer(opt, total_steps: int):
  """(AdamW with clipping and warmup + cosine decay, the lr schedule)."""
  schedule = optax.warmup_cosine_decay_schedule(
      0.0, opt.lr, min(opt.warmup_steps, max(total_steps - 1, 0)), max(total_steps, 1),
      end_value=opt.lr * opt.min_lr_ratio)
  decay_mask = lambda params: jax.tree.map(lambda x: x.ndim >= 2, params)
  adamw = optax.adamw(schedule, b1=opt.b1, b2=opt.b2, eps=opt.eps,
                      weight_decay=opt.weight_decay, mask=decay_mask)
  tx = optax.chain(optax.clip_by_global_norm(opt.grad_clip), adamw) if opt.grad_clip else adamw
  return tx, schedule


def nll_loss(model_cfg: ModelConfig, params, batch) -> tuple[jax.Array, dict]:
  """The default loss: mean next-token NLL over the batch's targets (and it in bits/byte)."""
  nll, count = eval_lib.nll_sum(model_cfg, params, batch)
  loss = nll / jnp.maximum(count, 1.0)
  return loss, {"bpb": loss / math.log(2)}


@dataclasses.dataclass(frozen=True)
class Hooks:
  """How a run differs from plain LM training (hashable: each distinct set compiles once).

  loss_fn: `(model_cfg, params, batch) -> (loss, metrics)`; default `nll_loss`.
  eval_fn: `(model_cfg, params, batches, put_batch) -> metrics` for validation;
    default bits/byte (`eval_lib.evaluate`).
  trainable: a regex over param paths; only matching leaves train (the rest are
    frozen and get no optimizer state). None: all.
  wrap_optimizer: `tx -> tx` around the AdamW chain (e.g. `sparsity.masked`, whose
    masks then live in the optimizer state and are checkpointed).
  """

  loss_fn: Callable | None = None
  eval_fn: Callable | None = None
  trainable: str | None = None
  wrap_optimizer: WrapOptimizer | None = None


def trainable_mask(params, regex: str | None):
  """A bool per leaf of `params`: whether it trains under `Hooks.trainable`."""
  paths, _, treedef = flatten(params)
  if regex is None:
    return jax.tree_util.tree_unflatten(treedef, [True] * len(paths))
  train = match_rules(paths, [(regex, True)], kind="trainable", unmatched=False)
  return jax.tree_util.tree_unflatten(treedef, train)


def _split(params, mask):
  """(the trainable leaves, None elsewhere)."""
  return jax.tree.map(lambda x, m: x if m else None, params, mask, is_leaf=is_weight_leaf)


def _merge(trained, params):
  return jax.tree.map(lambda t, p: p if t is None else t, trained, params,
                      is_leaf=lambda x: x is None or is_weight_leaf(x))


def train_step(state: dict, batch: dict, *, model_cfg: ModelConfig, tx, schedule, hooks: Hooks,
               mask):
  """One optimizer step on a packed batch: (state, batch) -> (state, metrics)."""
  loss_fn = hooks.loss_fn or nll_loss
  params = state["params"]
  trained = _split(params, mask)
  loss_of = lambda t: loss_fn(model_cfg, _merge(t, params), batch)
  (loss, metrics), grads = jax.value_and_grad(loss_of, has_aux=True)(trained)
  updates, opt_state = tx.update(grads, state["opt_state"], trained)
  params = _merge(optax.apply_updates(trained, updates), params)
  all_finite = lambda t: jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(t)]))
  grad_norm = optax.global_norm(grads)
  # Which quantity went non-finite first, for the guard's report (NONFINITE_CHECKS order).
  finite = {"loss": jnp.isfinite(loss), "grad_norm": jnp.isfinite(grad_norm),
            "params": all_finite(params)}
  metrics = {"loss": loss, **metrics, "grad_norm": grad_norm,
             "lr": schedule(state["step"]), "finite": finite}
  return {"params": params, "opt_state": opt_state, "step": state["step"] + 1}, metrics


class _Program(NamedTuple):
  abs_params: dict
  abs_opt: optax.OptState
  state_sh: dict
  batch_sh: jax.sharding.NamedSharding
  init_params: Callable
  init_opt: Callable
  step: Callable


@functools.lru_cache(maxsize=8)
def _init_program(model_cfg: ModelConfig, mesh):
  """(abstract params, their shardings, jitted sharded init)."""
  init_fn = transformer.abstract_init_fn(model_cfg)
  abs_params = jax.eval_shape(init_fn, jax.random.key(0))
  params_sh = sharding.tree_shardings(abs_params, mesh)
  return abs_params, params_sh, jax.jit(init_fn, out_shardings=params_sh)


def _signature(tree) -> tuple:
  """A hashable description of a tree's structure, shapes and dtypes."""
  leaves, treedef = jax.tree.flatten(tree)
  return treedef, tuple((tuple(x.shape), jnp.dtype(x.dtype).name) for x in leaves)


@functools.lru_cache(maxsize=8)
def _program(model_cfg: ModelConfig, opt, steps: int, hooks: Hooks, mesh,
             params_sig: tuple | None = None) -> _Program:
  """Abstract state, shardings and jitted init / step functions (cached: reruns don't recompile).

  params_sig: the `_signature` of given initial params (e.g. a model plus an extra
  head); None: the model's own init.
  """
  tx, schedule = make_optimizer(opt, steps)
  if hooks.wrap_optimizer is not None:
    tx = hooks.wrap_optimizer(tx)
  abs_params, params_sh, init_params = _init_program(model_cfg, mesh)
  if params_sig is not None:
    treedef, leaves = params_sig
    abs_params = jax.tree.unflatten(treedef, [jax.ShapeDtypeStruct(s, d) for s, d in leaves])
    params_sh, init_params = sharding.tree_shardings(abs_params, mesh), None
  mask = trainable_mask(abs_params, hooks.trainable)
  abs_opt = jax.eval_shape(tx.init, _split(abs_params, mask))
  replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  state_sh = {"params": params_sh, "opt_state": sharding.tree_shardings(abs_opt, mesh),
              "step": replicated}
  batch_sh = sharding.batch_sharding(mesh)
  step = jax.jit(lambda s, b: train_step(s, b, model_cfg=model_cfg, tx=tx, schedule=schedule,
                                         hooks=hooks, mask=mask),
                 in_shardings=(state_sh, batch_sh), out_shardings=(state_sh, replicated),
                 donate_argnums=0)
  init_opt = jax.jit(lambda p: tx.init(_split(p, mask)), out_shardings=state_sh["opt_state"])
  return _Program(abs_params, abs_opt, state_sh, batch_sh, init_params, init_opt, step)


@dataclasses.dataclass
class _Pending:
  """Per-step device metrics not yet fetched (fetching forces a sync, so it is batched)."""

  steps: list = dataclasses.field(default_factory=list)
  metrics: list = dataclasses.field(default_factory=list)


def train_and_evaluate(config, workdir: str, *, init_params=None, hooks: Hooks = Hooks(),
                       model_cfg: ModelConfig | None = None,
                       meta: dict | None = None) -> TrainResult:
  """Trains per `config`, resuming from the latest checkpoint in `workdir`; returns a summary.

  Args:
    config: sections model, data, opt, train, ckpt, mesh (others are ignored).
    init_params: start from these params instead of a fresh init (fine-tuning; with
      `hooks.trainable`, a model plus extra subtrees such as an early-exit head).
    hooks: loss, validation, trainable subset and optimizer wrapper (`Hooks`).
    model_cfg: the model, instead of `config.model` (e.g. a loaded checkpoint's).
    meta: JSON-able fields added to every checkpoint's meta.
  Writes `workdir/{checkpoints/, metrics.jsonl, tb/, config.json, model_config.json,
  summary.json}`. Raises ValueError on bad config (before any compute or write) and
  NonFiniteLossError if the loss or params become NaN/Inf.
  """
  # --- Validate and load data: nothing is written before this block succeeds.
  model_cfg = validate_config(config, workdir, model_cfg)
  mesh = sharding.make_mesh(config.mesh.data, config.mesh.fsdp, config.mesh.tensor)
  dc = config.data
  if dc.batch_size % sharding.batch_divisor(mesh):
    raise ValueError(f"config.data.batch_size={dc.batch_size} must be a multiple of the "
                     f"{sharding.batch_divisor(mesh)} batch shards (mesh data x fsdp)")
  train_stream = data_lib.load_split(dc, "train")
  val_stream = data_lib.load_split(dc, "val")
  it = data_lib.BatchIterator(train_stream, dc.batch_size, dc.seq_len, dc.seed)
  steps, n_val = config.train.steps, config.train.eval_batches or None
  val_batches = list(data_lib.eval_batches(val_stream, dc.batch_size, dc.seq_len, n_val))
  if checkpoint_lib.has_checkpoint(workdir):
    saved = checkpoint_lib.load_meta(workdir).get("model_config")
    saved = saved and ModelConfig.from_dict(saved)
    if saved and saved != model_cfg:
      raise ValueError(f"config.model differs from the checkpoint in --workdir={workdir!r} "
                       f"(saved: {saved}); use a fresh workdir or the same model config")

  # --- Abstract state, shardings and compiled functions, then init or restore.
  sig = None
  if init_params is not None:
    _check_init_params(init_params, _init_program(model_cfg, mesh)[0], hooks)
    sig = _signature(init_params) if hooks.trainable is not None else None
  prog = _program(model_cfg, ml_collections.FrozenConfigDict(config.opt), steps, hooks, mesh,
                  sig)
  os.makedirs(workdir, exist_ok=True)
  with open(os.path.join(workdir, "config.json"), "w") as f:
    f.write(config.to_json_best_effort(indent=2))
  mgr = checkpoint_lib.manager(workdir, keep=config.ckpt.keep)
  abstract = lambda t, s: jax.tree.map(
      lambda a, sh: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sh), t, s)
  start, restored = checkpoint_lib.restore_newest_train_state(
      mgr, abstract(prog.abs_params, prog.state_sh["params"]),
      abstract(prog.abs_opt, prog.state_sh["opt_state"]))
  if start:
    params, opt_state, data_state = restored
    it.restore(data_state)
    logging.info("resumed from step %d in %s", start, mgr.directory)
  else:
    if init_params is None:
      params = prog.init_params(jax.random.key(config.train.seed))
    else:
      # A copy: the train step donates its state, which must not delete the caller's arrays.
      params = jax.device_put(init_params, prog.state_sh["params"], may_alias=False)
    opt_state = prog.init_opt(params)
  state = {"params": params, "opt_state": opt_state,
           "step": jax.device_put(jnp.asarray(start, jnp.int32), prog.state_sh["step"])}
  put = lambda b: jax.device_put(b, prog.batch_sh)
  writer = metrics_lib.MetricWriter(workdir, resume_step=start)
  progress = metrics_lib.Progress(steps, initial=start)
  tokens_per_step = dc.batch_size * dc.seq_len
  pending, last_good, train_rec, val_rec = _Pending(), start, {}, {}
  history = collections.deque(maxlen=64)  # the latest finite steps' metrics, for the guard
  timed_steps, timed_s, t_flush = 0, 0.0, time.perf_counter()

  def save(step):
    checkpoint_lib.save_train_state(mgr, step, state["params"], model_cfg, meta=meta,
                                    opt_state=state["opt_state"], data_state=it.state)

  def validate(step):
    rec = (hooks.eval_fn or _default_eval)(model_cfg, state["params"], val_batches, put)
    bad = [k for k, v in rec.items() if isinstance(v, float) and not math.isfinite(v)]
    if bad:
      raise NonFiniteLossError(
          f"validation {bad[0]} is {rec[bad[0]]} at step {step} while training stayed finite; "
          f"stopped before writing it. {_last_good(last_good, mgr.directory)}")
    writer.write(step, "val", rec)
    return rec

  # --- Train.
  try:
    for step in range(start + 1, steps + 1):
      state, m = prog.step(state, put(next(it)))
      pending.steps.append(step)
      pending.metrics.append(m)
      if step % config.train.log_every and step % config.ckpt.every and step != steps:
        continue
      fetched = jax.device_get(pending.metrics)
      for s, fm in zip(pending.steps, fetched, strict=True):
        if not all(fm["finite"].values()):
          raise NonFiniteLossError(_nonfinite_report(s, fm, history, last_good, mgr.directory))
        history.append(fm)
      dt = time.perf_counter() - t_flush
      tok_s = tokens_per_step * len(fetched) / dt
      if pending.steps[0] > start + 1:  # the first interval of a run includes compilation
        timed_steps, timed_s = timed_steps + len(fetched), timed_s + dt
      train_rec = {k: float(np.mean([fm[k] for fm in fetched]))
                   for k in fetched[0] if k not in ("lr", "finite")}
      train_rec.update(lr=float(fetched[-1]["lr"]), tokens_per_s=tok_s)
      writer.write(step, "train", train_rec)
      pending = _Pending()
      if config.train.eval_every and step % config.train.eval_every == 0 and step != steps:
        val_rec = validate(step)
      if step % config.ckpt.every == 0 or step == steps:
        save(step)
        last_good = step
      progress.update(step, f"{_brief(train_rec)} {tok_s / 1e3:.1f}k tok/s"
                      + (f" | val {_brief(val_rec)}" if val_rec else ""))
      t_flush = time.perf_counter()  # exclude eval and checkpoint time from the rate
    val_rec = validate(steps)
  finally:
    writer.close()
    mgr.close()
  summary = {
      "step": steps, "params": tree_size(state["params"]), "model_config": model_cfg.to_dict(),
      **{f"train_{k}": train_rec.get(k) for k in ("loss", "bpb")},
      **{f"val_{k}": v for k, v in val_rec.items()},
      "unigram_entropy_bits": data_lib.unigram_entropy_bits(train_stream),
      "tokens_per_s": tokens_per_step * timed_steps / timed_s if timed_steps else None,
      "devices": len(mesh.devices.flat), "workdir": os.path.abspath(workdir),
      "checkpoint_dir": str(mgr.directory)}
  with open(os.path.join(workdir, "summary.json"), "w") as f:
    json.dump(summary, f, indent=2)
  return TrainResult(summary, state["params"], model_cfg)


def _default_eval(model_cfg, params, batches, put_batch) -> dict:
  r = eval_lib.evaluate(model_cfg, params, batches, put_batch=put_batch)
  return {k: r[k] for k in ("loss", "bpb", "ppl")}


def _brief(rec: dict) -> str:
  """The loss and the loss function's first metric, for the progress line."""
  names = ["loss"] + [k for k in rec if k not in ("loss", "grad_norm", "lr", "tokens_per_s")]
  return " ".join(f"{k} {rec[k]:.3f}" for k in names[:2] if k in rec)


def _last_good(step: int, directory) -> str:
  return (f"Last good checkpoint: step {step} in {directory}." if step else
          "No checkpoint was saved before it.")


def _nonfinite_report(step: int, fm: dict, history, last_good: int, directory) -> str:
  """What the NaN guard saw: the first non-finite quantity and its step, the last finite
  values, and only the causes these numbers support."""
  first = next(k for k in ("loss", "grad_norm", "params") if not fm["finite"][k])
  seen = {"loss": "the loss", "grad_norm": "the gradient norm (loss finite)",
          "params": "the params after the update (loss and gradients finite)"}[first]
  lines = [f"non-finite {seen} at step {step} (lr {float(fm['lr']):.3g}); stopped.",
           _last_good(last_good, directory)]
  norms = [float(h["grad_norm"]) for h in history]
  if history:
    lines.append(f"Last finite step: loss {float(history[-1]['loss']):.4g}, grad norm "
                 f"{norms[-1]:.4g}.")
  if len(norms) >= 4 and norms[-1] > 10 * float(np.median(norms)):
    lines.append(f"The gradient norm rose from a median {float(np.median(norms)):.3g} to "
                 f"{norms[-1]:.3g} before it: lower config.opt.lr or raise "
                 "config.opt.warmup_steps.")
  elif step == 1 and first == "loss":
    lines.append("The first step's loss was already non-finite, before any update: the "
                 "initial params or the batch, not the learning rate.")
  return " ".join(lines)


def _check_init_params(params, abstract_model, hooks: Hooks) -> None:
  """The model's own leaves must match; extra subtrees only where a trainable subset is set."""
  got = dict(zip(*_shapes(params), strict=True))
  want = dict(zip(*_shapes(abstract_model), strict=True))
  wrong = [p for p in want if got.get(p) != want[p]]
  extra = [p for p in got if p not in want]
  if wrong or (extra and hooks.trainable is None):
    raise ValueError(f"init_params do not match config.model's parameter shapes/dtypes "
                     f"(first mismatches: {(wrong or extra)[:3]})")


def _shapes(tree) -> tuple[list[str], list]:
  paths, leaves, _ = flatten(tree)
  return paths, [(tuple(x.shape), jnp.dtype(x.dtype).name) for x in leaves]


def format_summary(s: dict) -> str:
  """One line: final validation metrics, parameter count, throughput, where the run is."""
  val = ", ".join(f"val {k[4:]} {v:.4f}" for k, v in s.items()
                  if k.startswith("val_") and isinstance(v, float))
  rate = f"{s['tokens_per_s'] / 1e3:.1f}k train tokens/s" if s["tokens_per_s"] else "no steps run"
  return (f"step {s['step']}: {val} (unigram entropy {s['unigram_entropy_bits']:.3f}), "
          f"{s['params']:,} params, {rate}; outputs in {s['workdir']}")

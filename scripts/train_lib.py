"""Training loop: config validation, sharded state, jitted step, checkpoints, metrics.

`train_and_evaluate(config, workdir)` is the whole trainer; `scripts/train.py` only
parses flags and calls it. Fine-tuning entry points: `init_params` starts from
given params instead of a fresh init, and `wrap_optimizer(tx) -> tx` wraps the
AdamW chain (e.g. the sparsity package's masked optimizer keeps pruned weights
at zero; its masks then live in the optimizer state and are checkpointed).
"""

from __future__ import annotations

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

from model import sharding, transformer
from model.config import ModelConfig, get_preset
from model.tree import tree_size
from scripts import checkpoint_lib, data_lib, eval_lib, metrics_lib

WrapOptimizer = Callable[[optax.GradientTransformation], optax.GradientTransformation]


class TrainResult(NamedTuple):
  """What `train_and_evaluate` returns: the summary.json dict, final params, ModelConfig."""

  summary: dict
  params: dict
  model_cfg: ModelConfig


class NonFiniteLossError(RuntimeError):
  """Raised when the loss or the params become NaN/Inf; the last good checkpoint is kept."""


def model_config(model) -> ModelConfig:
  """The ModelConfig of a `model` config section: the preset with non-None fields replaced."""
  overrides = {k: v for k, v in model.items() if k != "preset" and v is not None}
  try:
    return get_preset(model.preset, **overrides)
  except (ValueError, TypeError) as e:
    raise ValueError(f"config.model (preset={model.preset!r}): {e}") from None


def validate_config(config, workdir: str) -> ModelConfig:
  """Checks every field a run uses (before any compute or write); returns the ModelConfig."""
  model_cfg = model_config(config.model)
  data_lib.validate(config.data)
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


def train_step(state: dict, batch: dict, *, model_cfg: ModelConfig, tx, schedule):
  """One AdamW step on a packed batch: (state, batch) -> (state, metrics)."""

  def loss_fn(params):
    nll, count = eval_lib.nll_sum(model_cfg, params, batch)
    return nll / jnp.maximum(count, 1.0)

  loss, grads = jax.value_and_grad(loss_fn)(state["params"])
  updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
  params = optax.apply_updates(state["params"], updates)
  finite = jnp.isfinite(loss) & jnp.all(
      jnp.stack([jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(params)]))
  metrics = {"loss": loss, "bpb": loss / math.log(2), "grad_norm": optax.global_norm(grads),
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


@functools.lru_cache(maxsize=8)
def _program(model_cfg: ModelConfig, opt, steps: int, wrap_optimizer, mesh) -> _Program:
  """Abstract state, shardings and jitted init / step functions (cached: reruns don't recompile)."""
  tx, schedule = make_optimizer(opt, steps)
  if wrap_optimizer is not None:
    tx = wrap_optimizer(tx)
  abs_params, params_sh, init_params = _init_program(model_cfg, mesh)
  abs_opt = jax.eval_shape(tx.init, abs_params)
  replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  state_sh = {"params": params_sh,
              "opt_state": sharding.tree_shardings(abs_opt, mesh),
              "step": replicated}
  batch_sh = sharding.batch_sharding(mesh)
  step = jax.jit(lambda s, b: train_step(s, b, model_cfg=model_cfg, tx=tx, schedule=schedule),
                 in_shardings=(state_sh, batch_sh), out_shardings=(state_sh, replicated),
                 donate_argnums=0)
  return _Program(abs_params, abs_opt, state_sh, batch_sh, init_params,
                  jax.jit(tx.init, out_shardings=state_sh["opt_state"]), step)


@dataclasses.dataclass
class _Pending:
  """Per-step device metrics not yet fetched (fetching forces a sync, so it is batched)."""

  steps: list = dataclasses.field(default_factory=list)
  metrics: list = dataclasses.field(default_factory=list)


def train_and_evaluate(config, workdir: str, *, init_params=None,
                       wrap_optimizer: WrapOptimizer | None = None) -> TrainResult:
  """Trains per `config`, resuming from the latest checkpoint in `workdir`; returns a summary.

  Writes `workdir/{checkpoints/, metrics.jsonl, tb/, config.json, model_config.json,
  summary.json}`. Raises ValueError on bad config (before any compute or write) and
  NonFiniteLossError if the loss or params become NaN/Inf.
  """
  # --- Validate and load data: nothing is written before this block succeeds.
  model_cfg = validate_config(config, workdir)
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
    saved = ModelConfig.from_dict(checkpoint_lib.load_meta(workdir)["model_config"])
    if saved != model_cfg:
      raise ValueError(f"config.model differs from the checkpoint in --workdir={workdir!r} "
                       f"(saved: {saved}); use a fresh workdir or the same model config")

  # --- Abstract state, shardings and compiled functions, then init or restore.
  prog = _program(model_cfg, ml_collections.FrozenConfigDict(config.opt), steps, wrap_optimizer,
                  mesh)
  key = jax.random.key(config.train.seed)
  if init_params is not None:
    _check_same_shapes(init_params, prog.abs_params)

  os.makedirs(workdir, exist_ok=True)
  with open(os.path.join(workdir, "config.json"), "w") as f:
    f.write(config.to_json_best_effort(indent=2))
  mgr = checkpoint_lib.manager(workdir, keep=config.ckpt.keep)
  start = mgr.latest_step() or 0
  if start:
    abstract = lambda t, s: jax.tree.map(
        lambda a, sh: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sh), t, s)
    params, opt_state, data_state = checkpoint_lib.restore_train_state(
        mgr, start, abstract(prog.abs_params, prog.state_sh["params"]),
        abstract(prog.abs_opt, prog.state_sh["opt_state"]))
    it.restore(data_state)
    logging.info("resumed from step %d in %s", start, mgr.directory)
  else:
    if init_params is None:
      params = prog.init_params(key)
    else:
      # A copy: the train step donates its state, which must not delete the caller's arrays.
      params = jax.device_put(init_params, prog.state_sh["params"], may_alias=False)
    opt_state = prog.init_opt(params)
  state = {"params": params, "opt_state": opt_state,
           "step": jax.device_put(jnp.asarray(start, jnp.int32), prog.state_sh["step"])}
  step_fn = prog.step
  put = lambda b: jax.device_put(b, prog.batch_sh)
  writer = metrics_lib.MetricWriter(workdir, resume_step=start)
  progress = metrics_lib.Progress(steps, initial=start)
  entropy = data_lib.unigram_entropy_bits(train_stream)
  tokens_per_step = dc.batch_size * dc.seq_len
  pending, last_good, train_rec, val_rec = _Pending(), start, {}, {}
  timed_steps, timed_s, t_flush = 0, 0.0, time.perf_counter()

  def save(step):
    checkpoint_lib.save_train_state(mgr, step, state["params"], model_cfg,
                                    opt_state=state["opt_state"], data_state=it.state)

  def validate(step):
    r = eval_lib.evaluate(model_cfg, state["params"], val_batches, put_batch=put)
    rec = {k: r[k] for k in ("loss", "bpb", "ppl")}
    writer.write(step, "val", rec)
    return rec

  # --- Train.
  try:
    for step in range(start + 1, steps + 1):
      state, m = step_fn(state, put(next(it)))
      pending.steps.append(step)
      pending.metrics.append(m)
      if step % config.train.log_every and step % config.ckpt.every and step != steps:
        continue
      fetched = jax.device_get(pending.metrics)
      for s, fm in zip(pending.steps, fetched, strict=True):
        if not fm["finite"]:
          raise NonFiniteLossError(
              f"non-finite loss or params at step {s} (loss={float(fm['loss'])}); stopped. "
              f"Last good checkpoint: step {last_good} in {mgr.directory}. Lower config.opt.lr "
              "or raise config.opt.warmup_steps.")
      dt = time.perf_counter() - t_flush
      tok_s = tokens_per_step * len(fetched) / dt
      if pending.steps[0] > start + 1:  # the first interval of a run includes compilation
        timed_steps, timed_s = timed_steps + len(fetched), timed_s + dt
      train_rec = {k: float(np.mean([fm[k] for fm in fetched]))
                   for k in ("loss", "bpb", "grad_norm")}
      train_rec.update(lr=float(fetched[-1]["lr"]), tokens_per_s=tok_s)
      writer.write(step, "train", train_rec)
      pending = _Pending()
      if config.train.eval_every and step % config.train.eval_every == 0 and step != steps:
        val_rec = validate(step)
      if step % config.ckpt.every == 0 or step == steps:
        save(step)
        last_good = step
      progress.update(step, f"loss {train_rec['loss']:.3f} bpb {train_rec['bpb']:.3f} "
                      f"{tok_s / 1e3:.1f}k tok/s" + (f" | val bpb {val_rec['bpb']:.3f}"
                                                    if val_rec else ""))
      t_flush = time.perf_counter()  # exclude eval and checkpoint time from the rate
    val_rec = validate(steps)
  finally:
    writer.close()
    mgr.close()
  summary = {
      "step": steps, "params": tree_size(state["params"]),
      "model_config": model_cfg.to_dict(), "train_loss": train_rec.get("loss"),
      "train_bpb": train_rec.get("bpb"), "val_loss": val_rec["loss"], "val_bpb": val_rec["bpb"],
      "val_ppl": val_rec["ppl"], "unigram_entropy_bits": entropy,
      "tokens_per_s": tokens_per_step * timed_steps / timed_s if timed_steps else None,
      "devices": len(mesh.devices.flat), "workdir": os.path.abspath(workdir),
      "checkpoint_dir": str(mgr.directory)}
  with open(os.path.join(workdir, "summary.json"), "w") as f:
    json.dump(summary, f, indent=2)
  return TrainResult(summary, state["params"], model_cfg)


def _check_same_shapes(params, abstract) -> None:
  got = jax.tree.map(lambda x: (tuple(x.shape), jnp.dtype(x.dtype).name), params)
  want = jax.tree.map(lambda x: (tuple(x.shape), jnp.dtype(x.dtype).name), abstract)
  if got != want:
    raise ValueError("init_params do not match config.model's parameter shapes/dtypes")

"""Checkpoints of sparq runs: `model.checkpoint`'s format with the run's ModelConfig.

Train checkpoints add the optimizer state (masks included) and the data-iterator
position to the params and meta items (layout in `model.checkpoint`).
"""

from __future__ import annotations

import os
import time

import orbax.checkpoint as ocp

from model import checkpoint as ckpt
from model.config import ModelConfig
from scripts import cli_lib

CKPT_SUBDIR = ckpt.CKPT_SUBDIR
has_checkpoint = ckpt.has_checkpoint
load_meta = ckpt.load_meta
manager = ckpt.manager


def save_train_state(mgr: ocp.CheckpointManager, step: int, params, model_cfg: ModelConfig, *,
                     opt_state, data_state: dict, meta: dict | None = None) -> None:
  """One train checkpoint: params, optimizer state, data-iterator state and meta."""
  ckpt.save(mgr, step, params, model_cfg=model_cfg, meta=meta, opt_state=opt_state,
            data_state=data_state)


def restore_train_state(mgr: ocp.CheckpointManager, step: int, abstract_params,
                        abstract_opt_state, *, verify: bool = True):
  """(params, opt_state, data_state) of a train checkpoint, placed per the abstract shardings.

  verify: the saved checksums of params and optimizer state must match and the params be
  finite (else `model.checkpoint.CheckpointError` naming the step's folder).
  """
  where = f"{mgr.directory}/{step}"
  r = mgr.restore(step, args=ocp.args.Composite(
      params=ocp.args.StandardRestore(abstract_params),
      opt_state=ocp.args.StandardRestore(abstract_opt_state),
      data=ocp.args.JsonRestore(), meta=ocp.args.JsonRestore()))
  if verify:
    ckpt.verify_restored(where, r.meta, params=r.params, opt_state=r.opt_state)
  if not isinstance(r.data, dict):
    raise ckpt.CheckpointError(f"{where}/data holds no iterator state (a JSON object)")
  return r.params, r.opt_state, r.data


def restore_newest_train_state(mgr: ocp.CheckpointManager, abstract_params, abstract_opt_state,
                               *, set_aside: bool = True):
  """(step, (params, opt_state, data_state)) of the newest intact train checkpoint, or
  (0, None) when there is none yet.

  Unreadable or corrupt newer steps are skipped with a one-line warning each and, with
  `set_aside`, renamed to `<step>.bad-<unix time>` next to the good ones (kept for a
  post-mortem, out of the way of the resumed run's own saves at those steps). A folder
  whose every step is bad raises `model.checkpoint.CheckpointError` naming it.
  """
  step, state = ckpt.restore_newest(
      mgr, lambda s: restore_train_state(mgr, s, abstract_params, abstract_opt_state),
      what="train checkpoint")
  if step is None:
    return 0, None
  newer = [s for s in mgr.all_steps() if s > step]
  if set_aside and newer:
    for s in newer:
      src = os.path.join(str(mgr.directory), str(s))
      dst = f"{src}.bad-{int(time.time())}"
      os.replace(src, dst)
      ckpt.warn(f"moved unusable step {s} to {dst}; resuming from step {step}")
    mgr.reload()
  return step, state


def save_params(workdir: str, params, model_cfg: ModelConfig, step: int = 0,
                meta: dict | None = None, replace: bool = False) -> str:
  """A params-only checkpoint of a model (pruned, quantized, imported); returns its folder."""
  return ckpt.save_params(workdir, params, model_cfg=model_cfg, step=step, meta=meta,
                          replace=replace)


def load_params(workdir: str, step: int | None = None, sharding=None):
  """(params, ModelConfig, step) of a checkpoint (latest by default); QArray leaves rebuilt."""
  params, meta, step = ckpt.load_params(workdir, step, sharding=sharding)
  return params, ckpt.model_config(meta, workdir), step


def check_writable_dir(path: str, flag: str, *, differ_from: str | None = None) -> str:
  """The absolute `path` if it is (or can be created as) a writable folder; else ValueError.

  `flag` names the argument in the message (e.g. "--out"); `differ_from` is a folder
  the output must not be (the source checkpoint's).
  """
  if not path:
    raise ValueError(f"{flag} must be a folder path (got an empty string)")
  out = os.path.abspath(path)
  if differ_from is not None and out == os.path.abspath(differ_from):
    raise ValueError(f"{flag}={path!r} must differ from --workdir (the source checkpoint's "
                     "folder)")
  if os.path.exists(out) and not os.path.isdir(out):
    raise ValueError(f"{flag}={path!r} exists and is not a folder")
  probe = out
  while not os.path.exists(probe):
    probe = os.path.dirname(probe)
  if not os.path.isdir(probe) or not os.access(probe, os.W_OK | os.X_OK):
    raise ValueError(f"{flag}={path!r} is not writable ({probe!r} denies writes)")
  return out


def check_resume(workdir: str, settings: dict, fields, free: str) -> None:
  """ValueError if `workdir/config.json` (a run's saved settings) differs from `settings` in
  any of `fields` (the ones its outputs depend on); `free` names what may change."""
  path = os.path.join(workdir, "config.json")
  if not os.path.exists(path):
    return
  old = cli_lib.read_json(path, f"--workdir={workdir}")
  diff = [k for k in fields if old.get(k) != settings[k]]
  if diff:
    raise ValueError(f"--workdir={workdir!r} holds a run with different {diff}; use a new "
                     f"--workdir (only {free} may change between reruns)")

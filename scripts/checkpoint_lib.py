"""orbax checkpoints of sparq models and train states.

Layout of a workdir:
  checkpoints/<step>/params      params (StandardSave; QArray leaves as {values, scale, zero})
  checkpoints/<step>/opt_state   optimizer state (train checkpoints only)
  checkpoints/<step>/data        data-iterator state (JSON; train checkpoints only)
  checkpoints/<step>/meta        {"model_config", "qarrays", ...} (JSON)
  model_config.json              the ModelConfig of the latest save
Saves are atomic (orbax writes a temporary folder and renames it), so an
interrupted save never shadows the previous checkpoint. `meta["qarrays"]` holds
the static fields of every QArray leaf, so a quantized checkpoint loads without
knowing its structure in advance.
"""

from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp

from model.config import ModelConfig
from model.sharding import path_str
from quant.qarray import QArray

CKPT_SUBDIR = "checkpoints"
_ITEMS = ("params", "opt_state", "data", "meta")


def manager(workdir: str, keep: int | None = None, create: bool = True) -> ocp.CheckpointManager:
  """A synchronous CheckpointManager over `workdir/checkpoints` keeping `keep` steps."""
  handlers = {
      "params": ocp.StandardCheckpointHandler(), "opt_state": ocp.StandardCheckpointHandler(),
      "data": ocp.JsonCheckpointHandler(), "meta": ocp.JsonCheckpointHandler()}
  options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=create,
                                         enable_async_checkpointing=False)
  return ocp.CheckpointManager(os.path.abspath(os.path.join(workdir, CKPT_SUBDIR)),
                               options=options, item_handlers=handlers)


def qarray_manifest(params) -> dict[str, dict]:
  """Static fields of every QArray leaf, keyed by its path."""
  out = {}
  leaves = jax.tree_util.tree_flatten_with_path(params, is_leaf=lambda x: isinstance(x, QArray))
  for path, leaf in leaves[0]:
    if isinstance(leaf, QArray):
      out[path_str(path)] = {"shape": list(leaf.shape), "bits": leaf.bits, "fmt": leaf.fmt,
                             "group_size": leaf.group_size, "dtype": jnp.dtype(leaf.dtype).name}
  return out


def _rebuild_qarrays(tree: dict, manifest: dict[str, dict]) -> dict:
  for path, f in manifest.items():
    *parents, last = path.split("/")
    node = tree
    for k in parents:
      node = node[k]
    d = node[last]
    node[last] = QArray(values=d["values"], scale=d["scale"], zero=d.get("zero"),
                        shape=tuple(f["shape"]), bits=f["bits"], fmt=f["fmt"],
                        group_size=f["group_size"], dtype=jnp.dtype(f["dtype"]))
  return tree


def save(mgr: ocp.CheckpointManager, step: int, params, model_cfg: ModelConfig, *,
         opt_state=None, data_state: dict | None = None, meta: dict | None = None) -> None:
  """Saves one checkpoint (params + meta, and opt_state / data state when given)."""
  full_meta = {"step": int(step), "model_config": model_cfg.to_dict(),
               "qarrays": qarray_manifest(params), **(meta or {})}
  items = {"params": ocp.args.StandardSave(params), "meta": ocp.args.JsonSave(full_meta)}
  if opt_state is not None:
    items["opt_state"] = ocp.args.StandardSave(opt_state)
  if data_state is not None:
    items["data"] = ocp.args.JsonSave(data_state)
  mgr.save(int(step), args=ocp.args.Composite(**items), force=True)
  mgr.wait_until_finished()
  _write_json(os.path.join(os.path.dirname(mgr.directory), "model_config.json"),
              model_cfg.to_dict())


def _write_json(path: str, obj) -> None:
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    json.dump(obj, f, indent=2)
  os.replace(tmp, path)


def restore_train_state(mgr: ocp.CheckpointManager, step: int, abstract_params,
                        abstract_opt_state):
  """(params, opt_state, data_state) of a train checkpoint, placed per the abstract shardings."""
  r = mgr.restore(step, args=ocp.args.Composite(
      params=ocp.args.StandardRestore(abstract_params),
      opt_state=ocp.args.StandardRestore(abstract_opt_state),
      data=ocp.args.JsonRestore()))
  return r.params, r.opt_state, r.data


def save_params(workdir: str, params, model_cfg: ModelConfig, step: int = 0,
                meta: dict | None = None, replace: bool = False) -> str:
  """Saves a params-only checkpoint (e.g. a pruned or quantized model); returns its folder.

  replace: an existing checkpoint at `step` is deleted first (for outputs derived
  again on a resumed run; a kill in between leaves no checkpoint at `step`, never a
  partial one). Without it an existing step is an error.
  """
  mgr = manager(workdir)
  if replace and step in mgr.all_steps():
    mgr.delete(step)
  save(mgr, step, params, model_cfg, meta=meta)
  mgr.close()
  return os.path.join(mgr.directory, str(step))


def load_meta(workdir: str, step: int | None = None) -> dict:
  """The meta JSON of a checkpoint (latest step by default)."""
  mgr = _reader(workdir)
  step = _pick_step(mgr, workdir, step)
  meta = mgr.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore())).meta
  mgr.close()
  return meta


def has_checkpoint(workdir: str) -> bool:
  """Whether `workdir/checkpoints` holds a finished checkpoint (read-only check)."""
  d = os.path.join(workdir, CKPT_SUBDIR)
  return os.path.isdir(d) and any(n.isdigit() for n in os.listdir(d))


def _reader(workdir: str) -> ocp.CheckpointManager:
  if not has_checkpoint(workdir):
    raise ValueError(f"--workdir={workdir!r} holds no checkpoints (expected {CKPT_SUBDIR}/<step>)")
  return manager(workdir, create=False)


def _pick_step(mgr, workdir: str, step: int | None) -> int:
  steps = mgr.all_steps()
  if step is None:
    return max(steps)
  if step not in steps:
    raise ValueError(f"--step={step} is not a checkpoint in {workdir!r}; valid: {sorted(steps)}")
  return step


def load_params(workdir: str, step: int | None = None, sharding=None):
  """(params, ModelConfig, step) of a checkpoint; QArray leaves are rebuilt.

  `sharding(path, shape) -> Sharding` places each array (default: the first device).
  """
  mgr = _reader(workdir)
  step = _pick_step(mgr, workdir, step)
  meta = mgr.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore())).meta
  tree = mgr.item_metadata(step)["params"].tree
  dev = jax.sharding.SingleDeviceSharding(jax.devices()[0])

  def abstract(path, m):
    s = sharding(path_str(path), tuple(m.shape)) if sharding else dev
    return jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=s)

  target = jax.tree_util.tree_map_with_path(abstract, tree)
  params = mgr.restore(step, args=ocp.args.Composite(
      params=ocp.args.StandardRestore(target))).params
  mgr.close()
  params = _rebuild_qarrays(params, meta.get("qarrays", {}))
  return params, ModelConfig.from_dict(meta["model_config"]), step

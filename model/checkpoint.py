"""Params checkpoints: the one on-disk format for float, pruned and quantized trees.

Layout of a workdir (an orbax CheckpointManager; saves are atomic: orbax writes a
temporary folder and renames it, so an interrupted save never shadows the last one):
  checkpoints/<step>/params     the tree (StandardSave; a QArray as {values, scale[, zero]},
                                an NMArray as {values, indices}, values possibly a QArray)
  checkpoints/<step>/meta       JSON: {"step", "qarrays", "nmarrays", "model_config"?, ...}
  checkpoints/<step>/opt_state  optimizer state  } train checkpoints only
  checkpoints/<step>/data       iterator state   } (scripts.train_lib)
  model_config.json             the ModelConfig of the latest save, when one is given
`meta["qarrays"]` holds the static fields of every QArray (the quantized values of
an NMArray at `.../kernel/values`) and `meta["nmarrays"]` those of every NMArray
(n, m, shape, dtype), so a quantized or N:M compressed tree loads without knowing its
structure in advance; checkpoints without "nmarrays" (older ones) hold no NMArray.
`quant.save` / `quant.restore` and the scripts write and read exactly this.

Integrity: `meta["checksums"]` holds a CRC-32 of every stored array's bytes
(`{"params": {path: crc}, "opt_state": {...}}`), written at save and verified at every
restore (`verify=False` skips it; checkpoints without checksums are not verified), and
restored params must be finite (`model.tree.check_finite`). A checkpoint that fails
either, or that orbax cannot read (truncated, partly deleted, junk meta), raises
`CheckpointError` naming its folder; with no step asked for, `load_params` /
`load_meta` / `restore_newest` fall back to the newest intact step with a one-line
warning naming each bad one, and raise only when no step is intact.
"""

from __future__ import annotations

import concurrent.futures
import gc
import json
import os
import sys
import zlib
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from model.config import ModelConfig
from model.nm_array import NMArray, is_nmarray
from model.nm_array import check as check_nmarray
from model.qarray import QArray, is_qarray
from model.tree import NonFiniteError, check_finite, flatten, is_weight_leaf

CKPT_SUBDIR = "checkpoints"
ITEMS = ("params", "opt_state", "data", "meta")


class CheckpointError(ValueError):
  """A checkpoint that cannot be used (unreadable, corrupt, non-finite); names its folder."""


def checksums(tree) -> dict[str, str]:
  """{path: CRC-32 of the array's bytes} for every array leaf (QArray / NMArray parts apart).

  Arrays not fully addressable from this process (multi-host shards) are left out: their
  bytes live on other hosts.
  """
  paths, leaves, _ = flatten(tree, is_leaf=None)
  todo = [(p, x) for p, x in zip(paths, leaves, strict=True)
          if x is not None and not (isinstance(x, jax.Array) and not x.is_fully_addressable)]

  def crc(x) -> str:
    a = np.ascontiguousarray(np.asarray(x))
    return f"{zlib.crc32(a.reshape(-1).view(np.uint8)):08x}"

  # zlib releases the GIL on large buffers: leaves hash in parallel, one per core.
  with concurrent.futures.ThreadPoolExecutor(max(1, min(len(todo), os.cpu_count() or 1))) as ex:
    return dict(zip([p for p, _ in todo], ex.map(crc, [x for _, x in todo]), strict=True))


def verify_checksums(tree, expected: dict[str, str] | None, where: str) -> None:
  """CheckpointError naming `where` and the first leaf whose bytes differ from `expected`."""
  if not expected:
    return  # written before checksums
  got, present = checksums(tree), set(flatten(tree, is_leaf=None)[0])
  for p, crc in expected.items():
    if p not in got:
      if p in present:
        continue  # not addressable from this process
      raise CheckpointError(f"{where}: stored leaf {p!r} is missing from the restored tree")
    if got[p] != crc:
      raise CheckpointError(f"{where}: leaf {p!r} fails its checksum (saved crc32 {crc}, read "
                            f"{got[p]}): the array data is corrupt")


def qarray_manifest(params) -> dict[str, dict]:
  """JSON-able static fields of every QArray (inside NMArrays too), keyed by param path."""
  paths, leaves, _ = flatten(params, is_leaf=is_qarray)  # an NMArray's are `.../values`
  return {p: dict(shape=list(q.shape), bits=q.bits, fmt=q.fmt, group_size=q.group_size,
                  dtype=jnp.dtype(q.dtype).name, act_bits=q.act_bits)
          for p, q in zip(paths, leaves, strict=True) if is_qarray(q)}


def nmarray_manifest(params) -> dict[str, dict]:
  """JSON-able static fields (n, m, shape, dtype) of every NMArray leaf, keyed by param path."""
  paths, leaves, _ = flatten(params, is_leaf=is_nmarray)
  return {p: dict(n=a.n, m=a.m, shape=list(a.shape), dtype=jnp.dtype(a.dtype).name)
          for p, a in zip(paths, leaves, strict=True) if is_nmarray(a)}


def to_state_dict(params) -> tuple[dict, dict]:
  """(the tree with plain dicts for QArray / NMArray leaves, the QArray manifest).

  A QArray becomes {values, scale[, zero]}, an NMArray {values, indices} (its values
  converted likewise). Rebuilding NMArrays also needs `nmarray_manifest(params)`.
  """
  def conv(x):
    if is_nmarray(x):
      return dict(values=conv(x.values), indices=x.indices)
    if not is_qarray(x):
      return x
    d = dict(values=x.values, scale=x.scale)
    return d if x.zero is None else dict(d, zero=x.zero)
  return jax.tree.map(conv, params, is_leaf=is_weight_leaf), qarray_manifest(params)


def from_state_dict(state: dict, manifest: dict, nm_manifest: dict | None = None):
  """Inverse of `to_state_dict`: rebuilds QArray / NMArray leaves at the paths the manifests name.

  manifest: `qarray_manifest` of the saved tree; nm_manifest: its `nmarray_manifest`
  (None or {}: the tree holds no NMArray, as in checkpoints written before NMArrays).
  """
  nm_manifest = nm_manifest or {}

  def rebuild(node, prefix):
    if prefix in nm_manifest:
      e = nm_manifest[prefix]
      if not isinstance(node, dict) or set(node) != {"values", "indices"}:
        raise ValueError(f"state at {prefix!r} is not a stored NMArray (keys values/indices)")
      a = NMArray(values=rebuild(node["values"], f"{prefix}/values"), indices=node["indices"],
                  n=int(e["n"]), m=int(e["m"]), shape=tuple(e["shape"]),
                  dtype=jnp.dtype(e["dtype"]))
      return check_nmarray(a, f"stored NMArray at {prefix!r}")
    if prefix in manifest:
      m = manifest[prefix]
      if not isinstance(node, dict) or not {"values", "scale"} <= set(node):
        raise ValueError(f"state at {prefix!r} is not a stored QArray (keys values/scale)")
      return QArray(values=node["values"], scale=node["scale"], zero=node.get("zero"),
                    shape=tuple(m["shape"]), bits=m["bits"], fmt=m["fmt"],
                    group_size=m["group_size"], dtype=jnp.dtype(m["dtype"]),
                    act_bits=m.get("act_bits"))
    if isinstance(node, dict):
      return {k: rebuild(v, f"{prefix}/{k}" if prefix else str(k)) for k, v in node.items()}
    return node
  out = rebuild(state, "")
  missing = set(manifest) - set(qarray_manifest(out))
  if missing:
    raise ValueError(f"QArray metadata names paths absent from the state: {sorted(missing)}")
  missing = set(nm_manifest) - set(nmarray_manifest(out))
  if missing:
    raise ValueError(f"NMArray metadata names paths absent from the state: {sorted(missing)}")
  return out


def manager(workdir: str, keep: int | None = None, create: bool = True) -> ocp.CheckpointManager:
  """A synchronous CheckpointManager over `workdir/checkpoints` keeping `keep` steps."""
  handlers = {"params": ocp.StandardCheckpointHandler(),
              "opt_state": ocp.StandardCheckpointHandler(),
              "data": ocp.JsonCheckpointHandler(), "meta": ocp.JsonCheckpointHandler()}
  options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=create,
                                         enable_async_checkpointing=False)
  return ocp.CheckpointManager(os.path.abspath(os.path.join(workdir, CKPT_SUBDIR)),
                               options=options, item_handlers=handlers)


def save(mgr: ocp.CheckpointManager, step: int, params, *, model_cfg: ModelConfig | None = None,
         meta: dict | None = None, opt_state=None, data_state: dict | None = None) -> None:
  """Saves one checkpoint: params + meta, and opt_state / data state when given."""
  full_meta = {"step": int(step), "qarrays": qarray_manifest(params),
               "nmarrays": nmarray_manifest(params), **(meta or {})}
  full_meta["checksums"] = {"params": checksums(params)}
  if opt_state is not None:
    full_meta["checksums"]["opt_state"] = checksums(opt_state)
  if model_cfg is not None:
    full_meta["model_config"] = model_cfg.to_dict()
  items = {"params": ocp.args.StandardSave(params), "meta": ocp.args.JsonSave(full_meta)}
  if opt_state is not None:
    items["opt_state"] = ocp.args.StandardSave(opt_state)
  if data_state is not None:
    items["data"] = ocp.args.JsonSave(data_state)
  mgr.save(int(step), args=ocp.args.Composite(**items), force=True)
  mgr.wait_until_finished()
  if model_cfg is not None:
    _write_json(os.path.join(os.path.dirname(mgr.directory), "model_config.json"),
                model_cfg.to_dict())


def _write_json(path: str, obj) -> None:
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    json.dump(obj, f, indent=2)
  os.replace(tmp, path)


def save_params(workdir: str, params, *, model_cfg: ModelConfig | None = None, step: int = 0,
                meta: dict | None = None, replace: bool = False) -> str:
  """Saves a params-only checkpoint (a pruned, quantized or imported model); returns its folder.

  replace: an existing checkpoint at `step` is deleted first (for outputs derived again
  on a resumed run; a kill in between leaves no checkpoint at `step`, never a partial
  one). Without it an existing step is an error.
  """
  mgr = manager(workdir)
  if replace and step in mgr.all_steps():
    mgr.delete(step)
  save(mgr, step, params, model_cfg=model_cfg, meta=meta)
  mgr.close()
  return os.path.join(mgr.directory, str(step))


def has_checkpoint(workdir: str) -> bool:
  """Whether `workdir/checkpoints` holds a finished checkpoint (read-only check)."""
  d = os.path.join(workdir, CKPT_SUBDIR)
  return os.path.isdir(d) and any(n.isdigit() for n in os.listdir(d))


def _reader(workdir: str) -> ocp.CheckpointManager:
  if not has_checkpoint(workdir):
    raise ValueError(f"--workdir={workdir!r} holds no checkpoints (expected {CKPT_SUBDIR}/<step>)")
  return manager(workdir, create=False)


def verify_restored(where: str, meta: dict, **items) -> None:
  """The integrity check of one restored step: each item's arrays against the checksums
  `meta` records for it (`params`, `opt_state`), and the params finite."""
  sums = (meta or {}).get("checksums", {})
  for name, tree in items.items():
    verify_checksums(tree, sums.get(name), where)
  check_finite(items["params"], where)


def _one_line(e: BaseException) -> str:
  """`Type: first line of the message` (orbax / tensorstore errors run to dozens of lines,
  the first ending in a dump of the TensorStore spec)."""
  text = str(e).strip().splitlines()
  first = text[0].split(" See full TensorStore details")[0] if text else ""
  return f"{type(e).__name__}: {first}".rstrip(": ")


def _collect_failed_reads() -> None:
  """Collects the coroutines a failed orbax read leaves behind, quietly: each would print
  "Exception ignored in <coroutine ...>" and its traceback when collected at exit."""
  hook = sys.unraisablehook
  sys.unraisablehook = lambda _: None
  try:
    gc.collect()
  finally:
    sys.unraisablehook = hook


def warn(message: str) -> None:
  """One `warning: ...` line on stderr (the CLIs keep library logging at WARNING)."""
  print(f"warning: {message}", file=sys.stderr, flush=True)


def restore_newest(mgr: ocp.CheckpointManager, restore: Callable[[int], object], *,
                   step: int | None = None, what: str = "checkpoint"):
  """(step, restore(step)) for `step`, or else for the newest step `restore` succeeds on.

  `restore(step)` reads and verifies one step; any exception it raises marks the step bad
  (orbax raises bare Exception / KeyError / tensorstore errors for damaged files). With
  `step` given, a bad step is a CheckpointError; otherwise each bad step is skipped with a
  one-line warning, and a CheckpointError names the folder when none is intact.
  (None, None) when the folder holds no step at all.
  """
  where = str(mgr.directory)
  try:
    steps = sorted(mgr.all_steps(), reverse=True)
  except Exception as e:  # noqa: BLE001 (orbax's listing errors are not typed)
    raise CheckpointError(f"{where}: cannot list checkpoints ({_one_line(e)})") from None
  if step is not None:
    if step not in steps:
      raise ValueError(f"--step={step} is not a checkpoint in {where!r}; valid: {sorted(steps)}")
    steps = [step]
  bad = []
  for s in steps:
    try:
      return s, restore(s)
    except Exception as e:  # noqa: BLE001 (see the docstring)
      _collect_failed_reads()
      named = isinstance(e, (CheckpointError, NonFiniteError))  # these name the folder
      reason = str(e) if named else f"{where}/{s}: {_one_line(e)}"
      if step is not None:
        raise CheckpointError(f"{what} step {s} is unusable: {reason}") from None
      bad.append(f"step {s}: {reason}")
      warn(f"skipping {what} step {s} in {where}: {reason}")
  if bad:
    raise CheckpointError(f"no intact {what} in {where} ({len(bad)} step(s) unusable; newest: "
                          f"{bad[0]})")
  return None, None


def _restore_meta(mgr, step: int) -> dict:
  meta = mgr.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore())).meta
  if not isinstance(meta, dict):
    raise CheckpointError(f"{mgr.directory}/{step}/meta holds no JSON object")
  return meta


def load_meta(workdir: str, step: int | None = None) -> dict:
  """The meta JSON of a checkpoint (the newest readable step by default)."""
  mgr = _reader(workdir)
  try:
    found, meta = restore_newest(mgr, lambda s: _restore_meta(mgr, s), step=step)
  finally:
    mgr.close()
  if found is None:
    raise CheckpointError(f"--workdir={workdir!r} holds no finished checkpoint")
  return meta


def _restore_params(mgr, step: int, target, sharding, verify: bool):
  where = f"{mgr.directory}/{step}"
  meta = _restore_meta(mgr, step)
  rebuild = target is None  # a given target already holds the QArrays / NMArrays
  if rebuild:
    dev = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    paths, stored, treedef = flatten(mgr.item_metadata(step)["params"].tree, is_leaf=None)
    target = jax.tree_util.tree_unflatten(treedef, [
        jax.ShapeDtypeStruct(m.shape, m.dtype,
                             sharding=sharding(p, tuple(m.shape)) if sharding else dev)
        for p, m in zip(paths, stored, strict=True)])
  params = mgr.restore(step, args=ocp.args.Composite(
      params=ocp.args.StandardRestore(target))).params
  if verify:
    verify_restored(where, meta, params=params)
  if rebuild:
    params = from_state_dict(params, meta.get("qarrays", {}), meta.get("nmarrays", {}))
  return params, meta


def load_params(workdir: str, step: int | None = None, *, target=None, sharding=None,
                verify: bool = True) -> tuple[dict, dict, int]:
  """(params with QArray / NMArray leaves rebuilt, meta, step) of a checkpoint.

  step: None takes the newest intact step (bad newer ones are skipped with a warning).
  target: an abstract tree (e.g. `quant.abstract_quantize`, or one with
    `model.nm_array.abstract_compress_nm` leaves; possibly with shardings) restored into
    directly. sharding: `(path, shape) -> Sharding` placing each array otherwise
    (default: the first device). verify: check the saved checksums and finiteness.
  """
  mgr = _reader(workdir)
  try:
    step, found = restore_newest(
        mgr, lambda s: _restore_params(mgr, s, target, sharding, verify), step=step)
  finally:
    mgr.close()
  if found is None:
    raise CheckpointError(f"--workdir={workdir!r} holds no finished checkpoint")
  return *found, step


def model_config(meta: dict, workdir: str = "") -> ModelConfig:
  """The ModelConfig a checkpoint's meta records."""
  if "model_config" not in meta:
    raise ValueError(f"the checkpoint in {workdir!r} records no model_config (written by "
                     "quant.save without model_cfg?); pass the ModelConfig yourself")
  return ModelConfig.from_dict(meta["model_config"])

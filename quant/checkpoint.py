"""Saving and restoring quantized param trees with orbax.

orbax saves a tree with QArray leaves as-is (a QArray is a registered
dataclass), but QArray's static fields (logical shape, bits, format, group
size, dtype) are pytree metadata, not arrays, so a restore without a target
returns plain dicts. `save` therefore writes `quant.json` (recipe, per-leaf
QArray metadata, report) next to the arrays, and `restore` rebuilds the
QArrays from it. With a known recipe, `transform.abstract_quantize` gives an
orbax restore target directly (the route for sharded restores).
"""

from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp

from quant.qarray import QArray, is_qarray
from quant.transform import path_str

META_FILE = "quant.json"
ARRAYS_DIR = "params"


def qarray_metadata(params) -> dict:
  """JSON-able static metadata of every QArray leaf, keyed by param path."""
  flat = jax.tree_util.tree_flatten_with_path(params, is_leaf=is_qarray)[0]
  return {path_str(kp): dict(shape=list(q.shape), bits=q.bits, fmt=q.fmt,
                             group_size=q.group_size, dtype=jnp.dtype(q.dtype).name)
          for kp, q in flat if is_qarray(q)}


def to_state_dict(params) -> tuple[dict, dict]:
  """Splits a tree into (plain nested dict of arrays, QArray metadata); QArray -> dict."""
  def conv(q):
    if not is_qarray(q):
      return q
    d = dict(values=q.values, scale=q.scale)
    return d if q.zero is None else dict(d, zero=q.zero)
  return jax.tree.map(conv, params, is_leaf=is_qarray), qarray_metadata(params)


def from_state_dict(state: dict, meta: dict):
  """Inverse of `to_state_dict`: rebuilds QArray leaves at the paths named in `meta`."""
  def rebuild(node, prefix):
    if prefix in meta:
      m = meta[prefix]
      if not isinstance(node, dict) or not {"values", "scale"} <= set(node):
        raise ValueError(f"state at {prefix!r} is not a stored QArray (keys values/scale)")
      return QArray(values=node["values"], scale=node["scale"], zero=node.get("zero"),
                    shape=tuple(m["shape"]), bits=m["bits"], fmt=m["fmt"],
                    group_size=m["group_size"], dtype=jnp.dtype(m["dtype"]))
    if isinstance(node, dict):
      return {k: rebuild(v, f"{prefix}/{k}" if prefix else str(k)) for k, v in node.items()}
    return node
  out = rebuild(state, "")
  missing = set(meta) - set(qarray_metadata(out))
  if missing:
    raise ValueError(f"QArray metadata names paths absent from the state: {sorted(missing)}")
  return out


def save(directory: str, params, *, recipe: str | None = None, report: dict | None = None):
  """Writes params (with QArray leaves) under `directory/params` and `directory/quant.json`."""
  directory = os.path.abspath(directory)
  os.makedirs(directory, exist_ok=True)
  with ocp.StandardCheckpointer() as ckptr:
    ckptr.save(os.path.join(directory, ARRAYS_DIR), params)
    ckptr.wait_until_finished()
  info = dict(recipe=recipe, qarrays=qarray_metadata(params), report=report)
  with open(os.path.join(directory, META_FILE), "w") as f:
    json.dump(info, f, indent=1)


def restore(directory: str, target=None) -> tuple[dict, dict]:
  """Reads a tree written by `save`; returns (params with QArray leaves, quant.json contents).

  `target` (e.g. from `abstract_quantize`, possibly with shardings) restores directly into
  that structure; without it the QArrays are rebuilt from the stored metadata.
  """
  directory = os.path.abspath(directory)
  meta_path = os.path.join(directory, META_FILE)
  if not os.path.exists(meta_path):
    raise ValueError(f"directory={directory!r} has no {META_FILE}; not a quant.save checkpoint")
  with open(meta_path) as f:
    info = json.load(f)
  with ocp.StandardCheckpointer() as ckptr:
    state = ckptr.restore(os.path.join(directory, ARRAYS_DIR), target)
  if target is None:
    state = from_state_dict(state, info["qarrays"])
  return state, info

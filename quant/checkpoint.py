"""Saving and restoring quantized param trees: `model.checkpoint`'s one format, plus the recipe.

`save(directory, params, recipe=, report=)` writes an ordinary params checkpoint
(`directory/checkpoints/0/{params,meta}`, the layout the scripts write and read)
whose meta also holds the recipe and report; `restore` rebuilds the QArrays from
the manifest in that meta, or restores straight into a `target` (e.g. from
`transform.abstract_quantize`, the route for sharded restores). Folders written
by the older `quant.save` (`params/` + `quant.json`) still restore.
"""

from __future__ import annotations

import json
import os

import orbax.checkpoint as ocp

from model import checkpoint as ckpt
from model.config import ModelConfig

LEGACY_META = "quant.json"


def save(directory: str, params, *, recipe: str | None = None, report: dict | None = None,
         model_cfg: ModelConfig | None = None, step: int = 0) -> str:
  """Writes params (with QArray leaves) as a params checkpoint; returns its folder."""
  return ckpt.save_params(directory, params, model_cfg=model_cfg, step=step,
                          meta=dict(recipe=recipe, report=report))


def restore(directory: str, target=None) -> tuple[dict, dict]:
  """Reads a tree written by `save`: (params with QArray leaves, the checkpoint's meta).

  The meta holds `recipe`, `report` and `qarrays` (the per-leaf QArray fields).
  """
  directory = os.path.abspath(directory)
  if os.path.exists(os.path.join(directory, LEGACY_META)):
    return _restore_legacy(directory, target)
  if not ckpt.has_checkpoint(directory):
    raise ValueError(f"directory={directory!r} holds no quantized checkpoint (expected "
                     f"{ckpt.CKPT_SUBDIR}/<step>, as written by quant.save)")
  params, meta, _ = ckpt.load_params(directory, target=target)
  return params, meta


def _restore_legacy(directory: str, target):
  with open(os.path.join(directory, LEGACY_META)) as f:
    info = json.load(f)
  with ocp.StandardCheckpointer() as ckptr:
    state = ckptr.restore(os.path.join(directory, "params"), target)
  if target is None:
    state = ckpt.from_state_dict(state, info["qarrays"])
  return state, info

"""Quantized trees survive orbax save / restore (quant.save, checkpoint_lib, scripts.quantize)."""

import json
import os

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

import model
import quant
from scripts import checkpoint_lib, quantize_lib

RULES = [(r"attn/q/", "int4:g16:asym"), (r"attn/k/", "fp8"), (r"mlp/", "int2:g32"),
         (r"kernel$", "int8")]


def _assert_same_tree(a, b):
  assert jax.tree.structure(a, is_leaf=quant.is_qarray) == jax.tree.structure(
      b, is_leaf=quant.is_qarray)  # QArray static fields are part of the treedef
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
    assert x.dtype == y.dtype
    np.testing.assert_array_equal(np.asarray(x, np.float32), np.asarray(y, np.float32))


def test_save_restore_round_trip(tmp_path, cfg, params):
  q, report = quant.quantize(params, RULES)
  quant.save(str(tmp_path / "q"), q, recipe=None, report=report)
  restored, info = quant.restore(str(tmp_path / "q"))
  _assert_same_tree(restored, q)
  assert info["report"]["n_quantized"] == 14
  assert info["qarrays"]["layers_1/attn/q/kernel"] == dict(
      shape=[64, 64], bits=4, fmt="int", group_size=16, dtype="float32", act_bits=None)
  # A target from abstract_quantize restores straight into QArrays (the sharded route).
  target = quant.abstract_quantize(model.param_shapes(cfg), RULES)
  direct, _ = quant.restore(str(tmp_path / "q"), target)
  _assert_same_tree(direct, q)


def test_state_dict_round_trip_and_bad_metadata(params):
  q, _ = quant.quantize(params, RULES)
  state, meta = quant.to_state_dict(q)
  assert not any(quant.is_qarray(x) for x in jax.tree.leaves(state, is_leaf=quant.is_qarray))
  assert set(state["layers_0"]["attn"]["q"]["kernel"]) == {"values", "scale", "zero"}
  _assert_same_tree(quant.from_state_dict(state, json.loads(json.dumps(meta))), q)
  with pytest.raises(ValueError, match="absent from the state"):
    quant.from_state_dict(state, {**meta, "layers_7/attn/q/kernel": meta[next(iter(meta))]})
  with pytest.raises(ValueError, match="not a stored QArray"):
    quant.from_state_dict(state, {"layers_0/attn_norm/scale": meta[next(iter(meta))]})


def test_quantize_checkpoint_script_library(tmp_path, cfg, params):
  src, out = str(tmp_path / "float"), str(tmp_path / "int4")
  checkpoint_lib.save_params(src, params, cfg, step=7)
  with pytest.raises(ValueError, match="unknown format 'int5'"):
    quantize_lib.quantize_checkpoint(src, out, "int5")
  with pytest.raises(ValueError, match="must differ from --workdir"):
    quantize_lib.quantize_checkpoint(src, src, "int8")
  with pytest.raises(ValueError, match="matches no param path"):
    quantize_lib.quantize_checkpoint(src, out, [(r"layers_5/", "int8")])
  assert not os.path.exists(out)  # bad input wrote nothing
  result = quantize_lib.quantize_checkpoint(src, out, "int4:g32")
  loaded, loaded_cfg, step = checkpoint_lib.load_params(out)
  assert (loaded_cfg, step) == (cfg, 7)
  _assert_same_tree(loaded, quant.quantize(params, "int4:g32")[0])
  with open(result["report_path"]) as f:
    report = json.load(f)
  assert report["recipe"] == "int4:g32" and report["bytes_after"] == model.tree_nbytes(loaded)
  # Packed on disk too: the int4 checkpoint is well under the float one's bytes.
  float_disk = quantize_lib._disk_bytes(os.path.join(src, "checkpoints"))
  assert 0 < report["disk_bytes"] < 0.5 * float_disk


def test_legacy_quant_save_folder_still_restores(tmp_path, params):
  """Folders of the earlier quant.save (params/ + quant.json) load into the same QArrays."""
  q, _ = quant.quantize(params, RULES)
  folder = tmp_path / "legacy"
  folder.mkdir()
  with ocp.StandardCheckpointer() as ckptr:
    ckptr.save(str(folder / "params"), q)
    ckptr.wait_until_finished()
  (folder / "quant.json").write_text(json.dumps(dict(recipe=None,
                                                     qarrays=quant.qarray_manifest(q))))
  restored, info = quant.restore(str(folder))
  _assert_same_tree(restored, q)
  assert info["qarrays"] == quant.qarray_manifest(q)

"""scripts/prune.py: checkpoint in, pruned checkpoint + JSON report out; bad input fails early."""

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

import model
from model import convert
from scripts import checkpoint_lib
from scripts import prune_lib as prune_script

CFG = model.get_preset("test")
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture(scope="module")
def run_dir(params, tmp_path_factory):
  d = str(tmp_path_factory.mktemp("run"))
  checkpoint_lib.save_params(d, params, CFG, step=3)
  return d


def test_prune_checkpoint_roundtrip(run_dir, tmp_path):
  out = str(tmp_path / "pruned")
  report = prune_script.prune_checkpoint(run_dir, "magnitude:0.5", out,
                                         rules=["mlp/down=none"])
  params, cfg, step = checkpoint_lib.load_params(out)
  assert cfg == CFG and step == 3
  for name in ("q", "k", "v", "o"):
    w = np.asarray(params["layers_1"]["attn"][name]["kernel"])
    assert (w == 0).sum() == w.size // 2
  assert (np.asarray(params["layers_1"]["mlp"]["down"]["kernel"]) != 0).all()
  with open(os.path.join(out, prune_script.REPORT_NAME)) as f:
    saved = json.load(f)
  assert saved["totals"] == report["totals"] and saved["rules"] == [["mlp/down", None]]
  assert checkpoint_lib.load_meta(out)["prune"]["recipe"] == "magnitude:0.5"


@pytest.mark.parametrize("recipe,out,match", [
    ("magnitude:1.5", "new", r"\[0, 1\)"),
    ("bogus:0.5", "new", "valid: magnitude"),
    ("magnitude:0.5", "RUN", "must differ"),
    ("magnitude:0.5", "afile/sub", "not writable"),
])
def test_bad_input_writes_nothing(run_dir, tmp_path, recipe, out, match):
  (tmp_path / "afile").write_text("")
  out = run_dir if out == "RUN" else str(tmp_path / out)
  with pytest.raises(ValueError, match=match):
    prune_script.prune_checkpoint(run_dir, recipe, out)
  assert sorted(os.listdir(tmp_path)) == ["afile"]


def test_missing_checkpoint(tmp_path):
  with pytest.raises(ValueError, match="--workdir=.*empty does not exist"):
    prune_script.prune_checkpoint(str(tmp_path / "empty"), "magnitude:0.5", str(tmp_path / "o"))


def test_cli_bad_sparsity_exits_nonzero(tmp_path):
  out = tmp_path / "o"
  proc = subprocess.run(
      [sys.executable, "-m", "scripts.prune", f"--workdir={tmp_path}", "--prune=magnitude:1.0",
       f"--out={out}"], cwd=ROOT, capture_output=True, text=True, timeout=120,
      env={**os.environ, "JAX_PLATFORMS": "cpu"})
  assert proc.returncode != 0
  assert "outside the valid range [0, 1)" in proc.stderr
  assert not out.exists()


def test_prunes_a_hugging_face_folder(params, tmp_path):
  hf = str(tmp_path / "hf")
  convert.export_hf(CFG, params, hf)
  out = str(tmp_path / "out")
  report = prune_script.prune_checkpoint(hf, "sparsegpt:2:4", out, calib_seqs=2, calib_len=16)
  pruned, cfg, _ = checkpoint_lib.load_params(out)
  assert cfg == CFG and report["totals"]["masked_sparsity"] == 0.5
  up = np.asarray(pruned["layers_0"]["mlp"]["up"]["kernel"]).reshape(-1, 4, CFG.ffn_dim)
  assert ((up != 0).sum(axis=1) <= 2).all()


def test_nan_weights_fail_before_anything_is_written(params, tmp_path):
  src = str(tmp_path / "src")
  bad = jax.tree.map(lambda x: x, params)
  bad["layers_0"]["mlp"]["down"]["kernel"] = bad["layers_0"]["mlp"]["down"]["kernel"].at[1, 1].set(
      np.inf)
  checkpoint_lib.save_params(src, bad, CFG, step=1)
  for recipe in ("magnitude:0.5", "wanda:0.5"):
    out = tmp_path / f"out_{recipe.split(':')[0]}"
    with pytest.raises(ValueError, match="layers_0/mlp/down/kernel' holds 1 non-finite"):
      prune_script.prune_checkpoint(src, recipe, str(out), calib_seqs=2, calib_len=16)
    assert not out.exists()

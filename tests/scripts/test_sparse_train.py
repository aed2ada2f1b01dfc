"""Sparse training through the trainer config: masks in checkpoints, exact resume, bad input."""

import json
import os
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest

import model
import sparsity
from scripts import checkpoint_lib, sparse_train_lib
from scripts.configs.train import sparse as sparse_config
from sparsity import distributions as dist
from sparsity import schedules

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
KERNELS = ("layers_0/attn/q/kernel", "layers_0/mlp/up/kernel")


def tiny_config(base, **sparsity_kw):
  """The "test" preset, one layer, seq 32, batch 8, 6 steps with checkpoints at 3 and 6."""
  c = sparse_config.get_config(f"{base},test")
  c.unlock()
  c.model.n_layers = 1
  c.data.seq_len, c.data.batch_size = 32, 8
  c.train.update(steps=6, log_every=1, eval_every=0, eval_batches=1)
  c.ckpt.update(every=3, keep=5)
  c.opt.update(lr=1e-2, warmup_steps=2, min_lr_ratio=0.5)
  c.sparsity.update(dict(sparsity=0.5, update_every=2, end_step=4, drop_fraction=0.5),
                    **sparsity_kw)
  c.lock()
  return c


def _leaf(tree, path):
  for k in path.split("/"):
    tree = tree[k]
  return np.asarray(tree)


def _expected_pruned(method, model_cfg, level=0.5):
  """Per kernel: `level` (gradual, uniform) or ERK counts at 50% overall (rigl's default)."""
  paths, leaves, _ = model.flatten(model.param_shapes(model_cfg))
  spec = sparsity.resolve(paths)
  shapes = {p: tuple(x.shape) for p, x in zip(paths, leaves, strict=True)
            if spec[p] == sparsity.PRUNE}
  name = "erk" if method == "rigl" else "uniform"
  return dist.prune_counts(shapes, dist.densities(name, shapes, 0.5 if name == "erk" else level))


@pytest.fixture(scope="module", params=["gradual", "rigl"])
def run(request, tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp(request.param) / "a")
  config = tiny_config(request.param)
  return request.param, config, workdir, sparse_train_lib.train_sparse(config, workdir)


def test_masks_are_in_the_checkpoint_and_exact(run):
  method, config, workdir, result = run
  hooks = sparse_train_lib.hooks_from_config(config.sparsity, model.param_shapes(
      result.model_cfg), steps=6)
  masks = sparse_train_lib.final_masks(config, workdir, hooks, result.model_cfg)
  want = _expected_pruned(method, result.model_cfg)
  for path in KERNELS:
    m, w = _leaf(masks, path), _leaf(result.params, path)
    assert int((~m).sum()) == want[path]
    assert (w[~m] == 0).all() and (w[m] != 0).mean() > 0.95
  s = json.load(open(os.path.join(workdir, "summary.json")))["sparsity"]
  assert s["method"] == method and s["mask_sparsity"] == pytest.approx(0.5, abs=1e-3)
  assert s["weight_sparsity"] >= s["mask_sparsity"]
  assert set(s["layers"]) >= set(KERNELS)
  params, _, step = checkpoint_lib.load_params(workdir)
  assert step == 6
  jax.tree.map(np.testing.assert_array_equal, params, result.params)
  meta = checkpoint_lib.load_meta(workdir)
  assert meta["sparsity"]["method"] == method


def test_kill_and_resume_is_bit_identical(run, tmp_path):
  method, config, workdir, result = run
  resumed = str(tmp_path / "b")
  shutil.copytree(workdir, resumed)
  shutil.rmtree(os.path.join(resumed, "checkpoints", "6"))  # "killed" after the step-3 save
  out = sparse_train_lib.train_sparse(config, resumed)
  jax.tree.map(np.testing.assert_array_equal, out.params, result.params)
  assert out.summary["sparsity"] == result.summary["sparsity"]


def test_step_3_checkpoint_masks_follow_the_schedule(run):
  method, config, workdir, result = run
  hooks = sparse_train_lib.hooks_from_config(config.sparsity, model.param_shapes(
      result.model_cfg), steps=6)
  scratch = workdir + "_step3"
  shutil.copytree(workdir, scratch)
  shutil.rmtree(os.path.join(scratch, "checkpoints", "6"))
  masks = sparse_train_lib.final_masks(config, scratch, hooks, result.model_cfg)
  # By step 3 the last mask update had count 2 (rigl: constant ERK sparsity).
  s = schedules.cubic_sparsity(2, initial=0.0, final=0.5, begin_step=0, end_step=4,
                              every=2)
  want = _expected_pruned(method, result.model_cfg, s)
  for path in KERNELS:
    assert int((~_leaf(masks, path)).sum()) == want[path]


@pytest.mark.parametrize("kw,match", [
    (dict(method="magic"), "config.sparsity.method='magic'"),
    (dict(end_step=9), r"config.sparsity.end_step=9; valid: 0 \(begin_step\) .. 5"),
    (dict(end_step=5), "end_step=5 must be begin_step=0 plus a multiple of every=2"),
    (dict(sparsity=1.2), "config.sparsity.sparsity=1.2"),
    (dict(rules="nothing_matches=none"), "nothing_matches"),
    (dict(scope="everywhere"), "scope='everywhere'"),
])
def test_bad_sparsity_config_fails_before_writing(tmp_path, kw, match):
  workdir = tmp_path / "w"
  with pytest.raises(ValueError, match=match):
    sparse_train_lib.train_sparse(tiny_config("gradual", **kw), str(workdir))
  assert not workdir.exists()


def test_cli_dispatches_sparse_configs(tmp_path):
  workdir = tmp_path / "cli"
  proc = subprocess.run(
      [sys.executable, "-m", "scripts.train", "--config=scripts/configs/train/sparse.py:rigl,test",
       "--config.sparsity.end_step=5000", f"--workdir={workdir}"],
      cwd=ROOT, capture_output=True, text=True, timeout=120)
  assert proc.returncode == 2 and "config.sparsity.end_step=5000" in proc.stderr
  assert not workdir.exists()


def test_polarization_trains_gates_and_writes_the_shrunk_model(tmp_path):
  config = tiny_config("polarization", sparsity=0.5, polarization_strength=0.1)
  result = sparse_train_lib.train(config, str(tmp_path / "run"))
  rep = result.summary["sparsity"]
  ffn = model.get_preset("test").ffn_dim
  assert rep["method"] == "polarization" and rep["ffn_dim_after"] == ffn // 2
  small, small_cfg, _ = checkpoint_lib.load_params(rep["path"])
  assert small_cfg.ffn_dim == ffn // 2
  assert small["layers_0"]["mlp"]["down"]["kernel"].shape[0] == small_cfg.ffn_dim
  trained, _, _ = checkpoint_lib.load_params(str(tmp_path / "run"))
  gates = np.asarray(trained["neuron_gates"]["layers_0"])
  assert not np.allclose(gates, 1.0)  # the gates trained

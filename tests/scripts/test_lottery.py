"""Lottery tickets: densities (1 - p)^r, controls, rewinding, resume skips finished rounds."""

import json
import os

import jax
import numpy as np
import pytest

import model
import sparsity
from scripts import checkpoint_lib, lottery_lib, train_lib


def tiny_config(rounds, **lottery):
  c = lottery_lib.default_config("test")
  c.model.n_layers = 1
  c.data.update(seq_len=32, batch_size=8)
  c.train.update(steps=4, log_every=2, eval_batches=1)
  c.ckpt.update(every=2, keep=2)
  c.opt.update(lr=1e-2, warmup_steps=1)
  c.lottery.update(dict(rounds=rounds, prune_fraction=0.5, rewind_step=2), **lottery)
  return c


def _masks(workdir, r, like):
  return lottery_lib.load_masks(os.path.join(workdir, f"round_{r}", "masks.npz"), like)


def test_rounds_controls_and_resume(tmp_path, monkeypatch):
  workdir = str(tmp_path / "lt")
  first = lottery_lib.run(tiny_config(1), workdir)
  assert [r["round"] for r in first] == [0, 1]

  calls = []
  real = train_lib.train_and_evaluate
  monkeypatch.setattr(train_lib, "train_and_evaluate",
                      lambda c, w, **kw: calls.append(os.path.basename(w)) or real(c, w, **kw))
  records = lottery_lib.run(tiny_config(2), workdir)
  assert calls == ["ticket", "random_reinit", "random_mask"]  # rounds 0 and 1 were skipped
  assert records[:2] == first
  lines = [json.loads(x) for x in open(os.path.join(workdir, "results.jsonl"))]
  assert lines == records and len(lines) == 3

  trained, cfg, _ = checkpoint_lib.load_params(os.path.join(workdir, "round_0", "dense"))
  prunable = sum(x.size for p, x in zip(*model.flatten(trained)[:2], strict=True)
                 if sparsity.resolve([p])[p] == sparsity.PRUNE)
  for rec in records[1:]:
    r = rec["round"]
    assert rec["density"] == pytest.approx(0.5 ** r, abs=1 / prunable)
    for key in ("ticket_val_bpb", "random_reinit_val_bpb", "random_mask_val_bpb"):
      assert np.isfinite(rec[key]) and rec[key] > 0
  m1, m2 = _masks(workdir, 1, trained), _masks(workdir, 2, trained)
  for a, b in zip(jax.tree.leaves(m1), jax.tree.leaves(m2), strict=True):
    assert not (np.asarray(b) & ~np.asarray(a)).any()  # round 2 prunes only survivors

  # The rewind weights are the dense run's step-2 weights (its step-2 checkpoint).
  rewind, _, step = checkpoint_lib.load_params(os.path.join(workdir, "round_0", "rewind"))
  at2, _, _ = checkpoint_lib.load_params(os.path.join(workdir, "round_0", "dense"), step=2)
  assert step == 2
  jax.tree.map(np.testing.assert_array_equal, rewind, at2)
  # The ticket's first step started from them, masked: its pruned weights are zero.
  ticket, _, _ = checkpoint_lib.load_params(os.path.join(workdir, "round_2", "ticket"))
  w = ticket["layers_0"]["mlp"]["up"]["kernel"]
  m = m2["layers_0"]["mlp"]["up"]["kernel"]
  assert (np.asarray(w)[~np.asarray(m)] == 0).all()


def test_bad_lottery_config(tmp_path):
  with pytest.raises(ValueError, match=r"config.lottery.prune_fraction=1.5; valid: \(0, 1\)"):
    lottery_lib.run(tiny_config(1, prune_fraction=1.5), str(tmp_path / "w"))
  with pytest.raises(ValueError, match="config.lottery.rewind_step=9; valid: 0 .. 3"):
    lottery_lib.run(tiny_config(1, rewind_step=9), str(tmp_path / "w"))
  assert not (tmp_path / "w").exists()

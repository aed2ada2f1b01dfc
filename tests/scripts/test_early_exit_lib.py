"""Early-exit distillation through the one trainer: only the head trains, it resumes."""

import jax
import numpy as np

import model
from decoding import early_exit
from scripts import checkpoint_lib, early_exit_lib, metrics_lib

CFG = model.get_preset("test")


def test_head_distils_through_the_trainer_and_resumes(tmp_path):
  target = str(tmp_path / "target")
  params = model.init(CFG, jax.random.key(0))
  checkpoint_lib.save_params(target, params, CFG, step=0)
  out = str(tmp_path / "exit")
  kw = dict(exit_layer=1, steps=6, batch_size=4, seq_len=32, lr=3e-2, log=lambda s: None)
  summary = early_exit_lib.train_exit_head(target, out, **kw)
  assert summary["step"] == 6 and {"val_kl", "val_agree"} <= set(summary)
  trained, cfg, step = checkpoint_lib.load_params(out)
  assert (cfg, step) == (CFG, 6) and checkpoint_lib.load_meta(out)["exit_layer"] == 1
  # The target is frozen: every one of its leaves is bit-identical; the head moved.
  jax.tree.map(np.testing.assert_array_equal, early_exit.model_params(trained), params)
  assert float(np.abs(trained["exit_head"]["proj"]["kernel"]).sum()) > 0
  assert summary["val_kl"] < summary["val_kl_before"]  # the head learned
  assert len(metrics_lib.read_metrics(out, "train")) == 1  # logged at the last step
  # A rerun finds the finished run and trains nothing more.
  again = early_exit_lib.train_exit_head(target, out, **kw)
  assert again["val_kl"] == summary["val_kl"]
  assert again["val_kl_before"] == summary["val_kl_before"]
  assert len(metrics_lib.read_metrics(out, "train")) == 1

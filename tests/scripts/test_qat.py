"""QAT through the trainer config: fake-quant eval == exported model, exact resume, bad input."""

import json
import os
import shutil

import jax
import numpy as np
import pytest

from scripts import checkpoint_lib, data_lib, eval_lib, qat_lib
from scripts.configs.train import qat as qat_config


def tiny_config(variant="int4_a8", **qat_kw):
  """The "test" preset, seq 32, batch 8, 4 steps with checkpoints at 2 and 4."""
  c = qat_config.get_config(f"{variant},test")
  c.unlock()
  c.data.seq_len, c.data.batch_size = 32, 8
  c.train.update(steps=4, log_every=1, eval_every=0, eval_batches=2)
  c.ckpt.update(every=2, keep=5)
  c.opt.update(lr=1e-2, warmup_steps=1)
  c.qat.update({"calib_batches": 1, **qat_kw})
  c.lock()
  return c


@pytest.fixture(scope="module")
def run(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("qat") / "a")
  config = tiny_config("int4", rules="mlp/down=int8", act_bits=8)
  return config, workdir, qat_lib.train_qat(config, workdir)


def test_run_exports_the_model_its_eval_measured(run):
  config, workdir, result = run
  s = json.load(open(os.path.join(workdir, "summary.json")))
  q = s["qat"]
  assert q["n_fake_quant"] == 14 and len(q["act_ranges"]) == 14
  assert all(v > 0 for v in q["act_ranges"].values())
  assert q["bit_ops_per_token"]["quantized"] < q["bit_ops_per_token"]["float"] / 4
  params, _, step = checkpoint_lib.load_params(q["exported"]["quantized"])
  assert step == 4
  down = params["layers_0"]["mlp"]["down"]["kernel"]
  assert (down.bits, params["layers_0"]["attn"]["q"]["kernel"].bits) == (8, 4)
  # Weight-only: the fake-quant model's bpb is the exported QArray model's bpb.
  wo = qat_lib.build(config.qat, result.model_cfg, result.params)
  assert wo.act_bits == 8
  wo = qat_lib.QATModel(weights=wo.weights)
  d = config.data
  batches = list(data_lib.eval_batches(data_lib.load_split(d, "val"), d.batch_size, d.seq_len,
                                       2))
  fake = wo.evaluate(result.model_cfg, result.params, batches)
  ptq = eval_lib.evaluate(result.model_cfg, params, batches)
  assert fake["bpb"] == pytest.approx(ptq["bpb"], rel=1e-5)
  # The val metrics of the run are the A8 fake-quant model's, not the float model's.
  flt = eval_lib.evaluate(result.model_cfg, result.params, batches)
  assert s["val_bpb"] != pytest.approx(flt["bpb"], rel=1e-6)
  assert np.isfinite(s["val_bpb"])


def test_kill_and_resume_is_bit_identical(run, tmp_path):
  config, workdir, result = run
  resumed = str(tmp_path / "b")
  shutil.copytree(workdir, resumed)
  shutil.rmtree(os.path.join(resumed, "checkpoints", "4"))  # "killed" after the step-2 save
  out = qat_lib.train_qat(config, resumed)
  jax.tree.map(np.testing.assert_array_equal, out.params, result.params)
  assert out.summary["qat"]["act_ranges"] == result.summary["qat"]["act_ranges"]
  assert out.summary["val_bpb"] == result.summary["val_bpb"]


@pytest.mark.parametrize("variant,kw,match", [
    ("int4", dict(act_bits=12), r"config.qat.act_bits=12; valid: 0 \(off\) or one of"),
    ("int4", dict(first_last_bits=3), "config.qat.first_last_bits=3"),
    ("int4", dict(recipe="int4:asym"), "QAT spec 'int4:asym'"),
    ("int4", dict(rules="nothing_here=int8"), "nothing_here"),
    ("int4", dict(rules="novalue"), "config.qat.rules='novalue'"),
    ("matryoshka", dict(matryoshka_bits="8,3"), "config.qat.matryoshka_bits='8,3'"),
    ("matryoshka", dict(matryoshka_weights="1,1"), "config.qat.matryoshka_weights='1,1'"),
    ("matryoshka", dict(recipe="int4"), "config.qat.recipe='int4'"),
    ("int4", dict(calib_batches=0), "config.qat.calib_batches=0"),
])
def test_bad_qat_config_fails_before_writing(tmp_path, variant, kw, match):
  workdir = tmp_path / "w"
  with pytest.raises(ValueError, match=match):
    qat_lib.train_qat(tiny_config(variant, **kw), str(workdir))
  assert not os.path.exists(workdir / "config.json")


def test_config_variants():
  for v in qat_config.VARIANTS:
    assert "qat" in qat_config.get_config(v)
  with pytest.raises(ValueError, match="variant 'int3'"):
    qat_config.get_config("int3")

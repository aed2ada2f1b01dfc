"""Evaluation: packed loss == per-document oracle, QArray checkpoints, CLI errors."""

import json
import math
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import model
from model.qarray import QArray
from scripts import checkpoint_lib, data_lib, eval_lib
from scripts.configs.train import lm as train_config

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CFG = model.get_preset("test", n_layers=1)


@pytest.fixture(scope="module")
def params():
  return model.init(CFG, jax.random.key(0))


def _data(**kw):
  c = train_config.get_config("test").data
  c.unlock()
  c.update({"seq_len": 32, "batch_size": 2, **kw})
  return c


def test_packed_nll_equals_documents_scored_one_by_one(params):
  rng = np.random.default_rng(0)
  lengths = [5, 9, 14, 3, 20, 13]
  doc_start = np.zeros(sum(lengths), bool)
  doc_start[np.cumsum([0] + lengths[:-1])] = True
  tokens = rng.integers(0, 256, size=doc_start.shape).astype(np.uint16)
  stream = data_lib.TokenStream(tokens, doc_start, len(lengths))
  batch = data_lib.pack_rows(stream, np.array([0, 32]), 32)
  nll, count = eval_lib._eval_step(CFG, params, jax.tree.map(jnp.asarray, batch))
  # Oracle: each row-piece of a document alone, at positions 0.., right-padded to 32
  # (causal attention: padding after a token cannot change its logits).
  pieces = []
  for r in range(2):
    seg = batch["segment_ids"][r]
    for s in range(1, seg.max() + 1):
      pieces.append(batch["tokens"][r][seg == s])
  padded = np.zeros((len(pieces), 32), np.int32)
  for i, p in enumerate(pieces):
    padded[i, :len(p)] = p
  logits, _ = jax.jit(lambda p, t: model.apply(CFG, p, t))(params, jnp.asarray(padded))
  logp = np.asarray(jax.nn.log_softmax(logits, axis=-1))
  want = -sum(float(logp[i, j, pieces[i][j + 1]]) for i in range(len(pieces))
              for j in range(len(pieces[i]) - 1))
  assert int(count) == sum(len(p) - 1 for p in pieces)
  np.testing.assert_allclose(float(nll), want, rtol=1e-5)
  s = eval_lib.summarize(float(nll), float(count))
  assert math.isclose(s["bpb"], s["loss"] / math.log(2)) and math.isclose(
      s["ppl"], math.exp(s["loss"]))


def _int8(w):
  scale = jnp.max(jnp.abs(w), axis=0, keepdims=True) / 127.0
  return QArray(values=jnp.round(w / scale).astype(jnp.int8), scale=scale, shape=w.shape)


def test_quantized_checkpoint_roundtrip_and_eval(params, tmp_path):
  qparams = jax.tree.map(lambda x: x, params)
  for name in ("q", "o"):
    attn = qparams["layers_0"]["attn"]
    attn[name] = {"kernel": _int8(attn[name]["kernel"])}
  workdir = str(tmp_path / "q")
  checkpoint_lib.save_params(workdir, qparams, CFG, step=7, meta={"recipe": "int8"})
  loaded, cfg, step = checkpoint_lib.load_params(workdir)
  assert step == 7 and cfg == CFG
  q = loaded["layers_0"]["attn"]["q"]["kernel"]
  assert isinstance(q, QArray) and q.shape == (64, 64) and q.bits == 8
  jax.tree.map(np.testing.assert_array_equal, loaded, qparams)
  assert checkpoint_lib.load_meta(workdir)["recipe"] == "int8"
  with open(os.path.join(workdir, "model_config.json")) as f:
    assert model.ModelConfig.from_dict(json.load(f)) == CFG
  data = _data()
  a = eval_lib.evaluate(CFG, loaded, data, split="val", max_batches=2)
  b = eval_lib.evaluate(CFG, qparams, data, split="val", max_batches=2)
  f = eval_lib.evaluate(CFG, params, data, split="val", max_batches=2)
  assert a["bpb"] == b["bpb"] and 0 < a["targets"] == b["targets"] <= 2 * 2 * 31
  assert a["bpb"] != f["bpb"] and abs(a["bpb"] - f["bpb"]) < 0.05
  assert model.tree_nbytes(loaded) < model.tree_nbytes(params)


def test_evaluate_checkpoint_and_errors(params, tmp_path):
  workdir = str(tmp_path / "f")
  checkpoint_lib.save_params(workdir, params, CFG)
  out = eval_lib.evaluate_checkpoint(workdir, _data(), splits=("val", "test"), max_batches=1)
  assert out["step"] == 0 and set(out) >= {"val", "test", "param_bytes"}
  assert out["val"]["batches"] == 1 and out["val"]["bpb"] > 0
  with pytest.raises(ValueError, match="seq_len=512 exceeds"):
    eval_lib.evaluate_checkpoint(workdir, _data(seq_len=512))
  with pytest.raises(ValueError, match="split='train2'"):
    eval_lib.evaluate_checkpoint(workdir, _data(), splits=("train2",))
  with pytest.raises(ValueError, match="--step=3 is not a checkpoint"):
    checkpoint_lib.load_params(workdir, step=3)
  missing = tmp_path / "none"
  with pytest.raises(ValueError, match="holds no checkpoints"):
    checkpoint_lib.load_params(str(missing))
  assert not missing.exists()


def test_cli_missing_checkpoint_exits_nonzero(tmp_path):
  proc = subprocess.run([sys.executable, "-m", "scripts.eval", f"--workdir={tmp_path / 'x'}"],
                        cwd=ROOT, capture_output=True, text=True, timeout=120)
  assert proc.returncode != 0 and "holds no checkpoints" in proc.stderr
  assert not (tmp_path / "x").exists()

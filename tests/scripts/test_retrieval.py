"""Retrieval training end to end (a few steps at context 128), evaluate with any step_fn, bpb."""

import json
import math
import os

import jax.numpy as jnp
import numpy as np
import pytest

import model
from decoding import tasks
from scripts import data_lib, eval_lib, retrieval_lib
from scripts.configs.train import retrieval as retrieval_config


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
  out = str(tmp_path_factory.mktemp("retrieval") / "run")
  config = retrieval_config.get_config("smoke")
  with config.unlocked():
    config.task.curriculum = ((128, 2),)  # a 2-step stage first, then the final stage
  return out, config, retrieval_lib.run(config, out)


def test_smoke_run_trains_evaluates_and_resumes(smoke):
  out, config, r = smoke
  assert r["trained"] and r["steps"] == 4 and r["context_len"] == 128 and r["n"] == 8
  assert 0.0 <= r["accuracy"] <= 1.0 and math.isfinite(r["heldout_bpb"])
  with open(os.path.join(out, "retrieval.json")) as f:
    assert json.load(f)["accuracy"] == r["accuracy"]
  lines = [json.loads(x) for x in open(os.path.join(out, "outputs.jsonl"))]
  assert np.mean([x["correct"] for x in lines]) == r["accuracy"]
  assert len(os.listdir(os.path.join(out, "corpus"))) == config.task.n_train
  metrics = [json.loads(x) for x in open(os.path.join(out, "train", "metrics.jsonl"))]
  assert {"answer_nll", "prompt_bpb"} <= set(metrics[0])
  stage = [json.loads(x) for x in open(os.path.join(out, "stage_128", "metrics.jsonl"))]
  assert stage[-1]["step"] == 2
  again = retrieval_lib.run(config, out)  # done: no training, same evaluation
  assert not again["trained"] and again["accuracy"] == r["accuracy"]
  with config.unlocked():
    config.task.train_seed = 5
  with pytest.raises(ValueError, match="different"):
    retrieval_lib.run(config, out)


def test_rows_are_whole_problems(smoke):
  out, config, _ = smoke
  data = config.train_config.data.copy_and_resolve_references()
  data.path = os.path.join(out, "corpus")
  stream = data_lib.load_split(data, "train")
  L = data.seq_len
  assert len(stream) % L == 0 and stream.doc_start[::L].all() and stream.doc_start.sum() * L == (
      len(stream))


def test_evaluate_with_an_explicit_decoder_matches_the_default(smoke):
  out, config, _ = smoke
  params, cfg, _ = retrieval_lib.checkpoint_lib.load_params(os.path.join(out, "train"))
  probs = tasks.problems("passkey", 1, 128, 5)  # 5 over batches of 3: a padded last batch
  a = retrieval_lib.evaluate(params, cfg, probs, batch_size=3)
  b = retrieval_lib.evaluate(params, cfg, probs, step_fn=model.Decoder(cfg), batch_size=3)
  assert a["texts"] == b["texts"] and a["correct"] == b["correct"] and len(a["texts"]) == 5
  assert 0.0 <= a["accuracy"] == b["accuracy"] <= 1.0 and a["n"] == 5
  assert a["texts"] == retrieval_lib.evaluate(params, cfg, probs, batch_size=8)["texts"]
  kv = retrieval_lib.evaluate(params, cfg, tasks.problems("kv", 1, 128, 2))  # any task's problems
  assert 0.0 <= kv["accuracy"] <= 1.0 and len(kv["by_depth"]) == retrieval_lib.DEPTH_BINS
  with pytest.raises(ValueError, match="empty"):
    retrieval_lib.evaluate(params, cfg, [])


def test_bits_per_byte_matches_the_uncached_loss(smoke):
  out, _, _ = smoke
  params, cfg, _ = retrieval_lib.checkpoint_lib.load_params(os.path.join(out, "train"))
  texts = [retrieval_lib.document(p) for p in tasks.problems("passkey", 1, 128, 3)]
  texts.append(texts[0][:50])  # ragged
  whole = retrieval_lib.bits_per_byte(params, cfg, texts, batch_size=2)
  pieces = retrieval_lib.bits_per_byte(params, cfg, texts, step_fn=model.Decoder(cfg), chunk=48,
                                       batch_size=3)
  assert whole["bytes"] == pieces["bytes"] == sum(len(t) for t in texts)
  tok = model.ByteTokenizer()
  nll = count = 0.0
  for t in texts:  # the training-time loss, no cache
    ids = jnp.asarray([tok.encode(t, add_bos=True)])
    batch = dict(tokens=ids, segment_ids=jnp.ones_like(ids), positions=jnp.arange(
        ids.shape[1])[None])
    s, c = eval_lib.nll_sum(cfg, params, batch)
    nll, count = nll + float(s), count + float(c)
  assert whole["bpb"] == pytest.approx(nll / count / math.log(2), rel=1e-4)
  assert pieces["bpb"] == pytest.approx(whole["bpb"], rel=1e-4)
  with pytest.raises(ValueError, match="max_seq_len"):
    retrieval_lib.bits_per_byte(params, cfg, ["x" * cfg.max_seq_len])


@pytest.mark.parametrize("field,value,match", [
    ("task.context_len", 100, "context_len"), ("task.eval_seed", 0, "eval_seed"),
    ("task.name", "nope", "task"), ("train_config.data.seq_len", 100, "document length"),
    ("train_config.model.max_seq_len", 132, "max_seq_len"),
    ("task.prompt_loss_weight", -1.0, "prompt_loss_weight"),
    ("task.curriculum", ((256, 10),), "exceeds"), ("task.curriculum", ((128, 0),), "steps"),
])
def test_bad_configs_fail_before_any_write(tmp_path, field, value, match):
  c = retrieval_config.get_config("smoke")
  section, name = field.rsplit(".", 1)
  with c.unlocked():
    node = c
    for s in section.split("."):
      node = node[s]
    node[name] = value
  with pytest.raises(ValueError, match=match):
    retrieval_lib.run(c, str(tmp_path / "w"))
  assert not os.path.exists(tmp_path / "w")


def test_config_args():
  c = retrieval_config.get_config("kv,1024")
  assert c.task.name == "kv" and c.task.context_len == 1024
  assert c.train_config.model.max_seq_len >= 1024 + 64
  assert c.train_config.data.seq_len == tasks.document_len("kv", 1024)
  assert retrieval_config.get_config(None).task.context_len == 512
  for bad in ("kv,", "x,512", "64", "abc"):
    with pytest.raises(ValueError):
      retrieval_config.get_config(bad)

"""Policy training end to end (a few steps), evaluate both ways, corpus, config errors."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import model
from decoding.tasks.arithmetic import ARITHMETIC
from decoding.tasks.countdown import COUNTDOWN
from model import transformer
from scripts import checkpoint_lib, data_lib, policy_lib
from scripts.configs.train import policy as policy_config


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
  out = str(tmp_path_factory.mktemp("policy") / "run")
  config = policy_config.get_config("smoke")
  return out, config, policy_lib.run(config, out)


def test_smoke_run_trains_evaluates_and_resumes(smoke):
  out, config, r = smoke
  assert r["trained"] and r["steps"] == 4 and r["n"] == 8 and r["task"] == "arithmetic"
  assert 0.0 <= r["pass_at_1"] <= 1.0 and 0.0 <= r["greedy_accuracy"] <= 1.0
  assert r["difficulty"] == list(ARITHMETIC.default_difficulty) and r["train_seconds"] > 0
  with open(os.path.join(out, "policy.json")) as f:
    assert json.load(f) == r
  assert checkpoint_lib.has_checkpoint(r["checkpoint"])
  lines = [json.loads(x) for x in open(os.path.join(out, "outputs.jsonl"))]
  assert len(lines) == 8 and all(len(x["samples"]) == 1 for x in lines)
  again = policy_lib.run(config, out)  # done: no training, same evaluation
  assert not again["trained"] and again["pass_at_1"] == r["pass_at_1"]
  assert again["train_seconds"] == r["train_seconds"]
  with config.unlocked():
    config.eval.n = 4  # eval settings may change between reruns
    config.eval.also = ((1, 2),)
  r = policy_lib.run(config, out)
  assert r["n"] == 4 and [a["difficulty"] for a in r["also"]] == [[1, 2]]
  assert 0.0 <= r["also"][0]["pass_at_1"] <= 1.0 and "(1,2): pass@1" in policy_lib.format_result(r)
  with config.unlocked():
    config.task.train_seed = 5
  with pytest.raises(ValueError, match="different"):
    policy_lib.run(config, out)


def test_evaluate_generate_and_policy_agree_on_greedy(smoke):
  _, _, r = smoke
  params, cfg, _ = checkpoint_lib.load_params(r["checkpoint"])
  probs = ARITHMETIC.problems(1, 3, (1, 2))
  a = policy_lib.evaluate(params, cfg, ARITHMETIC, probs, temperature=0.0, batch_size=2)
  b = policy_lib.evaluate(params, cfg, ARITHMETIC, probs, temperature=0.0, via="policy")
  assert a["texts"] == b["texts"] and a["pass_at_1"] == b["pass_at_1"]
  s = policy_lib.evaluate(params, cfg, ARITHMETIC, probs, samples=3, batch_size=4, key=7)
  assert s["samples"] == 3 and all(len(x) == 3 for x in s["texts"])
  assert s["texts"] == policy_lib.evaluate(params, cfg, ARITHMETIC, probs, samples=3,
                                           batch_size=9, key=7)["texts"]  # batch-independent
  assert all(c in (0.0, 1 / 3, 2 / 3, 1.0) for c in s["correct"])
  with pytest.raises(ValueError, match="empty"):
    policy_lib.evaluate(params, cfg, ARITHMETIC, [])
  with pytest.raises(ValueError, match="via"):
    policy_lib.evaluate(params, cfg, ARITHMETIC, probs, via="nope")


def test_solution_loss_counts_solution_bytes_only():
  assert policy_lib.prompt_end(ARITHMETIC) == "=" and policy_lib.prompt_end(COUNTDOWN) == ":"
  text = "".join(policy_lib.corpus_lines(ARITHMETIC, 0, 3, ((2, 2),)))[5:]  # starts mid-line
  want, inside = [], False  # target t+1 is a solution byte: a prompt's "=" seen, no END since
  for c in text[:-1]:
    inside = (inside or c == "=") and c != "\n"
    want.append(inside)
  tokens = jnp.asarray([[ord(c) for c in text]])
  batch = dict(tokens=tokens, segment_ids=jnp.ones_like(tokens),
               positions=jnp.arange(tokens.shape[1])[None])
  cfg = model.get_preset("test")
  params = transformer.init(cfg, jax.random.key(0))
  logits, _ = transformer.apply(cfg, params, tokens, positions=batch["positions"],
                                segment_ids=batch["segment_ids"])
  nll = -jax.nn.log_softmax(logits[0, :-1])[jnp.arange(len(text) - 1), tokens[0, 1:]]
  loss, m = policy_lib.SolutionLoss(ord("="))(cfg, params, batch)
  assert float(loss) == pytest.approx(float(nll[np.array(want)].mean()), rel=1e-5)
  assert float(m["solution_nll"]) == float(loss)


def test_corpus_documents_are_whole_lines(tmp_path):
  paths = policy_lib.write_corpus(str(tmp_path / "c"), "arithmetic", 0, 10, ((1, 1), (2, 3)),
                                  per_doc=4)
  assert len(paths) == 3
  text = "".join(open(p).read() for p in paths)
  assert text == ARITHMETIC.corpus_text(0, 10, ((1, 1), (2, 3)))
  assert open(paths[0]).read().count("\n") == 4 and open(paths[-1]).read().count("\n") == 2
  data = data_lib.default_config()
  data.update(corpus="files", path=str(tmp_path / "c"))
  data_lib.validate(data)


@pytest.mark.parametrize("field,value,match", [
    ("task.name", "nope", "valid: \\['arithmetic', 'countdown'\\]"),
    ("task.difficulties", ((9, 3),), "digits"), ("task.difficulties", (), "non-empty"),
    ("eval.difficulty", (2,), "2 ints"), ("task.eval_seed", 0, "eval_seed"),
    ("eval.samples", 0, "samples"), ("eval.temperature", -1.0, "temperature"),
    ("task.n_train", 0, "n_train"), ("task.loss", "answer", "loss"),
    ("eval.also", ((1, 9),), "ops"),
])
def test_bad_configs_fail_before_any_write(tmp_path, field, value, match):
  c = policy_config.get_config("smoke")
  section, name = field.rsplit(".", 1)
  with c.unlocked():
    c[section][name] = value
  with pytest.raises(ValueError, match=match):
    policy_lib.run(c, str(tmp_path / "w"))
  assert not os.path.exists(tmp_path / "w")


def test_config_args():
  assert policy_config.get_config(None).task.name == "arithmetic"
  c = policy_config.get_config("countdown")
  assert c.task.name == "countdown" and tuple(c.eval.difficulty) == (3, 25)
  assert c.eval.temperature == 1.0 and c.eval.n == 200
  with pytest.raises(ValueError, match="valid"):
    policy_config.get_config("nope")
  with pytest.raises(ValueError, match="valid"):
    policy_lib.get_task("nope")

"""The quantization-vs-reasoning protocol: smoke run end to end, resume, scoring, bad configs."""

import json
import os

import numpy as np
import pytest

from scripts import reasoning_lib, tasks_lib
from scripts.configs.sweeps import quant_reasoning


def _config(**changes):
  c = quant_reasoning.get_config("smoke")
  with c.unlocked():
    for field, value in changes.items():
      *sections, name = field.split(".")
      node = c
      for sec in sections:
        node = node[sec]
      node[name] = value
  return c


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
  out = str(tmp_path_factory.mktemp("qr") / "run")
  return out, reasoning_lib.run(_config(), out)


def _independent_score(path):
  """Per difficulty: (accuracy, mean first-line bytes) recomputed from the saved outputs."""
  by = {}
  for line in open(path):
    r = json.loads(line)
    first = r["output"].split("\n")[0]
    answer = first.rsplit(";", 1)[1] if ";" in first else None
    ok = answer is not None and answer.isdigit() and answer == str(eval(r["prompt"][:-1]))
    assert ok == r["correct"]
    by.setdefault(r["difficulty"], []).append((ok, len(first.encode())))
  return {d: (np.mean([o for o, _ in v]), np.mean([n for _, n in v])) for d, v in by.items()}


def test_smoke_table_and_bookkeeping(smoke):
  out, result = smoke
  assert result["trained"] and result["evaluated"] == 2
  rows = result["rows"]
  assert [(r["recipe"], r["difficulty"]) for r in rows] == [
      ("float", 1), ("float", 3), ("int4", 1), ("int4", 3)]
  by = {(r["recipe"], r["difficulty"]): r for r in rows}
  for (recipe, d), r in by.items():
    assert r["n"] == 4 and 0 <= r["exact"] <= r["accuracy"] <= 1  # exact implies correct
    assert r["accuracy_delta"] == pytest.approx(r["accuracy"] - by[("float", d)]["accuracy"])
    assert r["tokens"] > 0 and r["flops"] > 0 and r["forward_passes"] >= 2
  assert by[("int4", 1)]["bits"] == 4 and by[("float", 1)]["bits"] == 32
  assert by[("int4", 1)]["model_bytes"] < by[("float", 1)]["model_bytes"]
  for recipe in ("float", "int4"):
    indep = _independent_score(os.path.join(out, "outputs", recipe + ".jsonl"))
    for d, (acc, length) in indep.items():
      assert by[(recipe, d)]["accuracy"] == pytest.approx(acc)
      assert by[(recipe, d)]["mean_len"] == pytest.approx(length)
  md = open(os.path.join(out, "quant_reasoning.md")).read()
  assert "| recipe | bits | d=1 | d=3 | mean |" in md and "| int4 |" in md
  data = json.load(open(os.path.join(out, "quant_reasoning.json")))
  assert len(data["rows"]) == 4 and data["overlap"]["1"] == 1.0
  assert os.path.getsize(os.path.join(out, "quant_reasoning.png")) > 0


def test_rerun_resumes_and_adds_recipes(smoke):
  out, first = smoke
  ckpt = os.path.join(out, "train", "checkpoints")
  stamp = {f: os.path.getmtime(os.path.join(ckpt, f)) for f in os.listdir(ckpt)}
  again = reasoning_lib.run(_config(), out)
  assert not again["trained"] and again["evaluated"] == 0 and again["rows"] == first["rows"]
  more = reasoning_lib.run(_config(recipes=("float", "int4", "int8")), out)
  assert more["evaluated"] == 1 and not more["trained"]
  assert [r["recipe"] for r in more["rows"]][-2:] == ["int8", "int8"]
  assert stamp == {f: os.path.getmtime(os.path.join(ckpt, f)) for f in os.listdir(ckpt)}
  with pytest.raises(ValueError, match=r"different \['task'\]"):
    reasoning_lib.run(_config(**{"task.n_train": 500}), out)


def test_score_against_hand_examples():
  ps = [tasks_lib.from_terms(t) for t in ([3, 5, 2], [4], [9, 9])]
  texts = ["3,8,10;10\n", "4;5\n", "9,17;18\n"]  # right; wrong answer; right answer, bad pad
  s = reasoning_lib.score(ps, texts)
  assert s["accuracy"] == pytest.approx(2 / 3) and s["exact"] == pytest.approx(1 / 3)
  assert s["mean_len"] == pytest.approx((9 + 3 + 7) / 3)
  perfect = reasoning_lib.score(ps, [p.target for p in ps])
  assert perfect["accuracy"] == perfect["exact"] == 1.0
  assert perfect["mean_len"] == perfect["target_len"] == pytest.approx((9 + 3 + 7) / 3)
  assert reasoning_lib.score(ps, ["", "no answer", "9,18;"])["accuracy"] == 0.0
  with pytest.raises(ValueError, match="3 problems and 2 texts"):
    reasoning_lib.score(ps, texts[:2])


@pytest.mark.parametrize("field,value,match", [
    ("recipes", ("float", "int3"), r"config.recipes: 'int3'"),
    ("recipes", ("float", "int4:g7"), r"config.recipes: 'int4:g7'"),
    ("recipes", ("int4", "int4:channel"), "repeats"),
    ("recipes", (), "non-empty"),
    ("task.difficulties", (0, 2), r"config.task.difficulties\[0\]=0"),
    ("task.eval_seed", 0, "must differ from train_seed"),
    ("eval.n_per_difficulty", 0, "n_per_difficulty=0"),
    ("eval.max_new_tokens", 300, "max_seq_len=256"),
    ("train_config.model.preset", "huge", "unknown model preset"),
])
def test_bad_config_fails_before_anything(field, value, match, tmp_path):
  with pytest.raises(ValueError, match=match):
    reasoning_lib.run(_config(**{field: value}), str(tmp_path / "x"))
  assert not os.path.exists(tmp_path / "x")


def test_get_config_bad_arg():
  with pytest.raises(ValueError, match="valid: None, 'smoke'"):
    quant_reasoning.get_config("big")

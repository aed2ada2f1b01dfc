"""scripts.attention_eval on a few training steps: rows for every policy kind, probe records
that are fractions, a rerun that resumes, bad config errors before compute."""

import json
import os

import pytest

from scripts import attention_eval_lib
from scripts.configs.sweeps import attention


def _config():
  c = attention.get_config("smoke")
  c.unlock()
  c.selectors = ["topk:k=64:block=16"]  # every block: must match dense
  c.eviction.update(policies=["h2o"], budgets=[48])
  c.update(n_problems=2, probe_problems=1, bpb_texts=2, batch_size=2)
  c.lock()
  return c


def test_sweep_rows_and_resume(tmp_path):
  config = _config()
  out = attention_eval_lib.run(config, str(tmp_path), log=lambda *_: None)
  rows = {r["id"]: r for r in out["rows"]}
  assert set(rows) == {"dense", "topk:k=64:block=16", "h2o:budget=48"}
  dense, full = rows["dense"], rows["topk:k=64:block=16"]
  assert full["accuracy"] == dense["accuracy"] and abs(full["bpb"] - dense["bpb"]) < 1e-4
  assert full["density"] == pytest.approx(1.0) and full["recall"] == pytest.approx(1.0, abs=1e-5)
  assert 0 < out["static"]["density"] < 1 and 0 < out["static"]["recall"] <= 1
  assert rows["h2o:budget=48"]["density"] == pytest.approx(48 / 128)
  for f in out["files"]:
    assert os.path.exists(f), f
  with open(tmp_path / "rows.jsonl") as f:
    n = len(f.readlines())
  again = attention_eval_lib.run(config, str(tmp_path), log=lambda *_: None)
  with open(tmp_path / "rows.jsonl") as f:
    assert len(f.readlines()) == n  # nothing re-run
  assert json.dumps(again["rows"]) == json.dumps(out["rows"])


def test_bad_config():
  c = _config()
  c.unlock()
  c.selectors = ["topk:q=3"]
  with pytest.raises(ValueError, match="bad option"):
    attention_eval_lib.run(c, "/nonexistent/never-written")
  c.selectors = []
  c.eviction.budgets = [2]
  with pytest.raises(ValueError, match="budget"):
    attention_eval_lib.run(c, "/nonexistent/never-written")

"""The structured-pruning decode benchmark on the test preset with tiny settings."""

from __future__ import annotations

import json

import pytest

from scripts.bench import structured as bench


def test_run_writes_results(tmp_path):
  out = str(tmp_path / "bench_structured")
  logs = []
  bench.run("test", ["neurons:0.5", "neurons:0.5+heads:0.5"], [2], prompt_len=8,
            new_tokens=4, repeats=1, out=out, command="python -m scripts.bench.structured",
            log=logs.append)
  with open(out + ".json") as f:
    result = json.load(f)
  assert {"machine", "jax", "command", "preset", "load_avg_1m"} <= set(result["meta"])
  rows = result["rows"]
  assert [(r["variant"], r["batch"]) for r in rows] == [
      (v, 2) for v in ("dense", "neurons:0.5", "neurons:0.5+heads:0.5")]
  for r in rows:
    assert {"params", "ffn_dim", "n_heads", "tok_s", "speedup", "decode_tok_s"} <= set(r)
    assert r["tok_s"] > 0 and r["speedup"] > 0 and r["decode_speedup"] > 0
  assert rows[0]["speedup"] == 1.0 and rows[0]["ffn_dim"] == 128
  assert (rows[2]["ffn_dim"], rows[2]["n_heads"]) == (64, 2)
  assert rows[1]["params"] < rows[0]["params"]
  md = open(out + ".md").read()
  assert "| neurons:0.5 |" in md and "python -m scripts.bench.structured" in md


@pytest.mark.parametrize("text", ["neuron:0.5", "neurons:x", "neurons:1.0",
                                  "heads:0.5+kv_groups:0.5", "neurons:0.5+neurons:0.2"])
def test_bad_variants(text):
  with pytest.raises(ValueError, match="--variants entry"):
    bench.parse_variant(text)


def test_parse_variant():
  assert bench.parse_variant("neurons:0.5+heads:0.25") == dict(neurons=0.5, heads=0.25)
  assert bench.parse_variant("kv_groups:0.5") == dict(heads=0.5, head_mode="kv_groups")

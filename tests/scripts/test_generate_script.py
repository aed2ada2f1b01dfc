"""scripts/generate.py's library: flag validation, streaming, beam output."""

import json
import os

import pytest

from scripts import decode_lib, generate_lib


@pytest.fixture(scope="module")
def run():
  return decode_lib.load(None, preset="test")


@pytest.mark.parametrize("extra, match", [
    ({}, "needs --draft"),
    (dict(draft="exit:x"), "expected exit:K with an integer K >= 1"),
    (dict(draft="/no/such/dir"), "--draft='/no/such/dir' is not a directory"),
    (dict(draft="exit:1", gamma=0), "--gamma=0 must be an integer >= 1"),
    (dict(draft="exit:1", gamma=4, gamma_max=2), "--gamma_max=2 must be an integer >= --gamma=4"),
    (dict(draft="exit:1", schedule="fast"), r"--schedule='fast'; valid: \['fixed', 'heuristic'\]"),
    (dict(draft="exit:1", beta=1), r"unknown speculative settings \['beta'\]"),
])
def test_bad_speculative_flags_fail_before_loading(extra, match):
  with pytest.raises(ValueError, match=match):
    generate_lib.validate("speculative", decode_lib.Options(extra=extra), ["hi"])


@pytest.mark.parametrize("method, kw, match", [
    ("nope", {}, r"--method='nope'; valid: \['beam', 'sample', 'speculative'\]"),
    ("sample", dict(max_new_tokens=0), "--max_new_tokens=0 must be >= 1"),
    ("sample", dict(temperature=-1.0), r"temperature=-1.0 is outside the valid range"),
    ("sample", dict(top_p=2.0), r"top_p=2.0 is outside the valid range \(0, 1\]"),
    ("beam", dict(beam_width=2, num_return=3), r"--num_return=3 must be in \[1, --beam_width=2\]"),
])
def test_bad_flags_fail_before_loading(method, kw, match):
  with pytest.raises(ValueError, match=match):
    generate_lib.validate(method, decode_lib.Options(**kw), ["hi"])


def test_load_needs_exactly_one_source():
  with pytest.raises(ValueError, match="exactly one of --model"):
    decode_lib.load(None)


def test_streamed_text_equals_returned_text(run, capsys):
  opts = decode_lib.Options(max_new_tokens=12, stream=True)
  (res,) = generate_lib.generate_text(run, ["def f("], "sample", opts)
  streamed = capsys.readouterr().out.rstrip("\n")
  assert streamed == res["text"].rstrip("\ufffd")
  assert len(res["tokens"]) == 12 and res["finish_reason"] == "max_tokens"
  assert res["cost"]["forward_passes"] == 13


def test_beam_returns_ranked_hypotheses(run):
  opts = decode_lib.Options(max_new_tokens=6, beam_width=3, num_return=3)
  (res,) = generate_lib.generate_text(run, ["ab"], "beam", opts)
  scores = [h["score"] for h in res["hypotheses"]]
  assert scores == sorted(scores, reverse=True) and res["text"] == res["hypotheses"][0]["text"]


@pytest.mark.parametrize("schedule", ["fixed", "heuristic"])
def test_speculative_greedy_equals_sample_greedy(run, schedule):
  """--method=speculative (early-exit draft, no trained head) reproduces greedy sampling."""
  texts = ["def f(", "import o"]
  greedy = generate_lib.generate_text(run, texts, "sample",
                                      decode_lib.Options(max_new_tokens=10))
  opts = decode_lib.Options(max_new_tokens=10,
                              extra=dict(draft="exit:1", gamma=2, schedule=schedule))
  spec = generate_lib.generate_text(run, texts, "speculative", opts)
  for g, s in zip(greedy, spec, strict=True):
    assert s["tokens"] == g["tokens"] and s["finish_reason"] == g["finish_reason"]
    assert 0.0 <= s["stats"]["alpha"] <= 1.0 and s["stats"]["target_calls"] >= 1


def test_only_hugging_face_configs_make_a_hf_dir(tmp_path):
  """A sparq training workdir also has a config.json; it must load as a checkpoint."""
  from model import convert

  cases = {"hf": {"model_type": "llama", "architectures": ["LlamaForCausalLM"]},
           "workdir": {"model": {"preset": "tiny"}, "steps": 10}, "broken": "{not json"}
  for name, content in cases.items():
    os.makedirs(tmp_path / name)
    with open(tmp_path / name / "config.json", "w") as f:
      f.write(content if isinstance(content, str) else json.dumps(content))
  assert convert.is_hf_dir(str(tmp_path / "hf"))
  assert not convert.is_hf_dir(str(tmp_path / "workdir"))
  assert not convert.is_hf_dir(str(tmp_path / "broken"))
  assert not convert.is_hf_dir(str(tmp_path / "missing"))


def test_kv_quant_flags(run):
  assert generate_lib.kv_settings({}) == dict(kv_quant=None, attn_qk=None)
  with pytest.raises(ValueError, match="--kv_quant='int3'; valid: int8, int4, fp8"):
    generate_lib.kv_settings(dict(kv_quant="int3"))
  with pytest.raises(ValueError, match="--attn_qk=int8 reads an int8 KV cache"):
    generate_lib.kv_settings(dict(kv_quant="int4", attn_qk="int8"))
  settings = generate_lib.kv_settings(dict(kv_quant="int8", attn_qk="int8"))
  qrun = generate_lib.with_kv_settings(run, settings)
  assert (qrun.cfg.kv_quant, qrun.cfg.attn_qk) == ("int8", "int8") and qrun.params is run.params
  assert generate_lib.with_kv_settings(run, generate_lib.kv_settings({})) is run
  opts = decode_lib.Options(max_new_tokens=8)
  (ref,) = generate_lib.generate_text(run, ["def f("], "sample", opts)
  (res,) = generate_lib.generate_text(qrun, ["def f("], "sample", opts)
  assert len(res["tokens"]) == 8 and res["finish_reason"] == ref["finish_reason"]


def test_pruned_attention_flags(run):
  """--attn_select / --evict build the Decoder; a budget that holds everything decodes the
  plain greedy tokens, as does a top-k selector that keeps every block."""
  with pytest.raises(ValueError, match="cannot be combined"):
    generate_lib.kv_settings(dict(attn_select="topk:k=2", evict="h2o:budget=64"))
  with pytest.raises(ValueError, match="unknown"):
    generate_lib.kv_settings(dict(evict="lru:budget=64"))
  opts = decode_lib.Options(max_new_tokens=8)
  (ref,) = generate_lib.generate_text(run, ["def f("], "sample", opts)
  for flag in (dict(evict="h2o:budget=64:sinks=2:window=8"),
               dict(attn_select="topk:k=64:block=8")):
    prun = generate_lib.with_kv_settings(run, generate_lib.kv_settings(flag))
    assert prun.step_fn != run.step_fn and prun.params is run.params
    (res,) = generate_lib.generate_text(prun, ["def f("], "sample", opts)
    assert res["tokens"] == ref["tokens"], flag

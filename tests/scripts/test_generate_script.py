"""scripts/generate.py's library: flag validation, streaming, beam output."""

import pytest

from scripts import generate_lib


@pytest.fixture(scope="module")
def run():
  return generate_lib.load(None, preset="test")


@pytest.mark.parametrize("method, kw, match", [
    ("nope", {}, r"--method='nope'; valid: \['beam', 'sample'"),
    ("sample", dict(max_new_tokens=0), "--max_new_tokens=0 must be >= 1"),
    ("sample", dict(temperature=-1.0), r"temperature=-1.0 is outside the valid range"),
    ("sample", dict(top_p=2.0), r"top_p=2.0 is outside the valid range \(0, 1\]"),
    ("beam", dict(beam_width=2, num_return=3), r"--num_return=3 must be in \[1, --beam_width=2\]"),
])
def test_bad_flags_fail_before_loading(method, kw, match):
  with pytest.raises(ValueError, match=match):
    generate_lib.validate(method, generate_lib.Options(**kw), ["hi"])


def test_load_needs_exactly_one_source():
  with pytest.raises(ValueError, match="exactly one of --model"):
    generate_lib.load(None)


def test_streamed_text_equals_returned_text(run, capsys):
  opts = generate_lib.Options(max_new_tokens=12, stream=True)
  (res,) = generate_lib.generate_text(run, ["def f("], "sample", opts)
  streamed = capsys.readouterr().out.rstrip("\n")
  assert streamed == res["text"].rstrip("\ufffd")
  assert len(res["tokens"]) == 12 and res["finish_reason"] == "max_tokens"
  assert res["cost"]["forward_passes"] == 13


def test_beam_returns_ranked_hypotheses(run):
  opts = generate_lib.Options(max_new_tokens=6, beam_width=3, num_return=3)
  (res,) = generate_lib.generate_text(run, ["ab"], "beam", opts)
  scores = [h["score"] for h in res["hypotheses"]]
  assert scores == sorted(scores, reverse=True) and res["text"] == res["hypotheses"][0]["text"]

"""Retrieval tasks: determinism, answers recoverable from the prompt, exact lengths, errors."""

import re

import pytest

from decoding import tasks
from decoding.tasks import retrieval
from model import ByteTokenizer

CONTEXTS = [tasks.MIN_CONTEXT, 200, 512, 1024, 4096]


@pytest.mark.parametrize("make", [tasks.passkey, tasks.kv_retrieval])
def test_problems_are_functions_of_seed_context_index(make):
  assert make(3, 512, 7) == make(3, 512, 7)
  many = [make(3, 512, i) for i in range(30)]
  assert len({p.answer for p in many}) > 25 and len({p.prompt for p in many}) == 30
  assert [make(4, 512, i).prompt for i in range(30)] != [p.prompt for p in many]
  assert make(3, 600, 7).prompt != make(3, 512, 7).prompt
  task = "passkey" if make is tasks.passkey else "kv"
  assert tasks.problems(task, 3, 512, 3, start=5) == [make(3, 512, i) for i in (5, 6, 7)]
  assert tasks.problem(task, 3, 512, 7) == make(3, 512, 7)


@pytest.mark.parametrize("context_len", CONTEXTS)
def test_passkey_answer_is_the_needle_and_length_is_exact(context_len):
  depths = []
  for i in range(20):
    p = tasks.passkey(0, context_len, i)
    assert len(p.prompt.encode()) == context_len == p.context_len  # exact: tolerance 0 bytes
    assert len(tasks.prompt_tokens(p)) == context_len + 1
    assert tasks.prompt_tokens(p)[0] == ByteTokenizer.bos_id
    assert p.prompt.endswith("What is the pass key? The pass key is ")
    found = set(re.findall(r"[0-9]+", p.prompt))  # an independent read of the needle
    assert found == {p.answer} and len(p.answer) == tasks.answer_len("passkey") == 5
    assert list(p.answer) == sorted(set(p.answer))  # distinct digits, increasing
    needle = f"The pass key is {p.answer}. Remember it. {p.answer} is the pass key. "
    offset = p.prompt.index(needle)
    haystack = context_len - len(needle) - len("What is the pass key? The pass key is ")
    assert p.depth == pytest.approx(offset / haystack) and 0 <= p.depth <= 1
    assert tasks.is_correct(p, p.target) and p.target == p.answer + "\n"
    assert len(ByteTokenizer().encode(p.prompt + p.target, add_bos=True)) == tasks.document_len(
        "passkey", context_len)
    depths.append(p.depth)
  if context_len >= 1024:
    assert min(depths) < 0.3 and max(depths) > 0.7  # seeded depths spread over the context


def test_passkey_given_depth():
  for depth in (0.0, 0.25, 0.5, 1.0):
    p = tasks.passkey(1, 2048, 0, depth=depth)
    assert abs(p.depth - depth) < 0.02  # snapped to a sentence boundary, intro before it
    assert len(p.prompt) == 2048
  with pytest.raises(ValueError, match="depth"):
    tasks.passkey(1, 512, 0, depth=1.5)


@pytest.mark.parametrize("context_len", CONTEXTS)
def test_kv_answer_is_the_queried_value_and_length_is_exact(context_len):
  for i in range(20):
    p = tasks.kv_retrieval(0, context_len, i)
    assert len(p.prompt.encode()) == context_len
    body, query = p.prompt.rsplit("\n", 1)
    pairs = dict(re.findall(r"^([a-z0-9]{4}):([a-z0-9]{4})$", body, flags=re.M))
    assert len(pairs) == p.n_pairs == tasks.max_pairs(context_len)  # keys are distinct
    key = re.fullmatch(r"\? ([a-z0-9]{4}):", query).group(1)
    assert pairs[key] == p.answer and len(p.answer) == tasks.answer_len("kv")
    haystack = context_len - 10 - len(query)  # outside the queried "KEY:VALUE\n" and query
    assert p.depth == pytest.approx(p.prompt.index(f"{key}:") / haystack) and 0 <= p.depth <= 1
    assert tasks.is_correct(p, p.answer + "\nmore") and not tasks.is_correct(p, "zzzz")


def test_kv_fewer_pairs_pad_with_filler():
  p = tasks.kv_retrieval(2, 1024, 0, n_pairs=10)
  assert len(p.prompt) == 1024 and p.n_pairs == 10
  assert p.prompt.count(":") == 11 and p.prompt.index(":") > 800  # filler, then the pairs
  with pytest.raises(ValueError, match=rf"n_pairs .*1\.\.{tasks.max_pairs(256)}"):
    tasks.kv_retrieval(2, 256, 0, n_pairs=tasks.max_pairs(256) + 1)
  with pytest.raises(ValueError, match="n_pairs"):
    tasks.kv_retrieval(2, 256, 0, n_pairs=0)


def test_is_correct():
  p = tasks.passkey(0, 256, 0)
  assert tasks.is_correct(p, f" {p.answer} \nx") and tasks.is_correct(p, p.answer)
  assert not tasks.is_correct(p, p.answer + "0") and not tasks.is_correct(p, "")
  assert not tasks.is_correct(p, "\n" + p.answer)


@pytest.mark.parametrize("kw,match", [
    (dict(context_len=tasks.MIN_CONTEXT - 1), r"context_len \(prompt bytes\)=127 .*128\.\."),
    (dict(context_len=tasks.MAX_CONTEXT + 1), rf"context_len .*\.\.{tasks.MAX_CONTEXT}"),
    (dict(context_len=512.0), "context_len"), (dict(context_len=True), "context_len"),
    (dict(seed=-1), "seed"), (dict(index=-2), "index"), (dict(index=1.5), "index"),
])
@pytest.mark.parametrize("make", [tasks.passkey, tasks.kv_retrieval])
def test_bad_input_names_the_argument(make, kw, match):
  args = dict(seed=0, context_len=512, index=0) | kw
  with pytest.raises(ValueError, match=match):
    make(**args)


def test_bad_task_and_n():
  with pytest.raises(ValueError, match="task='nope'"):
    tasks.problem("nope", 0, 512, 0)
  with pytest.raises(ValueError, match="n=0"):
    tasks.problems("kv", 0, 512, 0)
  with pytest.raises(ValueError, match="task"):
    retrieval.answer_len("x")

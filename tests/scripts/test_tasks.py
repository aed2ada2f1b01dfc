"""The running-sum task: determinism, answers against Python arithmetic, extraction, errors."""

import os

import numpy as np
import pytest

from scripts import tasks_lib


def test_problem_is_a_function_of_seed_difficulty_index():
  assert tasks_lib.problem(3, 5, 7) == tasks_lib.problem(3, 5, 7)
  many = [tasks_lib.problem(3, 5, i).prompt for i in range(50)]
  assert len(set(many)) > 40  # indices draw independently (10^5 prompts of 5 terms)
  assert [tasks_lib.problem(4, 5, i).prompt for i in range(50)] != many
  assert tasks_lib.problems(3, 5, 4, start=2) == [tasks_lib.problem(3, 5, i) for i in (2, 3, 4, 5)]
  a = tasks_lib.make_problem(np.random.default_rng(9), 6)
  assert a == tasks_lib.make_problem(np.random.default_rng(9), 6) and a.difficulty == 6


@pytest.mark.parametrize("difficulty", [1, 2, 5, 8, tasks_lib.MAX_DIFFICULTY])
def test_targets_match_python_arithmetic(difficulty):
  for i in range(20):
    p = tasks_lib.problem(0, difficulty, i)
    expr = p.prompt[:-1]
    assert p.prompt.endswith("=") and expr.count("+") == difficulty - 1
    assert p.answer == str(eval(expr))  # an independent evaluation of the expression
    pad, answer = p.target[:-1].split(";")
    assert p.target.endswith("\n") and answer == p.answer
    terms = expr.split("+")
    want = [str(eval("+".join(terms[:k]))) for k in range(1, difficulty + 1)]
    assert pad.split(",") == want
    assert len(p.target) <= tasks_lib.target_len(difficulty)
    assert tasks_lib.is_correct(p, p.target) and tasks_lib.is_exact(p, p.target)


def test_target_len_is_the_longest_target():
  for d in (1, 2, 3, 7, 12):
    worst = tasks_lib.from_terms([9] * d)
    assert len(worst.target.encode()) == tasks_lib.target_len(d)
  assert tasks_lib.from_terms([3, 5, 2, 7]).target == "3,8,10,17;17\n"
  assert tasks_lib.from_terms([4]).target == "4;4\n"


@pytest.mark.parametrize("text,want", [
    ("3,8,10;10\n", "10"), ("3,8,10;10", "10"), ("3,8;8\n9;9\n", "8"), ("1;2;3\n", "3"),
    ("3,8,10;\n", None), ("3,8,10\n;10", None), ("", None), (";7", "7"), ("3;1x\n", None),
    ("3; 8\n", None), ("3;-8\n", None), ("3;08", "08"),
])
def test_extract_answer(text, want):
  assert tasks_lib.extract_answer(text) == want


def test_is_correct_and_exact():
  p = tasks_lib.from_terms([3, 5, 2])
  assert tasks_lib.is_correct(p, "3,8,10;10\nanything after")
  assert tasks_lib.is_correct(p, "3,9,10;10\n") and not tasks_lib.is_exact(p, "3,9,10;10\n")
  assert not tasks_lib.is_correct(p, "3,8,10;010\n")  # exact digits, no leading zeros
  assert not tasks_lib.is_correct(p, "3,8,10;11\n") and not tasks_lib.is_correct(p, "3,8,10")
  assert tasks_lib.output_length("3,8,10;10\nmore") == 9 and tasks_lib.output_length("") == 0
  assert tasks_lib.prompt_tokens(p) == [256, *b"3+5+2="]


@pytest.mark.parametrize("bad", [0, tasks_lib.MAX_DIFFICULTY + 1, -1, 2.0, True, "3", None])
def test_bad_difficulty(bad):
  with pytest.raises(ValueError, match=r"difficulty=.*1\.\.16"):
    tasks_lib.make_problem(np.random.default_rng(0), bad)
  with pytest.raises(ValueError, match="difficulty"):
    tasks_lib.problem(0, bad, 0)


def test_bad_arguments():
  with pytest.raises(ValueError, match="empty"):
    tasks_lib.check_difficulties(())
  with pytest.raises(ValueError, match="repeats"):
    tasks_lib.check_difficulties((1, 2, 1))
  with pytest.raises(ValueError, match=r"difficulties\[1\]=0"):
    tasks_lib.corpus_text(0, 5, (1, 0))
  with pytest.raises(ValueError, match="index=-1"):
    tasks_lib.problem(0, 2, -1)
  with pytest.raises(ValueError, match="n=0"):
    tasks_lib.problems(0, 2, 0)
  with pytest.raises(ValueError, match="digits"):
    tasks_lib.from_terms([3, 10])


def test_corpus_text_and_files(tmp_path):
  text = tasks_lib.corpus_text(5, 30, (2, 4, 6))
  assert text == tasks_lib.corpus_text(5, 30, (2, 4, 6))
  lines = text.split("\n")[:-1]
  assert len(lines) == 30 and text.endswith("\n")
  for i, line in enumerate(lines):
    prompt, rest = line.split("=")
    assert prompt.count("+") + 1 == (2, 4, 6)[i % 3]
    assert rest.rsplit(";", 1)[1] == str(eval(prompt))
  paths = tasks_lib.write_corpus(str(tmp_path / "c"), 5, 30, (2, 4, 6), per_doc=8)
  assert [os.path.basename(p) for p in paths] == [f"doc{i:06d}.txt" for i in range(4)]
  assert "".join(open(p).read() for p in paths) == text
  assert open(paths[-1]).read().count("\n") == 6


def test_overlap():
  train = tasks_lib.corpus_problems(0, 2000, (1, 6))
  assert tasks_lib.overlap(tasks_lib.problems(1, 1, 20), train) == 1.0  # 10 prompts in all
  assert tasks_lib.overlap(tasks_lib.problems(1, 6, 20), train) < 0.1  # 10^6 prompts
  held = tasks_lib.problems(0, 6, 5)  # the corpus seed: corpus line 2i+1 is problem(0, 6, i)
  assert tasks_lib.overlap(held, train) == 1.0

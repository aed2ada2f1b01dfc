"""Multi-step arithmetic: generator, verifier, step segmentation and oracle labels."""

import pytest

from decoding.tasks import ARITHMETIC, base, get_task
from decoding.tasks.arithmetic import from_chain


def test_reference_solutions_verify_and_evaluate_left_to_right():
  for d in ((1, 1), (2, 3), (3, 5), (4, 8)):
    for i in range(50):
      p = ARITHMETIC.problem(0, i, d)
      assert ARITHMETIC.is_correct(p, p.target)
      assert ARITHMETIC.step_labels(p, p.target) == [True] * d[1]
      assert len(p.target) <= ARITHMETIC.max_target_len(d)
      first, chain = p.data
      acc = first
      for op, x in chain:  # left to right, no precedence
        acc = acc + x if op == "+" else acc - x if op == "-" else acc * x
      assert p.answer == str(acc)
      assert all(2 <= x <= 9 for op, x in chain if op == "*")
      assert all(0 <= x < 10 ** d[0] for op, x in chain if op != "*")


def test_hand_made_chain_and_labels():
  p = from_chain(47, (("+", 15), ("*", 3), ("-", 26)))
  assert p.prompt == "47+15*3-26=" and p.target == "47+15=62,62*3=186,186-26=160;160\n"
  assert base.segments("47+15=62,62*3=18") == ["47+15=62"]
  assert ARITHMETIC.step_labels(p, "47+15=62,62*3=187,187-26=161;161\n") == [True, False, False]
  assert ARITHMETIC.step_labels(p, "47+15=62,") == [True]
  assert ARITHMETIC.step_labels(p, "47+15=62") == []
  assert not ARITHMETIC.is_correct(p, "47+15=62,62*3=186,186-26=160;160")  # unfinished
  assert ARITHMETIC.is_correct(p, "47+15=61,61*3=186,186-26=160;160\n")  # outcome only
  assert ARITHMETIC.extract_answer("1+1=2;-7\n") == "-7"
  assert ARITHMETIC.extract_answer("1+1=2;\n") is None


def test_problems_are_seeded_and_independent():
  a = ARITHMETIC.problems(3, 20)
  assert a == ARITHMETIC.problems(3, 20)
  assert a[5] == ARITHMETIC.problem(3, 5)
  assert len({p.prompt for p in a}) > 15
  assert ARITHMETIC.problems(4, 20) != a


def test_bad_difficulty_and_names():
  with pytest.raises(ValueError, match="difficulty.ops=9 must be an int in 1..8"):
    ARITHMETIC.problem(0, 0, (2, 9))
  with pytest.raises(ValueError, match="2 ints"):
    ARITHMETIC.problem(0, 0, 3)
  with pytest.raises(ValueError, match="unknown task 'algebra'"):
    get_task("algebra")
  with pytest.raises(ValueError, match="op='/'"):
    from_chain(1, (("/", 2),))

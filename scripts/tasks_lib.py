"""A seeded synthetic reasoning task: running sums with a scratchpad, and its answer checker.

  p = problem(seed=1, difficulty=4, index=0)  # p.prompt "3+5+2+7=", p.target "3,8,10,17;17\n"
  is_correct(p, model_text)                     # the answer after the last ';' of the first line

A problem of difficulty d adds d digits 0..9. The target is the scratchpad of
partial sums, then `;` and the answer, then a newline, so the correct output grows
with d (`target_len`) and one wrong step spoils every later partial. A problem is a
function of (seed, difficulty, index); training corpora and evaluation sets are
drawn from different seeds (short problems can still coincide: difficulty 1 has
only 10 distinct prompts, so `overlap` reports the shared fraction).

Text is bytes for `model.ByteTokenizer`; `prompt_tokens` is what a model is asked
(BOS, then the prompt), which is how `write_corpus` documents begin.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Iterable, Sequence

import numpy as np

from model.tokenizer import ByteTokenizer
from scripts import data_lib

MAX_DIFFICULTY = 16
SEP, END = ";", "\n"
_ANSWER = re.compile(r"[0-9]+")


@dataclasses.dataclass(frozen=True)
class Problem:
  """One task instance: the prompt, the full target (scratchpad; answer; newline), the answer."""

  prompt: str
  target: str
  answer: str
  difficulty: int
  terms: tuple[int, ...]


def check_difficulty(difficulty, name: str = "difficulty") -> int:
  """`difficulty` as an int in 1..MAX_DIFFICULTY, or a ValueError naming `name`."""
  if isinstance(difficulty, bool) or not isinstance(difficulty, (int, np.integer)) or not (
      1 <= difficulty <= MAX_DIFFICULTY):
    raise ValueError(f"{name}={difficulty!r} must be an int in 1..{MAX_DIFFICULTY} "
                     "(the number of terms to add)")
  return int(difficulty)


def check_difficulties(difficulties, name: str = "difficulties") -> tuple[int, ...]:
  """A non-empty sequence of distinct difficulties, as a tuple of ints."""
  if isinstance(difficulties, (str, bytes)) or not isinstance(difficulties, Iterable):
    raise ValueError(f"{name}={difficulties!r} must be a sequence of ints in 1..{MAX_DIFFICULTY}")
  out = tuple(check_difficulty(d, f"{name}[{i}]") for i, d in enumerate(difficulties))
  if not out:
    raise ValueError(f"{name}=() is empty; give at least one difficulty in 1..{MAX_DIFFICULTY}")
  if len(set(out)) != len(out):
    raise ValueError(f"{name}={out!r} repeats a difficulty")
  return out


def from_terms(terms: Sequence[int]) -> Problem:
  """The problem that adds `terms` (digits 0..9) left to right."""
  terms = tuple(int(t) for t in terms)
  check_difficulty(len(terms), "len(terms)")
  if any(not 0 <= t <= 9 for t in terms):
    raise ValueError(f"terms={terms!r} must be digits 0..9")
  partials = np.cumsum(terms).tolist()
  answer = str(partials[-1])
  target = ",".join(str(s) for s in partials) + SEP + answer + END
  return Problem("+".join(str(t) for t in terms) + "=", target, answer, len(terms), terms)


def make_problem(rng: np.random.Generator, difficulty: int) -> Problem:
  """A problem of `difficulty` terms drawn from `rng`."""
  d = check_difficulty(difficulty)
  return from_terms(rng.integers(0, 10, size=d).tolist())


def problem(seed: int, difficulty: int, index: int) -> Problem:
  """Problem `index` of `difficulty` under `seed` (independent of every other index)."""
  d = check_difficulty(difficulty)
  for name, v in (("seed", seed), ("index", index)):
    if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 0:
      raise ValueError(f"{name}={v!r} must be an int >= 0")
  return make_problem(np.random.default_rng([int(seed), d, int(index)]), d)


def problems(seed: int, difficulty: int, n: int, start: int = 0) -> list[Problem]:
  """Problems `start .. start + n - 1` of `difficulty` under `seed`."""
  if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1:
    raise ValueError(f"n={n!r} must be an int >= 1")
  return [problem(seed, difficulty, start + i) for i in range(n)]


def target_len(difficulty: int) -> int:
  """The longest target (bytes, newline included) of a problem of `difficulty` terms."""
  d = check_difficulty(difficulty)
  partial_digits = sum(len(str(9 * k)) for k in range(1, d + 1))
  return partial_digits + (d - 1) + 1 + len(str(9 * d)) + 1


def first_line(text: str) -> str:
  """The output up to (not including) its first newline: what the model answered."""
  return text.split(END, 1)[0]


def output_length(text: str) -> int:
  """Bytes of the first line of `text` (UTF-8), the length an output is measured by."""
  return len(first_line(text).encode("utf-8"))


def extract_answer(text: str) -> str | None:
  """The digits after the last ';' of the first line, or None if there are none.

  "3,8;8\\n..." -> "8"; "3,8;" -> None; "3,8" -> None; "3;x" -> None; " 8" after ';' -> None.
  """
  line = first_line(text)
  if SEP not in line:
    return None
  tail = line.rsplit(SEP, 1)[1]
  return tail if _ANSWER.fullmatch(tail) else None


def is_correct(problem: Problem, text: str) -> bool:
  """Whether the output's answer (`extract_answer`) equals the problem's answer exactly."""
  return extract_answer(text) == problem.answer


def is_exact(problem: Problem, text: str) -> bool:
  """Whether the output's first line equals the target's (scratchpad included)."""
  return first_line(text) == first_line(problem.target)


def prompt_tokens(problem: Problem) -> list[int]:
  """The token ids a model is given: BOS, then the prompt's bytes."""
  return ByteTokenizer().encode(problem.prompt, add_bos=True)


def corpus_problems(seed: int, n: int, difficulties: Sequence[int]) -> list[Problem]:
  """`n` training problems, difficulties in turn: line i is `problem(seed, d_i, i // k)`."""
  ds = check_difficulties(difficulties)
  if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1:
    raise ValueError(f"n={n!r} must be an int >= 1")
  return [problem(seed, ds[i % len(ds)], i // len(ds)) for i in range(n)]


def corpus_text(seed: int, n: int, difficulties: Sequence[int]) -> str:
  """Training text: one problem per line (prompt then target), `corpus_problems` order."""
  return "".join(p.prompt + p.target for p in corpus_problems(seed, n, difficulties))


def write_corpus(folder: str, seed: int, n: int, difficulties: Sequence[int], *,
                 per_doc: int = 16) -> list[str]:
  """`corpus_text` as files of `per_doc` lines in `folder` (a `data.corpus="files"` path).

  Each file is one document ([BOS] + its lines), so training sees problems both
  right after BOS (as `prompt_tokens` asks them) and after a newline. Returns the paths.
  """
  if isinstance(per_doc, bool) or not isinstance(per_doc, int) or per_doc < 1:
    raise ValueError(f"per_doc={per_doc!r} must be an int >= 1")
  lines = [p.prompt + p.target for p in corpus_problems(seed, n, difficulties)]
  return data_lib.write_documents(folder, lines, per_doc)


def overlap(eval_problems: Sequence[Problem], train_problems: Iterable[Problem]) -> float:
  """The fraction of `eval_problems` whose prompt also occurs in `train_problems`."""
  if not eval_problems:
    raise ValueError("eval_problems is empty")
  seen = {p.prompt for p in train_problems}
  return sum(p.prompt in seen for p in eval_problems) / len(eval_problems)

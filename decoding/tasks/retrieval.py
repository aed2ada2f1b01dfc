"""Seeded long-context retrieval tasks with exact verifiers: passkey and key-value lookup.

  p = passkey(seed=0, context_len=512, index=3)        # filler with one needle, then a question
  p.prompt[-38:] == "What is the pass key? The pass key is "; p.answer == "12569"
  q = kv_retrieval(seed=0, context_len=512, index=3)   # "yjnn:yj1w\n..." lines, "? sxsq:"
  is_correct(p, model_text)                            # the first line, stripped, == p.answer

Lengths are bytes (`model.ByteTokenizer`: one token per byte). `context_len` is the
prompt's exact length in bytes (a `ValueError` names the argument outside
MIN_CONTEXT..MAX_CONTEXT); the answer has a fixed length per task (`answer_len`)
and is followed by a newline, so a document BOS + prompt + answer + "\\n" is exactly
`document_len(task, context_len)` tokens. A problem is a function of (task, seed,
context_len, index[, n_pairs]); training corpora and evaluation sets come from
different seeds.

passkey: deterministic filler (FILLER sentences in a seeded order, padded with spaces)
  with "The pass key is NNNNN. Remember it. NNNNN is the pass key. " inserted at a
  sentence boundary at a seeded (or given) depth; the prompt ends "What is the pass
  key? The pass key is " and the answer is the key: 5 distinct digits in increasing
  order (252 keys; a leading 0 allowed). Ordered keys make each next digit a function of
  the digits the needle holds (the smallest one above the last written), which attention
  retrieves by content alone; a random order needs an induction copy, which a small model
  trained for minutes on CPU does not learn (see scripts/retrieval_lib.py).
kv_retrieval: `n_pairs` lines "KEY:VALUE" of random lowercase alphanumerics
  (4 + 4 characters, keys distinct), preceded by filler padding to the exact length,
  then "? KEY:" for one seeded pair; the answer is its VALUE.

`depth` is where the needle sits in the haystack: the bytes before it over the prompt's
bytes outside the needle and the question (0: at the start, 1: right before the question).
"""

from __future__ import annotations

import dataclasses
import string

import numpy as np

from decoding.tasks import base
from model.tokenizer import ByteTokenizer

MIN_CONTEXT = 128
MAX_CONTEXT = 1 << 20
TASKS = ("passkey", "kv")
END = "\n"
FILLER = ("The grass is green. ", "The sky is blue. ", "The sun is yellow. ", "Here we go. ",
          "There and back again. ", "The river runs to the sea. ", "Birds sing in the morning. ",
          "The road is long and quiet. ")
PASSKEY_INTRO = "Find the pass key. "
PASSKEY_QUESTION = "What is the pass key? The pass key is "
PASSKEY_DIGITS = 5
ALPHABET = string.ascii_lowercase + string.digits
KEY_LEN, VALUE_LEN = 4, 4
PAIR_LEN = KEY_LEN + 1 + VALUE_LEN + 1  # "KEY:VALUE\n"
KV_QUERY_PREFIX = "? "
_TASK_ID = {"passkey": 1, "kv": 2}


@dataclasses.dataclass(frozen=True)
class Problem:
  """One retrieval instance: the prompt (exactly `context_len` bytes) and its answer."""

  task: str
  prompt: str
  answer: str
  context_len: int
  depth: float  # bytes before the needle / prompt bytes outside the needle and question
  seed: int
  index: int
  n_pairs: int | None = None  # kv: pairs in the prompt; passkey: None

  @property
  def target(self) -> str:
    """What a model should write after the prompt: the answer, then a newline."""
    return self.answer + END


def _int(value, name: str, lo: int, hi: int | None = None) -> int:
  bad = isinstance(value, bool) or not isinstance(value, (int, np.integer))
  if bad or value < lo or (hi is not None and value > hi):
    valid = f"an int in {lo}..{hi}" if hi is not None else f"an int >= {lo}"
    raise ValueError(f"{name}={value!r} must be {valid}")
  return int(value)


def check_task(task) -> str:
  if task not in TASKS:
    raise ValueError(f"task={task!r}; valid: {TASKS}")
  return task


def check_context_len(context_len, name: str = "context_len") -> int:
  """`context_len` as an int in MIN_CONTEXT..MAX_CONTEXT (prompt bytes), or a ValueError."""
  return _int(context_len, f"{name} (prompt bytes)", MIN_CONTEXT, MAX_CONTEXT)


def answer_len(task: str) -> int:
  """Bytes of every answer of `task` (the newline after it excluded)."""
  return PASSKEY_DIGITS if check_task(task) == "passkey" else VALUE_LEN


def document_len(task: str, context_len: int) -> int:
  """Tokens of BOS + prompt + answer + newline: the same for every problem of a length."""
  return 1 + check_context_len(context_len) + answer_len(task) + 1


def max_pairs(context_len: int) -> int:
  """The most "KEY:VALUE" lines a kv prompt of `context_len` bytes holds."""
  n = check_context_len(context_len)
  return (n - len(KV_QUERY_PREFIX) - KEY_LEN - 1) // PAIR_LEN


def _rng(task: str, seed, context_len: int, index, *extra) -> np.random.Generator:
  seed = _int(seed, "seed", 0)
  index = _int(index, "index", 0)
  return np.random.default_rng([_TASK_ID[task], seed, context_len, index, *extra])


def filler(rng: np.random.Generator, n: int) -> tuple[str, list[int]]:
  """Exactly `n` bytes of whole FILLER sentences in a seeded order, padded with spaces, and
  the byte offsets of its sentence boundaries (0 and the end of every sentence)."""
  parts, bounds, used = [], [0], 0
  while True:
    s = FILLER[int(rng.integers(len(FILLER)))]
    if used + len(s) > n:
      break
    parts.append(s)
    used += len(s)
    bounds.append(used)
  return "".join(parts) + " " * (n - used), bounds


def passkey(seed: int, context_len: int, index: int, *, depth: float | None = None) -> Problem:
  """Passkey problem `index` under `seed`: a needle at `depth` (None: seeded uniform in [0, 1]).

  The needle goes at the sentence boundary of the filler nearest `depth`, so the
  reported `Problem.depth` is close to (within a sentence of), not equal to, it.
  """
  n = check_context_len(context_len)
  if depth is not None and (isinstance(depth, bool) or not isinstance(depth, (int, float))
                            or not 0.0 <= depth <= 1.0):
    raise ValueError(f"depth={depth!r} must be a number in [0, 1] or None (seeded)")
  rng = _rng("passkey", seed, n, index)
  key = "".join(str(d) for d in sorted(rng.permutation(10)[:PASSKEY_DIGITS]))
  drawn = float(rng.random())
  needle = f"The pass key is {key}. Remember it. {key} is the pass key. "
  room = n - len(PASSKEY_INTRO) - len(needle) - len(PASSKEY_QUESTION)
  text, bounds = filler(rng, room)
  want = (drawn if depth is None else float(depth)) * bounds[-1]
  cut = min(bounds, key=lambda b: abs(b - want))
  prompt = PASSKEY_INTRO + text[:cut] + needle + text[cut:] + PASSKEY_QUESTION
  assert len(prompt.encode()) == n, (len(prompt), n)
  depth_ = (len(PASSKEY_INTRO) + cut) / (len(PASSKEY_INTRO) + room)
  return Problem("passkey", prompt, key, n, depth_, int(seed), int(index))


def _token(code: int, width: int) -> str:
  out = []
  for _ in range(width):
    code, r = divmod(code, len(ALPHABET))
    out.append(ALPHABET[r])
  return "".join(out)


def kv_retrieval(seed: int, context_len: int, index: int, n_pairs: int | None = None) -> Problem:
  """Key-value problem `index` under `seed`: `n_pairs` lines (None: `max_pairs`), one queried.

  Fewer pairs than fit leave filler padding (whole sentences, spaces, a newline) at the
  start, so the prompt is still exactly `context_len` bytes.
  """
  n = check_context_len(context_len)
  most = max_pairs(n)
  k = most if n_pairs is None else _int(n_pairs, f"n_pairs (for context_len={n})", 1, most)
  rng = _rng("kv", seed, n, index, k)
  keys, seen = [], set()
  while len(keys) < k:
    c = int(rng.integers(len(ALPHABET) ** KEY_LEN))
    if c not in seen:
      seen.add(c)
      keys.append(_token(c, KEY_LEN))
  values = [_token(int(c), VALUE_LEN) for c in rng.integers(len(ALPHABET) ** VALUE_LEN, size=k)]
  q = int(rng.integers(k))
  pad = n - k * PAIR_LEN - len(KV_QUERY_PREFIX) - KEY_LEN - 1
  head = "" if pad == 0 else filler(rng, pad - 1)[0] + END
  lines = "".join(f"{a}:{b}{END}" for a, b in zip(keys, values, strict=True))
  prompt = head + lines + f"{KV_QUERY_PREFIX}{keys[q]}:"
  assert len(prompt.encode()) == n, (len(prompt), n)
  depth = (pad + q * PAIR_LEN) / max(pad + (k - 1) * PAIR_LEN, 1)
  return Problem("kv", prompt, values[q], n, depth, int(seed), int(index), k)


def problem(task: str, seed: int, context_len: int, index: int, **kw) -> Problem:
  """`passkey(...)` or `kv_retrieval(...)` by name (kw: passkey's depth, kv's n_pairs)."""
  return (passkey if check_task(task) == "passkey" else kv_retrieval)(seed, context_len, index,
                                                                      **kw)


def problems(task: str, seed: int, context_len: int, n: int, start: int = 0, **kw
             ) -> list[Problem]:
  """Problems `start .. start + n - 1` of `task` under `seed`."""
  n = _int(n, "n", 1)
  return [problem(task, seed, context_len, start + i, **kw) for i in range(n)]


def first_line(text: str) -> str:
  """The output up to (not including) its first newline."""
  return text.split(END, 1)[0]


def is_correct(problem: Problem, text: str) -> bool:
  """Whether the output's first line, without surrounding spaces, is exactly the answer."""
  return first_line(text).strip() == problem.answer


def prompt_tokens(problem: Problem, tokenizer=None) -> list[int]:
  """The token ids a model is given: BOS (if the tokenizer has one), then the prompt."""
  tok = tokenizer if tokenizer is not None else ByteTokenizer()
  return tok.encode(problem.prompt, add_bos=tok.bos_id is not None)


class RetrievalTask(base.Task):
  """A retrieval task ("passkey" or "kv_retrieval") behind the `base.Task` interface.

    t = RetrievalTask("passkey")                  # or PASSKEY, KV_RETRIEVAL
    p = t.problem(seed=0, index=3, difficulty=512)  # == problem("passkey", 0, 512, 3)'s fields
    p.target == p.answer + "\\n"; t.is_correct(p, model_text)  # first line, stripped

  Difficulty is (context_len,): the prompt's bytes. `problem(seed, index, difficulty)` is
  the module's `problem(task, seed, context_len, index)` converted to a `base.Problem`
  (task = this task's name, target = answer + END: one step, no ANSWER_SEP; data =
  (seed, index, depth, n_pairs)). The answer is the whole first line, so `extract_answer`,
  `is_correct` and `step_labels` read it (stripped) rather than an ANSWER_SEP.
  """

  knobs = ("context_len",)
  ranges = ((MIN_CONTEXT, MAX_CONTEXT),)
  default_difficulty = (512,)

  def __init__(self, kind: str):
    if kind not in ("passkey", "kv_retrieval"):
      raise ValueError(f"kind={kind!r}; valid: ('passkey', 'kv_retrieval')")
    self.name = kind
    self.kind = "passkey" if kind == "passkey" else "kv"  # the name in TASKS

  def problem(self, seed: int, index: int, difficulty=None) -> base.Problem:
    """Problem `index` under `seed`: the module's `problem(kind, seed, context_len, index)`."""
    (context_len,) = self.check_difficulty(difficulty)
    p = problem(self.kind, seed, context_len, index)  # the module-level function
    return base.Problem(task=self.name, prompt=p.prompt, target=p.target, answer=p.answer,
                        difficulty=(context_len,), data=(p.seed, p.index, p.depth, p.n_pairs))

  def make(self, rng: np.random.Generator, difficulty: tuple[int, ...]) -> base.Problem:
    """A problem with a seed and an index drawn from `rng` (`problem` does not use this)."""
    seed, index = (int(x) for x in rng.integers(0, 2**31, size=2))
    return self.problem(seed, index, difficulty)

  def extract_answer(self, text: str) -> str | None:
    """The stripped first line of a finished output (None if unfinished or blank)."""
    if not base.is_finished(text):
      return None
    return first_line(text).strip() or None

  def is_correct(self, problem: base.Problem, text: str) -> bool:
    """The module's rule: the output's first line, stripped, is exactly the answer."""
    return first_line(text).strip() == problem.answer

  def step_labels(self, problem: base.Problem, text: str) -> list[bool]:
    """One label per `base.segments(text)`: a finished output's are all `is_correct`; an
    unfinished one's complete segments (a STEP_SEP was written, and no answer holds one)
    are all False."""
    ok = base.is_finished(text) and self.is_correct(problem, text)
    return [ok] * len(base.segments(text))

  def max_target_len(self, difficulty=None) -> int:
    self.check_difficulty(difficulty)
    return answer_len(self.kind) + len(END)


PASSKEY = RetrievalTask("passkey")
KV_RETRIEVAL = RetrievalTask("kv_retrieval")

"""Seeded verifiable tasks: multi-step arithmetic, Countdown, passkey / key-value retrieval.

Every search task implements `base.Task` (generator, exact verifier, answer extraction,
step segmentation, oracle step labels); `get_task(name)` returns one by name. The
retrieval module's own functions (`passkey`, `kv_retrieval`, ...) stay exported for the
long-context scripts.
"""

from decoding.tasks import arithmetic, base, countdown, retrieval
from decoding.tasks.arithmetic import ARITHMETIC, Arithmetic
from decoding.tasks.base import Task
from decoding.tasks.countdown import COUNTDOWN, Countdown, solvable
from decoding.tasks.retrieval import (
    KV_RETRIEVAL,
    MAX_CONTEXT,
    MIN_CONTEXT,
    PASSKEY,
    TASKS,
    Problem,
    RetrievalTask,
    answer_len,
    check_context_len,
    document_len,
    is_correct,
    kv_retrieval,
    max_pairs,
    passkey,
    problem,
    problems,
    prompt_tokens,
)

SEARCH_TASKS = {t.name: t for t in (ARITHMETIC, COUNTDOWN, PASSKEY, KV_RETRIEVAL)}


def get_task(name: str) -> Task:
  """The task called `name` (one of SEARCH_TASKS), or a ValueError listing them."""
  if name not in SEARCH_TASKS:
    raise ValueError(f"unknown task {name!r}; valid: {', '.join(SEARCH_TASKS)}")
  return SEARCH_TASKS[name]


__all__ = ["ARITHMETIC", "Arithmetic", "COUNTDOWN", "Countdown", "KV_RETRIEVAL", "MAX_CONTEXT",
           "MIN_CONTEXT", "PASSKEY", "Problem", "RetrievalTask", "SEARCH_TASKS", "TASKS", "Task",
           "answer_len", "arithmetic", "base", "check_context_len", "countdown", "document_len",
           "get_task", "is_correct", "kv_retrieval", "max_pairs", "passkey", "problem",
           "problems", "prompt_tokens", "retrieval", "solvable"]

"""Seeded synthetic tasks with exact verifiers for decoding evaluations (long-context retrieval)."""

from decoding.tasks.retrieval import (
    MAX_CONTEXT,
    MIN_CONTEXT,
    TASKS,
    Problem,
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

__all__ = ["MAX_CONTEXT", "MIN_CONTEXT", "TASKS", "Problem", "answer_len", "check_context_len",
           "document_len", "is_correct", "kv_retrieval", "max_pairs", "passkey", "problem",
           "problems", "prompt_tokens"]

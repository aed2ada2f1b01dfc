"""Shared-prefix sampling (Hydragen): N samples of one prompt read the prompt's KV once.

The prompt (all but its last token) is prefilled once into a batch-1 prefix
cache. The N samples then decode through `decoding.generate` with a suffix
cache of their own, both in one `model.PrefixCache`; every layer attends the N
queries to the prefix as ONE batched matmul and to their own suffix, and merges
the two by log-sum-exp, which is exact (behind the attention door). Per decode step the prefix
KV is read once instead of N times, so throughput stays nearly flat as the
shared prompt grows, where naive batching (N copies of the prompt's KV) slows
down in proportion to N * prompt length.

Each row's PRNG stream is `fold_in(row_key, suffix position)` (generate's
rule applied to the suffix), so samples match naive batched sampling with
the same per-position keys, not `generate` on the full prompt.
"""

from __future__ import annotations

import dataclasses
import functools
import time

import jax
import jax.numpy as jnp
import numpy as np

from decoding import cost as cost_lib
from decoding import request
from decoding.generate import GenerateOutput, generate
from decoding.sampling import Sampler
from model.decoder import Decoder
from model.kv_cache import KVCache, PrefixCache
from model.transformer import check_token_ids

PREFILL_CHUNK = 512  # prefix tokens per prefill call: bounds the [chunk, P] attention scores


@functools.cache
def _prefill_fn(decoder: Decoder):
  return jax.jit(lambda params, tokens_1C, cache: decoder(params, tokens_1C, cache)[1],
                 donate_argnums=(2,))


def _prefix_ids(cfg, prefix_tokens) -> np.ndarray:
  """The shared prompt as int64 ids [P], checked: non-empty, integer, inside the vocabulary."""
  tokens = np.asarray(prefix_tokens).reshape(-1)
  if tokens.size == 0:
    raise ValueError("prefix_tokens is empty; the shared prompt needs >= 1 token")
  check_token_ids("prefix_tokens", tokens, cfg.vocab_size)
  return tokens.astype(np.int64)


def prefill_prefix(cfg, params, prefix_tokens) -> tuple[KVCache, int, cost_lib.Cost]:
  """A batch-1 cache holding every prefix token but the last (lengths = P - 1), the last
  token, and the prefill's cost.

  The cache length is a power-of-two bucket (few compilations); the prefix is
  written in chunks of PREFILL_CHUNK tokens.
  """
  t0 = time.perf_counter()
  decoder = Decoder(cfg)
  tokens = _prefix_ids(cfg, prefix_tokens)
  p = len(tokens)
  cache = decoder.init_cache(1, min(request.bucket(max(p - 1, 1)), cfg.max_seq_len))
  chunk = min(PREFILL_CHUNK, cache.max_len)
  padded = np.zeros((1, request.round_up(max(p - 1, 1), chunk)), np.int32)
  padded[0, : p - 1] = tokens[:-1]
  fn = _prefill_fn(decoder)
  calls = 0
  for start in range(0, p - 1, chunk):
    if start + chunk > cache.max_len:  # the last chunk would overrun: shift it back
      start = cache.max_len - chunk
      cache = cache.with_lengths(jnp.full_like(cache.lengths, start))
    cache = fn(params, jnp.asarray(padded[:, start : start + chunk]), cache)
    calls += 1
  cache = jax.block_until_ready(cache.with_lengths(jnp.full_like(cache.lengths, p - 1)))
  cost = cost_lib.Cost(wall_time_s=time.perf_counter() - t0)
  if calls:
    cost += cost_lib.forward_cost(decoder, params, cache, chunk, calls=calls)
  return cache, int(tokens[-1]), cost


def sample_shared_prefix(cfg, params, prefix_tokens, n_samples: int, *, max_new_tokens: int,
                         sampler: Sampler | None = None, share_prefix: bool = True,
                         step_fn: Decoder | None = None, **generate_kwargs) -> GenerateOutput:
  """N continuations of one prompt, attending to the prompt's KV once per step.

  Args:
    prefix_tokens: the shared prompt (token ids, >= 1).
    sampler: per-row settings for the N rows (repetition_penalty must be 1: the
      penalty's seen set would not include the prompt).
    share_prefix: False keeps N copies of the prompt's KV (the naive memory
      layout and traffic, same numerics): the benchmark's baseline.
    step_fn: the decoding step over the `PrefixCache` (default `model.Decoder(cfg)`).
    generate_kwargs: key, eos_id, stop_sequences, pad_id, stream_fn, mesh ...
      passed to `decoding.generate`.
  Returns generate's output; its cost includes the prefix prefill.
  """
  tokens = _prefix_ids(cfg, prefix_tokens)
  # generate checks these too, but only after the prefix prefill has run: check them first.
  request.check_ids(cfg.vocab_size, **{k: generate_kwargs[k] for k in (
      "pad_id", "eos_id", "stop_sequences") if k in generate_kwargs})
  n_samples = request.check_count("n_samples", n_samples)
  max_new_tokens = request.check_count("max_new_tokens", max_new_tokens)
  if tokens.size + max_new_tokens - 1 > cfg.max_seq_len:
    raise ValueError(f"prompt length {tokens.size} + max_new_tokens={max_new_tokens} exceeds "
                     f"the model's max_seq_len={cfg.max_seq_len}")
  sampler = Sampler.greedy(n_samples) if sampler is None else sampler
  if bool(jnp.any(sampler.repetition_penalty != 1.0)):
    raise ValueError("repetition_penalty must be 1 for shared-prefix sampling (the prompt is "
                     "not in the penalty's seen set)")
  decoder = step_fn or Decoder(cfg)
  prefix, last, prefill_cost = prefill_prefix(cfg, params, tokens)
  if not share_prefix:
    prefix = prefix.take(jnp.zeros((n_samples,), jnp.int32))
  cache = lambda b, n: PrefixCache(prefix=prefix, suffix=decoder.init_cache(b, n))
  out = generate(params, [[last]] * n_samples, decoder, sampler=sampler,
                 max_new_tokens=max_new_tokens, cache=cache, **generate_kwargs)
  return dataclasses.replace(out, cost=prefill_cost + out.cost)

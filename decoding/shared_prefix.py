"""Shared-prefix sampling (Hydragen): N samples of one prompt read the prompt's KV once.

The prompt (all but its last token) is prefilled once into a batch-1 prefix
cache. The N samples then decode through `decoding.generate` with a suffix
cache of their own; every layer attends the N queries to the prefix as ONE
batched matmul (`model.apply(..., prefix_cache=)`) and to their own suffix,
and merges the two by log-sum-exp, which is exact. Per decode step the prefix
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
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from decoding import cost as cost_lib
from decoding import prompts as prompts_lib
from decoding.generate import GenerateOutput, generate
from decoding.kv_cache import KVCache, gather_rows, init_cache
from decoding.sampling import Sampler


@functools.cache
def prefix_step_fn(cfg) -> Callable:
  """`step_fn((params, prefix_cache), tokens, suffix_cache)` for `decoding.generate`."""
  from model import transformer  # local: model imports decoding.kv_cache

  def step_fn(params_and_prefix, tokens_BT, cache):
    params, prefix = params_and_prefix
    return transformer.apply(cfg, params, tokens_BT, cache=cache, prefix_cache=prefix)

  return step_fn


PREFILL_CHUNK = 512  # prefix tokens per prefill call: bounds the [chunk, P] attention scores


@functools.cache
def _prefill_fn(cfg) -> Callable:
  from model import transformer

  def prefill(params, tokens_1C, cache):
    return transformer.apply(cfg, params, tokens_1C, cache=cache)[1]

  return jax.jit(prefill, donate_argnums=(2,))


def prefill_prefix(cfg, params, prefix_tokens) -> tuple[KVCache, int]:
  """A batch-1 cache holding every prefix token but the last (lengths = P - 1), and the last.

  The cache length is a power-of-two bucket (few compilations); the prefix is
  written in chunks of PREFILL_CHUNK tokens.
  """
  tokens = np.asarray(prefix_tokens, np.int64).reshape(-1)
  p = len(tokens)
  cache = init_cache(cfg, 1, min(prompts_lib.bucket(max(p - 1, 1)), cfg.max_seq_len))
  chunk = min(PREFILL_CHUNK, cache.max_len)
  padded = np.zeros((1, prompts_lib.round_up(max(p - 1, 1), chunk)), np.int32)
  padded[0, : p - 1] = tokens[:-1]
  fn = _prefill_fn(cfg)
  for start in range(0, p - 1, chunk):
    if start + chunk > cache.max_len:  # the last chunk would overrun: shift it back
      start = cache.max_len - chunk
      cache = cache.replace(lengths=jnp.full_like(cache.lengths, start))
    cache = fn(params, jnp.asarray(padded[:, start : start + chunk]), cache)
  return cache.replace(lengths=jnp.full_like(cache.lengths, p - 1)), int(tokens[-1])


def sample_shared_prefix(cfg, params, prefix_tokens, n_samples: int, *, max_new_tokens: int,
                         sampler: Sampler | None = None, share_prefix: bool = True,
                         **generate_kwargs) -> GenerateOutput:
  """N continuations of one prompt, attending to the prompt's KV once per step.

  Args:
    prefix_tokens: the shared prompt (token ids, >= 1).
    sampler: per-row settings for the N rows (repetition_penalty must be 1: the
      penalty's seen set would not include the prompt).
    share_prefix: False keeps N copies of the prompt's KV (the naive memory
      layout and traffic, same numerics): the benchmark's baseline.
    generate_kwargs: key, eos_id, stop_sequences, pad_id, stream_fn, mesh ...
      passed to `decoding.generate`.
  Returns generate's output; its cost includes the prefix prefill.
  """
  t0 = time.perf_counter()
  tokens = np.asarray(prefix_tokens).reshape(-1)
  if tokens.size == 0:
    raise ValueError("prefix_tokens is empty; the shared prompt needs >= 1 token")
  if not isinstance(n_samples, (int, np.integer)) or n_samples < 1:
    raise ValueError(f"n_samples={n_samples!r} must be an integer >= 1")
  if not isinstance(max_new_tokens, (int, np.integer)) or max_new_tokens < 1:
    raise ValueError(f"max_new_tokens={max_new_tokens!r} must be an integer >= 1")
  if tokens.size + max_new_tokens - 1 > cfg.max_seq_len:
    raise ValueError(f"prompt length {tokens.size} + max_new_tokens={max_new_tokens} exceeds "
                     f"the model's max_seq_len={cfg.max_seq_len}")
  sampler = Sampler.greedy(n_samples) if sampler is None else sampler
  if bool(jnp.any(sampler.repetition_penalty != 1.0)):
    raise ValueError("repetition_penalty must be 1 for shared-prefix sampling (the prompt is "
                     "not in the penalty's seen set)")
  prefix, last = prefill_prefix(cfg, params, tokens)
  if not share_prefix:
    prefix = gather_rows(prefix, jnp.zeros((n_samples,), jnp.int32))
  t_prefill = time.perf_counter() - t0
  out = generate((params, prefix), [[last]] * n_samples, prefix_step_fn(cfg), sampler=sampler,
                 max_new_tokens=max_new_tokens, cache=functools.partial(init_cache, cfg),
                 **generate_kwargs)
  cost = _cost(cfg, params, prefix, out, int(tokens.size), t_prefill)
  return dataclasses.replace(out, cost=cost)


def _cost(cfg, params, prefix: KVCache, out: GenerateOutput, p: int,
          t_prefill: float) -> cost_lib.Cost:
  """Prefix prefill once, then generate's steps, each reading the prefix KV once."""
  h, dh, n_layers = cfg.n_heads, cfg.dh, cfg.n_layers
  n, s = out.cache.batch, out.cache.max_len
  total = cost_lib.Cost(tokens=out.cost.tokens, wall_time_s=out.cost.wall_time_s + t_prefill)
  if p > 1:
    total += cost_lib.forward_cost(params, prefix.max_len, attn_flops=cost_lib.attention_flops(
        n_layers, h, dh, prefix.max_len, prefix.max_len))
  steps = out.cost.forward_passes
  step = cost_lib.forward_cost(
      params, n, kv_read_bytes=prefix.nbytes + out.cache.nbytes,
      attn_flops=cost_lib.attention_flops(n_layers, h, dh, n, prefix.max_len + s))
  for f in ("forward_passes", "forward_tokens", "flops", "bytes_moved"):
    total = total.replace(**{f: getattr(total, f) + steps * getattr(step, f)})
  return total

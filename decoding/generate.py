"""Jitted generation: prefill, then one `lax.while_loop` of decode steps over fixed buffers.

The model enters as `step_fn(params, tokens_BT, cache) -> (logits_BTV, cache)`, a
`model.Decoder(cfg)` (a static jit key; equal configs share one compilation).
Prompts are right-padded to power-of-two buckets, so new prompt lengths rarely
recompile; sampler settings, stop sequences, keys and `max_new_tokens` below the
buffer size are traced values and never do.
"""

from __future__ import annotations

import dataclasses
import enum
import time
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
from jaxtyping import Array

from decoding import cost as cost_lib
from decoding import request
from decoding.sampling import Sampler, sample
from model.kv_cache import KVCache, PrefixCache


class Finish(enum.IntEnum):
  """Why a row stopped (`GenerateOutput.finish_reason`)."""

  RUNNING = 0
  MAX_TOKENS = 1
  EOS = 2
  STOP_SEQUENCE = 3
  CACHE_FULL = 4  # only with stop_on_full_cache=True


@dataclasses.dataclass(frozen=True)
class GenerateOutput:
  """Generated continuations (prompt excluded); entries past `lengths` hold pad_id / 0."""

  tokens: Array  # i32[B, max_new_tokens]; includes the EOS / stop tokens that ended a row
  logprobs: Array  # f32[B, max_new_tokens]: log p(token) under the unprocessed model
  lengths: Array  # i32[B]
  finish_reason: Array  # i32[B], a Finish code
  cost: cost_lib.Cost
  cache: KVCache  # the final cache (the donated input's buffers); lengths = tokens written


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class GenState:
  """The while_loop state of `generate`."""

  step: Array  # tokens generated so far by every still-active row
  next_B: Array  # the token each row feeds next
  tokens_BL: Array
  logprobs_BL: Array
  lengths_B: Array
  done_B: Array
  reason_B: Array
  seen_BV: Array  # tokens in prompt or output (repetition penalty)
  cache: KVCache | PrefixCache


def generate(params, prompt_tokens, step_fn, *, sampler: Sampler | None = None,
             max_new_tokens: int, cache=None, prompt_lengths=None, key: Array | None = None,
             eos_id: int | Sequence[int] | None = None,
             stop_sequences: Sequence[Sequence[int]] = (), pad_id: int = 0,
             stop_on_full_cache: bool = False, stop_after: int | None = None,
             stream_fn: Callable | None = None,
             mesh: jax.sharding.Mesh | None = None, data_axis: str = "data") -> GenerateOutput:
  """Samples up to `max_new_tokens` per prompt; see GenerateOutput.

  Runs as one jitted program: a prefill of every prompt token but the last, then
  a `lax.while_loop` of one-token steps (sample, record, check stops) until every
  row stopped. Sampler settings apply in the order documented in
  `decoding.sampling`; log-probs are reported under the unprocessed model.

  Args:
    step_fn: a `model.Decoder` (reuse equal ones: it is a static jit key).
    prompt_tokens: a list of token-id lists (ragged), or an int array [B, P]
      right-padded, with `prompt_lengths` [B].
    sampler: per-row settings (`Sampler.create`); None = greedy.
    cache: None (`step_fn.init_cache`), an empty cache with batch B (donated: do not
      reuse it), a `model.PrefixCache` (rows continue after a shared prefix, which is
      not donated and may be reused; its suffix is), or a factory
      `(batch, max_len) -> cache`; factories are called with the needed length
      rounded up to a multiple of 64.
    key: per-row keys [B] (a row's output then never depends on the batch), or
      one key, turned into row keys by `fold_in(key, row)`. Token t of a row
      uses `fold_in(row_key, position)`. Unused by greedy rows.
    eos_id / stop_sequences: a row stops after emitting one of these (token-id
      sequences are matched against the generated tokens).
    stop_after: stop the whole batch once this many rows have stopped (for any
      reason); the rows still running then end with finish_reason RUNNING (cut off).
      None = run until every row stops. A traced value: it never recompiles.
    stop_on_full_cache: False: a cache too small for max_new_tokens is a
      ValueError before any compute. True: such rows stop with CACHE_FULL.
    stream_fn: host callback `(step, tokens_B, active_B)` called once per step
      (a static jit key: reuse one function object).
    mesh: shard the batch over `mesh`'s `data_axis` (params are replicated unless
      they already live on the mesh).
  """
  t0 = time.perf_counter()
  if stream_fn is not None and mesh is not None and mesh.size > 1:
    raise ValueError("stream_fn needs a single device (JAX orders host callbacks only there); "
                     "drop mesh or stream_fn")
  req = request.prepare(step_fn, prompt_tokens, max_new_tokens=max_new_tokens, cache=cache,
                        prompt_lengths=prompt_lengths, sampler=sampler, key=key, eos_id=eos_id,
                        stop_sequences=stop_sequences, pad_id=pad_id,
                        stop_on_full_cache=stop_on_full_cache)
  # A shared prefix is read, never written: it is passed undonated, so it can be reused.
  own, shared = (req.cache.suffix, req.cache.prefix) if isinstance(req.cache, PrefixCache) else (
      req.cache, None)
  batch_args = (jnp.asarray(req.prompt_BP), jnp.asarray(req.lengths_B), req.sampler, req.keys_B,
                own)
  if stop_after is not None:
    stop_after = request.check_count("stop_after", stop_after)
  other_args = (shared, req.eos_E, req.stop_NS, jnp.int32(req.max_new_tokens), jnp.int32(pad_id),
                jnp.int32(req.batch if stop_after is None else min(stop_after, req.batch)))
  if mesh is not None:
    params, batch_args, other_args = request.shard_batch(mesh, data_axis, params, batch_args,
                                                         other_args)
  out = _generate_jit(params, *batch_args, *other_args, step_fn=step_fn,
                      prefill_len=req.prefill_len, buf_len=req.buf_len, stream_fn=stream_fn)
  st = jax.block_until_ready(out)
  final = st.cache if shared is None else PrefixCache(prefix=shared, suffix=st.cache)
  n, b = req.max_new_tokens, req.batch
  return GenerateOutput(
      tokens=st.tokens_BL[:, :n], logprobs=st.logprobs_BL[:, :n], lengths=st.lengths_B,
      finish_reason=st.reason_B,
      cost=cost_lib.generation_cost(step_fn, params, final, prefill_rows=b,
                                    prefill_len=req.prefill_len, steps=int(st.step),
                                    step_rows=b, tokens=int(st.lengths_B.sum()),
                                    wall_time_s=time.perf_counter() - t0),
      cache=final)


def prefill(params, step_fn: Callable, prompt_BP: Array, lens_B: Array, cache,
            prefill_len: int) -> tuple[KVCache | PrefixCache, Array]:
  """Writes every prompt token but the last into the cache; returns (cache, last tokens [B]).

  Rows are right-padded; slot j holds position j, and lengths are then set to
  `lens - 1`, so later writes overwrite the padding. Feeding the last prompt
  token as the first decode step means no prefill logits are needed (XLA drops
  the LM head of the prefill).
  """
  cache = cache.with_lengths(jnp.zeros_like(cache.lengths))
  limit = hasattr(cache, "with_limit")  # an EvictingCache: never keep or score the padding
  if limit:
    cache = cache.with_limit(lens_B - 1)
  if prefill_len:
    _, cache = step_fn(params, prompt_BP[:, :prefill_len], cache)
  last_B = jnp.take_along_axis(prompt_BP, (lens_B - 1)[:, None], axis=1)[:, 0]
  cache = cache.with_lengths(lens_B - 1)
  return (cache.with_limit(None) if limit else cache), last_B


def stop_match(tokens_BL: Array, n: Array, stop_NS: Array) -> Array:
  """True for rows whose first `n` generated tokens end with a stop sequence.

  `stop_NS` is right-aligned with -1 as left padding (`request.stop_array`).
  """
  s = stop_NS.shape[1]
  idx_S = n - s + jnp.arange(s)
  window_BS = jnp.take(tokens_BL, jnp.clip(idx_S, 0, tokens_BL.shape[1] - 1), axis=1)
  same_BNS = (idx_S >= 0)[None, None] & (window_BS[:, None] == stop_NS[None])
  ok_BNS = (stop_NS[None] == -1) | same_BNS
  return jnp.any(jnp.all(ok_BNS, axis=-1) & jnp.any(stop_NS >= 0, axis=-1)[None], axis=-1)


def seen_prompt(prompt_BP: Array, lens_B: Array, vocab_size: int) -> Array:
  """bool[B, V]: the tokens of each row's prompt (the repetition penalty's initial set)."""
  b = prompt_BP.shape[0]
  pos_BP = jnp.arange(prompt_BP.shape[1])[None]
  return jnp.zeros((b, vocab_size), bool).at[jnp.arange(b)[:, None], prompt_BP].max(
      pos_BP < lens_B[:, None])


def _run(params, prompt_BP, lens_B, sampler, keys_B, cache, shared, eos_E, stop_NS, max_new,
         pad_id, stop_after, *, step_fn, prefill_len, buf_len, stream_fn):
  b = prompt_BP.shape[0]
  if shared is not None:
    cache = PrefixCache(prefix=shared, suffix=cache)
  cache, last_B = prefill(params, step_fn, prompt_BP, lens_B, cache, prefill_len)
  s_max, v = cache.max_len, step_fn.vocab_size
  rows_B = jnp.arange(b)

  def body(st: GenState) -> GenState:
    active_B = ~st.done_B
    logits_BTV, cache = step_fn(params, st.next_B[:, None], st.cache)
    cache = cache.with_lengths(jnp.where(active_B, cache.lengths, st.cache.lengths))
    logits_BV = logits_BTV[:, -1].astype(jnp.float32)
    step_keys = jax.vmap(jax.random.fold_in)(keys_B, cache.lengths)
    tok_B = sample(logits_BV, sampler, step_keys, st.seen_BV)
    lp_B = jnp.take_along_axis(jax.nn.log_softmax(logits_BV), tok_B[:, None], axis=1)[:, 0]
    tok_B = jnp.where(active_B, tok_B, pad_id)
    tokens_BL = st.tokens_BL.at[:, st.step].set(tok_B)
    logprobs_BL = st.logprobs_BL.at[:, st.step].set(jnp.where(active_B, lp_B, 0.0))
    seen_BV = st.seen_BV.at[rows_B, tok_B].max(active_B)
    n = st.step + 1
    reasons = [  # first match wins
        (jnp.isin(tok_B, eos_E), Finish.EOS),
        (stop_match(tokens_BL, n, stop_NS), Finish.STOP_SEQUENCE),
        (jnp.broadcast_to(n >= max_new, (b,)), Finish.MAX_TOKENS),
        (cache.lengths >= s_max, Finish.CACHE_FULL),
    ]
    reason_B = st.reason_B
    for hit_B, code in reversed(reasons):
      reason_B = jnp.where(active_B & hit_B, int(code), reason_B)
    if stream_fn is not None:
      jax.debug.callback(stream_fn, st.step, tok_B, active_B, ordered=True)
    return GenState(step=n, next_B=tok_B, tokens_BL=tokens_BL, logprobs_BL=logprobs_BL,
                    lengths_B=st.lengths_B + active_B, done_B=reason_B != Finish.RUNNING,
                    reason_B=reason_B, seen_BV=seen_BV, cache=cache)

  def cond(st: GenState):
    return (st.step < buf_len) & ~jnp.all(st.done_B) & (jnp.sum(st.done_B) < stop_after)

  # CACHE_FULL can only fire when the host check was waived by stop_on_full_cache=True.
  zeros_B = jnp.zeros((b,), jnp.int32)
  st = GenState(step=jnp.int32(0), next_B=last_B,
                tokens_BL=jnp.full((b, buf_len), pad_id, jnp.int32),
                logprobs_BL=jnp.zeros((b, buf_len), jnp.float32), lengths_B=zeros_B,
                done_B=zeros_B != 0, reason_B=zeros_B, seen_BV=seen_prompt(prompt_BP, lens_B, v),
                cache=cache)
  st = jax.lax.while_loop(cond, body, st)
  return st if shared is None else dataclasses.replace(st, cache=st.cache.suffix)


_generate_jit = jax.jit(
    _run, static_argnames=("step_fn", "prefill_len", "buf_len", "stream_fn"),
    donate_argnames=("cache",))

"""Token-level beam search with a length penalty and EOS handling, one jitted while_loop.

A hypothesis y of n generated tokens scores  sum_t log p(y_t | ...) / n ** length_penalty
(0 = plain log-probability; > 0 favours longer outputs). A beam that emits EOS
moves to a pool of W finished hypotheses (the EOS token counts in n); W live
beams continue. At `max_new_tokens` the live beams join the pool. The loop also
stops early, exactly, once no live beam can still beat the worst finished one.
Beams share each prompt's prefill: the cache is fanned out with `gather_rows`.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array

from decoding import cost as cost_lib
from decoding import prompts as prompts_lib
from decoding.generate import prefill
from decoding.kv_cache import KVCache, gather_rows


@dataclasses.dataclass(frozen=True)
class BeamOutput:
  """W hypotheses per prompt, best first; entries past `lengths` hold pad_id."""

  tokens: Array  # i32[B, W, max_new_tokens]
  lengths: Array  # i32[B, W] (0 for an empty slot: fewer than W hypotheses exist)
  scores: Array  # f32[B, W]: length-penalised score (-inf for an empty slot)
  logprobs: Array  # f32[B, W]: summed token log-probs
  cost: cost_lib.Cost


class _State(NamedTuple):
  step: Array
  next_BW: Array
  alive_BWL: Array
  alive_lp_BW: Array
  fin_BWL: Array
  fin_score_BW: Array
  fin_lp_BW: Array
  fin_len_BW: Array
  cache: KVCache


def beam_search(params, prompt_tokens, step_fn: Callable, *, beam_width: int,
                max_new_tokens: int, cache: KVCache | Callable[[int, int], KVCache],
                prompt_lengths=None, eos_id: int | Sequence[int] | None = None,
                length_penalty: float = 1.0, pad_id: int = 0) -> BeamOutput:
  """Beam search from each prompt; `cache` is an empty KVCache for the B prompts (or a factory)."""
  t0 = time.perf_counter()
  prompt_BP, lens_B = prompts_lib.pad_prompts(prompt_tokens, prompt_lengths, pad_id)
  b = prompt_BP.shape[0]
  if not isinstance(beam_width, (int, np.integer)) or beam_width < 1:
    raise ValueError(f"beam_width={beam_width!r} must be an integer >= 1")
  if not isinstance(max_new_tokens, (int, np.integer)) or max_new_tokens < 1:
    raise ValueError(f"max_new_tokens={max_new_tokens!r} must be an integer >= 1")
  if not np.isfinite(length_penalty):
    raise ValueError(f"length_penalty={length_penalty!r} must be finite")
  max_prompt = int(lens_B.max())
  need = max_prompt + max_new_tokens - 1
  cache = prompts_lib.make_cache(cache, b, max_prompt, need)
  prompts_lib.check_cache(cache, b, max_prompt, need, stop_on_full_cache=False)
  eos_E = jnp.asarray(np.atleast_1d(np.asarray(-1 if eos_id is None else eos_id, np.int32)))
  t = min(prompts_lib.bucket(max_prompt - 1), cache.max_len) if max_prompt > 1 else 0
  out = _beam_jit(params, jnp.asarray(prompt_BP), jnp.asarray(lens_B), cache, eos_E,
                  jnp.float32(length_penalty), jnp.int32(pad_id), step_fn=step_fn,
                  prefill_len=t, width=int(beam_width), max_new=int(max_new_tokens))
  tokens, lengths, scores, lps, steps = jax.block_until_ready(out)
  steps, w = int(steps), int(beam_width)
  wall = time.perf_counter() - t0
  total = cost_lib.generation_cost(params, cache, prefill_rows=b, prefill_len=t, steps=steps,
                                   step_rows=b * w, tokens=int(lengths.sum()), wall_time_s=wall)
  return BeamOutput(tokens=tokens, lengths=lengths, scores=scores, logprobs=lps, cost=total)


def _top(score_BN: Array, k: int, *arrays: Array):
  """The k best entries along axis 1 of `score` and the matching rows of each array."""
  top_BK, idx_BK = jax.lax.top_k(score_BN, k)
  return (top_BK, *(jnp.take_along_axis(a, idx_BK.reshape(idx_BK.shape + (1,) * (a.ndim - 2)),
                                        axis=1) for a in arrays))


def _run(params, prompt_BP, lens_B, cache, eos_E, alpha, pad_id, *, step_fn, prefill_len,
         width, max_new):
  b, w = prompt_BP.shape[0], width
  cache, last_B = prefill(params, step_fn, prompt_BP, lens_B, cache, prefill_len)
  cache = gather_rows(cache, jnp.repeat(jnp.arange(b), w))
  neg = jnp.float32(-jnp.inf)
  # Only beam 0 starts alive, so the first step expands one copy of each prompt.
  alive_lp_BW = jnp.where(jnp.arange(w)[None] == 0, 0.0, neg) * jnp.ones((b, 1))
  lengths_f = lambda n: jnp.maximum(n, 1).astype(jnp.float32) ** alpha

  def body(st: _State) -> _State:
    logits_NTV, cache = step_fn(params, st.next_BW.reshape(b * w, 1), st.cache)
    v = logits_NTV.shape[-1]
    logp_BWV = jax.nn.log_softmax(logits_NTV[:, -1].astype(jnp.float32)).reshape(b, w, v)
    cand_BN = (st.alive_lp_BW[:, :, None] + logp_BWV).reshape(b, w * v)
    k = min(2 * w, w * v)  # 2W candidates leave W that do not end in EOS
    lp_BK, idx_BK = jax.lax.top_k(cand_BN, k)
    src_BK, tok_BK = idx_BK // v, (idx_BK % v).astype(jnp.int32)
    seq_BKL = jnp.take_along_axis(st.alive_BWL, src_BK[:, :, None], axis=1)
    seq_BKL = seq_BKL.at[:, :, st.step].set(tok_BK)
    n = st.step + 1
    eos_BK = jnp.isin(tok_BK, eos_E)
    # Finished pool: old W plus the new EOS candidates, keep the best W.
    new_score_BK = jnp.where(eos_BK, lp_BK / lengths_f(n), neg)
    fin_score, fin_seq, fin_lp, fin_len = _top(
        jnp.concatenate([st.fin_score_BW, new_score_BK], 1), w,
        jnp.concatenate([st.fin_BWL, seq_BKL], 1),
        jnp.concatenate([st.fin_lp_BW, lp_BK], 1),
        jnp.concatenate([st.fin_len_BW, jnp.full_like(tok_BK, n)], 1))
    # Live beams: the best W candidates that did not emit EOS.
    alive_lp, alive_seq, src, tok = _top(jnp.where(eos_BK, neg, lp_BK), w, seq_BKL, src_BK,
                                         tok_BK)
    rows_N = (jnp.arange(b)[:, None] * w + src).reshape(-1)
    return _State(n, tok, alive_seq, alive_lp, fin_seq, fin_score, fin_lp, fin_len,
                  gather_rows(cache, rows_N))

  def cond(st: _State):
    n = st.step
    best_alive_B = jnp.max(st.alive_lp_BW, axis=1)
    # Highest score any live beam can still reach (log-probs only fall as it grows).
    bound_len = jnp.where(alpha >= 0, max_new, n + 1)
    bound_B = best_alive_B / lengths_f(bound_len)
    settled_B = jnp.min(st.fin_score_BW, axis=1) >= bound_B
    return (n < max_new) & ~jnp.all(settled_B | (best_alive_B == neg))

  st = _State(jnp.int32(0), jnp.broadcast_to(last_B[:, None], (b, w)),
              jnp.full((b, w, max_new), pad_id, jnp.int32), alive_lp_BW,
              jnp.full((b, w, max_new), pad_id, jnp.int32), jnp.full((b, w), neg),
              jnp.full((b, w), neg), jnp.zeros((b, w), jnp.int32), cache)
  st = jax.lax.while_loop(cond, body, st)
  # Live beams count only if they reached max_new_tokens (an early stop proved them worse).
  at_max = st.step >= max_new
  alive_score = jnp.where(at_max, st.alive_lp_BW / lengths_f(st.step), neg)
  scores, seqs, lps, lens = _top(
      jnp.concatenate([st.fin_score_BW, alive_score], 1), w,
      jnp.concatenate([st.fin_BWL, st.alive_BWL], 1),
      jnp.concatenate([st.fin_lp_BW, st.alive_lp_BW], 1),
      jnp.concatenate([st.fin_len_BW, jnp.full((b, w), st.step, jnp.int32)], 1))
  lens = jnp.where(scores == neg, 0, lens)
  seqs = jnp.where(jnp.arange(max_new) < lens[..., None], seqs, pad_id)
  return seqs, lens, scores, lps, st.step


# The cache is not donated: beams need a W-times larger one, built by gather_rows.
_beam_jit = jax.jit(_run, static_argnames=("step_fn", "prefill_len", "width", "max_new"))

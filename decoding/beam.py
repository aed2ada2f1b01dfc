"""Token-level beam search with a length penalty and EOS handling, one jitted while_loop.

A hypothesis y of n generated tokens scores  sum_t log p(y_t | ...) / n ** length_penalty
(0 = plain log-probability; > 0 favours longer outputs). A beam that emits EOS
moves to a pool of W finished hypotheses (the EOS token counts in n); W live
beams continue. At `max_new_tokens` the live beams join the pool. The loop also
stops early, exactly, once no live beam can still beat the worst finished one.
Beams share each prompt's prefill: the cache is fanned out with `KVCache.take`.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array

from decoding import cost as cost_lib
from decoding import request
from decoding.generate import prefill
from model.kv_cache import KVCache


@dataclasses.dataclass(frozen=True)
class BeamOutput:
  """W hypotheses per prompt, best first; entries past `lengths` hold pad_id."""

  tokens: Array  # i32[B, W, max_new_tokens]
  lengths: Array  # i32[B, W] (0 for an empty slot: fewer than W hypotheses exist)
  scores: Array  # f32[B, W]: length-penalised score (-inf for an empty slot)
  logprobs: Array  # f32[B, W]: summed token log-probs
  cost: cost_lib.Cost


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class BeamState:
  """The while_loop state of `beam_search` (W live beams and W finished ones per prompt)."""

  step: Array
  next_BW: Array
  alive_BWL: Array
  alive_lp_BW: Array
  fin_BWL: Array
  fin_score_BW: Array
  fin_lp_BW: Array
  fin_len_BW: Array
  cache: KVCache


def beam_search(params, prompt_tokens, step_fn, *, beam_width: int, max_new_tokens: int,
                cache=None, prompt_lengths=None, eos_id: int | Sequence[int] | None = None,
                length_penalty: float = 1.0, pad_id: int = 0) -> BeamOutput:
  """Beam search from each prompt with `step_fn` (a model.Decoder).

  `cache`: None (`step_fn.init_cache`), an empty KVCache for the B prompts, or a
  factory `(batch, max_len) -> KVCache`; beams fan it out W times after the prefill.
  """
  t0 = time.perf_counter()
  w = request.check_count("beam_width", beam_width)
  if not np.isfinite(length_penalty):
    raise ValueError(f"length_penalty={length_penalty!r} must be finite")
  req = request.prepare(step_fn, prompt_tokens, max_new_tokens=max_new_tokens, cache=cache,
                        prompt_lengths=prompt_lengths, eos_id=eos_id, pad_id=pad_id)
  out = _beam_jit(params, jnp.asarray(req.prompt_BP), jnp.asarray(req.lengths_B), req.cache,
                  req.eos_E, jnp.float32(length_penalty), jnp.int32(pad_id), step_fn=step_fn,
                  prefill_len=req.prefill_len, width=w, max_new=req.max_new_tokens)
  tokens, lengths, scores, lps, steps = jax.block_until_ready(out)
  b = req.batch
  total = cost_lib.generation_cost(step_fn, params, req.cache, prefill_rows=b,
                                   prefill_len=req.prefill_len, steps=int(steps),
                                   step_rows=b * w, tokens=int(lengths.sum()),
                                   wall_time_s=time.perf_counter() - t0)
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
  cache = cache.take(jnp.repeat(jnp.arange(b), w))
  neg = jnp.float32(-jnp.inf)
  # Only beam 0 starts alive, so the first step expands one copy of each prompt.
  alive_lp_BW = jnp.where(jnp.arange(w)[None] == 0, 0.0, neg) * jnp.ones((b, 1))
  lengths_f = lambda n: jnp.maximum(n, 1).astype(jnp.float32) ** alpha

  def body(st: BeamState) -> BeamState:
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
    return BeamState(step=n, next_BW=tok, alive_BWL=alive_seq, alive_lp_BW=alive_lp,
                     fin_BWL=fin_seq, fin_score_BW=fin_score, fin_lp_BW=fin_lp,
                     fin_len_BW=fin_len, cache=cache.take(rows_N))

  def cond(st: BeamState):
    n = st.step
    best_alive_B = jnp.max(st.alive_lp_BW, axis=1)
    # Highest score any live beam can still reach (log-probs only fall as it grows).
    bound_len = jnp.where(alpha >= 0, max_new, n + 1)
    bound_B = best_alive_B / lengths_f(bound_len)
    settled_B = jnp.min(st.fin_score_BW, axis=1) >= bound_B
    return (n < max_new) & ~jnp.all(settled_B | (best_alive_B == neg))

  st = BeamState(step=jnp.int32(0), next_BW=jnp.broadcast_to(last_B[:, None], (b, w)),
                 alive_BWL=jnp.full((b, w, max_new), pad_id, jnp.int32), alive_lp_BW=alive_lp_BW,
                 fin_BWL=jnp.full((b, w, max_new), pad_id, jnp.int32),
                 fin_score_BW=jnp.full((b, w), neg), fin_lp_BW=jnp.full((b, w), neg),
                 fin_len_BW=jnp.zeros((b, w), jnp.int32), cache=cache)
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


# The cache is not donated: beams need a W-times larger one, built by KVCache.take.
_beam_jit = jax.jit(_run, static_argnames=("step_fn", "prefill_len", "width", "max_new"))

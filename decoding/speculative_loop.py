"""The jitted speculative-decoding loop (host-side API in `decoding.speculative`).

Per row, with n committed tokens x_0..x_{n-1} (prompt + generated), the target
cache holds x_0..x_{n-2} (lengths L = n - 1) and x_{n-1} is fed next. A round:
  1. draft: gamma tokens d_1..d_g, each sampled from the draft's processed q;
  2. verify: the target runs [x_{n-1}, d_1..d_G] (G = gamma_max) at slot L,
     giving p_0..p_G; rolling back is setting lengths, as slot j == position j.
     With several `verify_widths`, only the first w >= g + 1 positions run
     (a lax.switch over one compiled forward per width);
  3. accept the first a drafts (u_i * q(d_i) < p(d_i)), then one token from
     normalize(max(p_a - q_a, 0)) (q_a = 0 for the bonus a == g).
A separate draft cache is kept at the same lengths as the target's.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jaxtyping import Array

from decoding.generate import Finish, prefill, seen_prompt, stop_match
from decoding.sampling import Sampler, apply_repetition_penalty, process_logits
from model.kv_cache import KVCache

NEG_INF = -jnp.inf


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class State:
  """The while_loop state of speculative decoding (`dcache` None: the draft shares tcache)."""

  rounds: Array  # verify calls so far
  gamma: Array  # this round's draft length
  gamma_sum: Array
  draft_calls: Array
  verify_tokens: Array  # positions the target verified, per row, summed over rounds
  next_B: Array  # last committed token (not yet in the target cache)
  tokens_BL: Array
  logprobs_BL: Array
  lengths_B: Array  # tokens generated per row
  done_B: Array
  reason_B: Array
  seen_BV: Array
  tcache: KVCache
  dcache: KVCache | None
  accepted_B: Array
  tested_B: Array
  proposed_B: Array
  active_rounds_B: Array


def dist_logits(logits_NV: Array, s: Sampler, seen_NV: Array) -> Array:
  """Processed logits (softmax = the sampler's distribution); all-greedy skips the sort."""

  def greedy(_):
    lg = apply_repetition_penalty(logits_NV.astype(jnp.float32), seen_NV, s.repetition_penalty)
    top = jnp.argmax(lg, axis=-1)
    return jnp.where(jnp.arange(lg.shape[-1]) == top[:, None], 0.0, NEG_INF)

  return jax.lax.cond(jnp.all(s.temperature <= 0), greedy,
                      lambda _: process_logits(logits_NV, s, seen_NV), None)


def _categorical(keys_B, logits_BV):
  return jax.vmap(jax.random.categorical)(keys_B, logits_BV).astype(jnp.int32)


def _draft(st: State, dparams, sampler, keys_BK, *, draft_step_fn, gamma_max):
  """Samples gamma draft tokens (buffers sized gamma_max) and their q logits.

  Call i feeds x_{n-1} (i = 0) or d_i and samples d_{i+1}. A separate draft cache
  also feeds d_g (one extra call, its sample unused), so it always holds every
  token a round can commit; a shared cache needs no extra call (verify writes it).
  """
  b, v = st.seen_BV.shape
  shared = st.dcache is None
  dc = st.tcache if shared else st.dcache.with_lengths(st.tcache.lengths)
  drafts_BG = jnp.zeros((b, gamma_max + 1), jnp.int32)
  q_BGV = jnp.zeros((b, gamma_max + 1, v), jnp.float32)

  def body(i, carry):
    dc, drafts_BG, q_BGV, seen_BV = carry
    tok_B = jnp.where(i == 0, st.next_B, drafts_BG[:, jnp.maximum(i - 1, 0)])
    logits_BTV, dc = draft_step_fn(dparams, tok_B[:, None], dc)
    q_BV = dist_logits(logits_BTV[:, 0], sampler, seen_BV)
    d_B = _categorical(keys_BK[:, i], q_BV)
    return (dc, drafts_BG.at[:, i].set(d_B), q_BGV.at[:, i].set(q_BV),
            seen_BV.at[jnp.arange(b), d_B].set(True))

  n_calls = st.gamma + (0 if shared else 1)
  dc, drafts_BG, q_BGV, _ = jax.lax.fori_loop(0, n_calls, body,
                                              (dc, drafts_BG, q_BGV, st.seen_BV))
  return dc, drafts_BG[:, :gamma_max], q_BGV[:, :gamma_max], n_calls


def _accept(p_BJV, q_BGV, drafts_BG, gamma, keys_BK, gamma_max):
  """(accepted count a[B], next token[B]) by the min(1, p/q) rule and residual resampling."""
  b = drafts_BG.shape[0]
  pp_BJV = jax.nn.softmax(p_BJV, axis=-1)
  qq_BGV = jax.nn.softmax(q_BGV, axis=-1)
  pick = lambda x_BGV: jnp.take_along_axis(x_BGV, drafts_BG[..., None], axis=-1)[..., 0]
  p_BG, q_BG = pick(pp_BJV[:, :gamma_max]), pick(qq_BGV)
  u_BG = jax.vmap(jax.vmap(jax.random.uniform))(keys_BK[:, gamma_max + 1:2 * gamma_max + 1])
  ok_BG = (u_BG * q_BG < p_BG) & (jnp.arange(gamma_max)[None] < gamma)
  a_B = jnp.sum(jnp.cumprod(ok_BG, axis=1), axis=1).astype(jnp.int32)
  rows_B = jnp.arange(b)
  p_a_BV = pp_BJV[rows_B, a_B]
  q_a_BV = jnp.where((a_B < gamma)[:, None], qq_BGV[rows_B, jnp.minimum(a_B, gamma_max - 1)], 0.0)
  resid_BV = jnp.maximum(p_a_BV - q_a_BV, 0.0)
  resid_BV = jnp.where(jnp.sum(resid_BV, -1, keepdims=True) > 0, resid_BV, p_a_BV)
  tok_B = _categorical(keys_BK[:, 2 * gamma_max + 1], jnp.log(resid_BV))
  return a_B, tok_B


def _verify(st: State, dc, drafts_BG, tparams, sampler, *, target_step_fn, widths):
  """Target logits p_0..p_G (processed), raw log-probs for [next, d_1..d_G], width used."""
  b, v = st.seen_BV.shape
  g1 = drafts_BG.shape[1] + 1
  # A shared-cache draft wrote into the target's buffers: verify overwrites its slots.
  tc = (dc if st.dcache is None else st.tcache).with_lengths(st.tcache.lengths)
  tokens_BJ = jnp.concatenate([st.next_B[:, None], drafts_BG], axis=1)

  def verify(w, tc):
    logits_BWV, tc = target_step_fn(tparams, tokens_BJ[:, :w], tc)
    return jnp.pad(logits_BWV.astype(jnp.float32), ((0, 0), (0, g1 - w), (0, 0))), tc

  idx = jnp.minimum(jnp.searchsorted(jnp.asarray(widths), st.gamma + 1), len(widths) - 1)
  if len(widths) == 1:
    logits_BJV, tc = verify(widths[0], tc)
  else:
    logits_BJV, tc = jax.lax.switch(idx, [functools.partial(verify, w) for w in widths], tc)
  # Position j sees the drafts before it as already generated (repetition penalty).
  hit_BGV = jax.nn.one_hot(drafts_BG, v, dtype=jnp.int32).cumsum(axis=1) > 0
  seen_BJV = jnp.concatenate([st.seen_BV[:, None], st.seen_BV[:, None] | hit_BGV], axis=1)
  rows = jnp.repeat(jnp.arange(b), g1)
  p_BJV = dist_logits(logits_BJV.reshape(b * g1, v), sampler.take(rows),
                      seen_BJV.reshape(b * g1, v)).reshape(b, g1, v)
  return p_BJV, jax.nn.log_softmax(logits_BJV, axis=-1), tc, jnp.asarray(widths)[idx]


def _round(st: State, tparams, dparams, sampler, keys_B, eos_E, stop_NS, max_new, adaptive, *,
           target_step_fn, draft_step_fn, gamma_max, widths) -> State:
  b = st.next_B.shape[0]
  active_B = ~st.done_B
  L_B = st.tcache.lengths
  row_keys_B = jax.vmap(jax.random.fold_in)(keys_B, L_B)
  keys_BK = jax.vmap(lambda k: jax.random.split(k, 2 * gamma_max + 2))(row_keys_B)
  dc, drafts_BG, q_BGV, n_calls = _draft(st, dparams, sampler, keys_BK,
                                         draft_step_fn=draft_step_fn, gamma_max=gamma_max)
  p_BJV, logp_BJV, tc, width = _verify(st, dc, drafts_BG, tparams, sampler,
                                       target_step_fn=target_step_fn, widths=widths)
  a_B, tok_B = _accept(p_BJV, q_BGV, drafts_BG, st.gamma, keys_BK, gamma_max)

  # The committed chunk: d_1..d_a, then tok; later entries are overwritten next round.
  j_J = jnp.arange(gamma_max + 1)
  drafts_BJ = jnp.pad(drafts_BG, ((0, 0), (0, 1)))
  chunk_BJ = jnp.where(j_J < a_B[:, None], drafts_BJ, tok_B[:, None])
  lp_BJ = jnp.take_along_axis(logp_BJV, chunk_BJ[..., None], axis=-1)[..., 0]
  write = jax.vmap(lambda row, new, s: jax.lax.dynamic_update_slice(row, new, (s,)))
  tokens_BL = jnp.where(active_B[:, None], write(st.tokens_BL, chunk_BJ, st.lengths_B),
                        st.tokens_BL)
  logprobs_BL = jnp.where(active_B[:, None], write(st.logprobs_BL, lp_BJ, st.lengths_B),
                          st.logprobs_BL)

  # Stops: the first committed position hitting EOS, a stop sequence or max tokens.
  n_BJ = st.lengths_B[:, None] + j_J + 1
  eos_BJ = jnp.isin(chunk_BJ, eos_E)
  match = jax.vmap(lambda row, n: stop_match(row[None], n, stop_NS)[0])
  stop_BJ = jnp.stack([match(tokens_BL, n_BJ[:, j]) for j in range(gamma_max + 1)], axis=1)
  max_BJ = n_BJ >= max_new
  hit_BJ = (eos_BJ | stop_BJ | max_BJ) & (j_J <= a_B[:, None])
  any_B = jnp.any(hit_BJ, axis=1)
  first_B = jnp.where(any_B, jnp.argmax(hit_BJ, axis=1), a_B)
  at = lambda x_BJ: jnp.take_along_axis(x_BJ, first_B[:, None], axis=1)[:, 0]
  code_B = jnp.where(at(eos_BJ), int(Finish.EOS),
                     jnp.where(at(stop_BJ), int(Finish.STOP_SEQUENCE), int(Finish.MAX_TOKENS)))
  reason_B = jnp.where(active_B & any_B, code_B, st.reason_B)
  count_B = jnp.where(active_B, first_B + 1, 0)

  # Advance rows; rolling back a rejected tail is just the lengths.
  rows_B = jnp.arange(b)
  last_B = chunk_BJ[rows_B, jnp.maximum(count_B - 1, 0)]
  keep_BJ = j_J < count_B[:, None]
  seen_BV = st.seen_BV.at[rows_B[:, None], chunk_BJ].max(keep_BJ)
  tc = tc.with_lengths(L_B + count_B)
  dcache = None if st.dcache is None else dc
  # Adaptive gamma: +2 when most active rows accepted everything, else -1.
  full = jnp.sum(jnp.where(active_B, a_B == st.gamma, False))
  grow = 2 * full >= jnp.maximum(jnp.sum(active_B), 1)
  stepped = jnp.clip(jnp.where(grow, st.gamma + 2, st.gamma - 1), 1, gamma_max)
  gamma = jnp.where(adaptive, stepped, st.gamma).astype(jnp.int32)
  return State(
      rounds=st.rounds + 1, gamma=gamma, gamma_sum=st.gamma_sum + st.gamma,
      draft_calls=st.draft_calls + n_calls, verify_tokens=st.verify_tokens + width,
      next_B=jnp.where(active_B, last_B, st.next_B),
      tokens_BL=tokens_BL, logprobs_BL=logprobs_BL, lengths_B=st.lengths_B + count_B,
      done_B=reason_B != int(Finish.RUNNING), reason_B=reason_B, seen_BV=seen_BV, tcache=tc,
      dcache=dcache,
      accepted_B=st.accepted_B + jnp.where(active_B, a_B, 0),
      tested_B=st.tested_B + jnp.where(active_B, a_B + (a_B < st.gamma), 0),
      proposed_B=st.proposed_B + jnp.where(active_B, st.gamma, 0),
      active_rounds_B=st.active_rounds_B + active_B)


def run(tparams, dparams, prompt_BP, lens_B, sampler, keys_B, tcache, dcache, eos_E, stop_NS,
        max_new, pad_id, gamma, adaptive, *, target_step_fn, draft_step_fn, prefill_len,
        buf_len, gamma_max, widths) -> State:
  """Prefill both caches, then rounds until every row is done; returns the final State."""
  b = prompt_BP.shape[0]
  tcache, last_B = prefill(tparams, target_step_fn, prompt_BP, lens_B, tcache, prefill_len)
  if dcache is not None:
    dcache, _ = prefill(dparams, draft_step_fn, prompt_BP, lens_B, dcache, prefill_len)
  seen_BV = seen_prompt(prompt_BP, lens_B, target_step_fn.vocab_size)
  zeros_B = jnp.zeros((b,), jnp.int32)
  width = buf_len + gamma_max + 1
  st = State(
      rounds=jnp.int32(0), gamma=gamma.astype(jnp.int32), gamma_sum=jnp.int32(0),
      draft_calls=jnp.int32(0), verify_tokens=jnp.int32(0), next_B=last_B,
      tokens_BL=jnp.full((b, width), pad_id, jnp.int32),
      logprobs_BL=jnp.zeros((b, width), jnp.float32), lengths_B=zeros_B,
      done_B=jnp.zeros((b,), bool), reason_B=zeros_B, seen_BV=seen_BV, tcache=tcache,
      dcache=dcache, accepted_B=zeros_B, tested_B=zeros_B, proposed_B=zeros_B,
      active_rounds_B=zeros_B)
  body = lambda s: _round(s, tparams, dparams, sampler, keys_B, eos_E, stop_NS, max_new,
                          adaptive, target_step_fn=target_step_fn, draft_step_fn=draft_step_fn,
                          gamma_max=gamma_max, widths=widths)
  st = jax.lax.while_loop(lambda s: ~jnp.all(s.done_B) & (s.rounds < buf_len), body, st)
  valid_BL = jnp.arange(width)[None] < st.lengths_B[:, None]
  return dataclasses.replace(st, tokens_BL=jnp.where(valid_BL, st.tokens_BL, pad_id),
                             logprobs_BL=jnp.where(valid_BL, st.logprobs_BL, 0.0))


run_jit = jax.jit(
    run, static_argnames=("target_step_fn", "draft_step_fn", "prefill_len", "buf_len",
                          "gamma_max", "widths"),
    donate_argnames=("tcache", "dcache"))

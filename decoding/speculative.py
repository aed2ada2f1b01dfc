"""Speculative decoding: a draft proposes gamma tokens, the target verifies them in one call.

Leviathan et al. / Chen et al.: draft token d ~ q is kept with probability
min(1, p(d) / q(d)); the first rejected one is replaced by a sample of
normalize(max(p - q, 0)); when all are kept, a bonus token comes from p. The
output distribution is exactly the target's (p and q are the sampler's
processed distributions, `sampling.process_logits`), and greedy rows (one-hot
p and q) reproduce the target's greedy output. gamma can adapt per round
(`schedule="heuristic"`, Hugging Face's rule: +2 after a fully accepted round,
-1 otherwise); the target verifies `gamma_max + 1` positions, or, with
`verify_buckets`, the smallest of a few fixed widths that covers gamma + 1, so
shapes stay static.

With `share_cache=True` the draft shares the target's cache (self-speculation:
the draft is the target's first layers, see `decoding.early_exit`).
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
from decoding import request, speculative_loop
from decoding.sampling import Sampler
from model.decoder import Decoder

SCHEDULES = ("fixed", "heuristic")


@dataclasses.dataclass(frozen=True)
class SpeculativeStats:
  """Acceptance statistics; `alpha` is the per-token acceptance probability estimate."""

  alpha: float  # accepted / tested draft tokens (tested: up to and incl. the first rejection)
  acceptance_rate: float  # accepted / proposed draft tokens
  tokens_per_call: float  # tokens committed per target verify call, per row
  expected_tokens_per_call: float  # (1 - alpha^(g+1)) / (1 - alpha) at g = mean_gamma
  mean_gamma: float
  target_calls: int  # verify calls (prefill excluded)
  draft_calls: int  # draft forward calls (prefill excluded)
  accepted: int  # draft tokens accepted, all rows
  tested: int  # draft tokens tested (accepted + first rejections)

  def to_dict(self) -> dict:
    return dataclasses.asdict(self)


@dataclasses.dataclass(frozen=True)
class SpeculativeOutput:
  """Like `generate.GenerateOutput`; `logprobs` are under the unprocessed target."""

  tokens: Array  # i32[B, max_new_tokens]
  logprobs: Array  # f32[B, max_new_tokens]
  lengths: Array  # i32[B]
  finish_reason: Array  # i32[B], a generate.Finish code
  cost: cost_lib.Cost
  stats: SpeculativeStats


def expected_tokens_per_call(alpha: float, gamma: float) -> float:
  """(1 - alpha^(gamma+1)) / (1 - alpha): expected tokens per verify call, i.i.d. acceptance."""
  if alpha >= 1.0:
    return gamma + 1.0
  return (1.0 - alpha ** (gamma + 1.0)) / (1.0 - alpha)


def check_compatible(target_cfg, draft_cfg, target_tokenizer=None, draft_tokenizer=None) -> None:
  """Raises ValueError when draft and target vocabularies or tokenizers differ."""
  if target_cfg.vocab_size != draft_cfg.vocab_size:
    raise ValueError(f"draft vocab_size={draft_cfg.vocab_size} differs from the target's "
                     f"vocab_size={target_cfg.vocab_size}; both models need the same tokenizer")
  if (target_tokenizer is None) != (draft_tokenizer is None):
    raise ValueError("pass both target_tokenizer and draft_tokenizer, or neither")
  if target_tokenizer is None:
    return
  t, d = target_tokenizer, draft_tokenizer
  for name in ("vocab_size", "bos_id", "eos_id", "pad_id"):
    if getattr(t, name, None) != getattr(d, name, None):
      raise ValueError(f"draft tokenizer {name}={getattr(d, name, None)} differs from the "
                       f"target tokenizer's {name}={getattr(t, name, None)}")
  if type(t) is not type(d):
    raise ValueError(f"draft tokenizer {type(d).__name__} differs from the target "
                     f"tokenizer {type(t).__name__}")
  vocab = lambda tok: tok.tokenizer.get_vocab(with_added_tokens=True)
  if hasattr(t, "tokenizer") and hasattr(t.tokenizer, "get_vocab") and vocab(t) != vocab(d):
    raise ValueError("draft and target tokenizers map tokens to different ids")
  probe = "def f(x):\n  return x + 1  # héllo"
  if list(t.encode(probe)) != list(d.encode(probe)):
    raise ValueError("draft and target tokenizers encode the same text differently")


def speculative_generate(target_params, draft_params, prompt_tokens, *, target_step_fn,
                         draft_step_fn, max_new_tokens: int, target_cache=None, draft_cache=None,
                         share_cache: bool = False, sampler: Sampler | None = None,
                         gamma: int = 4, gamma_max: int | None = None, schedule: str = "fixed",
                         verify_buckets: bool | None = None, prompt_lengths=None,
                         key: Array | None = None, eos_id: int | Sequence[int] | None = None,
                         stop_sequences: Sequence[Sequence[int]] = (),
                         pad_id: int = 0) -> SpeculativeOutput:
  """Speculative sampling with one jitted while_loop; rows accept independently.

  Args:
    target_step_fn / draft_step_fn: `model.Decoder`s (or Decoder-like step_fns, e.g.
      `early_exit.ExitDecoder`); they are static jit keys.
    target_cache / draft_cache: None (each step_fn's `init_cache`), empty caches
      with batch B (donated), or factories `(batch, max_len) -> KVCache`.
    share_cache: the draft writes into the target's cache (it must only touch layers
      whose keys the target overwrites: an early-exit draft); draft_cache is unused.
    gamma: draft tokens per round (the first round's under "heuristic").
    gamma_max: the adaptive cap and the verify width - 1 (default: gamma, or
      2 * gamma under "heuristic"). It is the only static one: gamma and the
      schedule are traced, so calls that share gamma_max share one compilation.
    verify_buckets: verify only the first w >= gamma + 1 positions, w from
      {2, 3, 5, 9, ...} and gamma_max + 1 (one compiled target forward per width):
      cheaper rounds when gamma is small, where verify cost grows with width
      (CPUs). Default: on for schedule="heuristic".
  Other arguments as in `decoding.generate`.
  """
  t0 = time.perf_counter()
  if schedule not in SCHEDULES:
    raise ValueError(f"schedule={schedule!r}; valid: {SCHEDULES}")
  gamma = request.check_count("gamma", gamma)
  if gamma_max is None:
    gamma_max = gamma if schedule == "fixed" else 2 * gamma
  if isinstance(gamma_max, bool) or not isinstance(gamma_max, (int, np.integer)) or (
      gamma_max < gamma):
    raise ValueError(f"gamma_max={gamma_max!r} must be an integer >= gamma={gamma}")
  gamma_max = int(gamma_max)
  what = "max_new_tokens + gamma_max"
  req = request.prepare(target_step_fn, prompt_tokens, max_new_tokens=max_new_tokens,
                        cache=target_cache, prompt_lengths=prompt_lengths, sampler=sampler,
                        key=key, eos_id=eos_id, stop_sequences=stop_sequences, pad_id=pad_id,
                        extra_slots=gamma_max, what=what)
  request.check_step_fn(draft_step_fn, "draft_step_fn")
  if draft_step_fn.vocab_size != target_step_fn.vocab_size:
    raise ValueError(f"draft vocabulary ({draft_step_fn.vocab_size} logits) differs from the "
                     f"target's ({target_step_fn.vocab_size}); both models need the same "
                     "tokenizer")
  dcache = None if share_cache else request.make_cache(
      draft_cache, draft_step_fn, req.batch, req.max_prompt, req.need, name="draft_cache",
      what=what)
  widths = verify_widths(gamma_max, schedule == "heuristic" if verify_buckets is None
                         else verify_buckets)
  out = speculative_loop.run_jit(
      target_params, draft_params, jnp.asarray(req.prompt_BP), jnp.asarray(req.lengths_B),
      req.sampler, req.keys_B, req.cache, dcache, req.eos_E, req.stop_NS,
      jnp.int32(req.max_new_tokens), jnp.int32(pad_id), jnp.int32(gamma),
      jnp.bool_(schedule == "heuristic"), target_step_fn=target_step_fn,
      draft_step_fn=draft_step_fn, prefill_len=req.prefill_len, buf_len=req.buf_len,
      gamma_max=gamma_max, widths=widths)
  out = jax.block_until_ready(out)
  stats = _stats(out)
  cost = _cost(target_step_fn, draft_step_fn, target_params, draft_params, out, req, stats,
               time.perf_counter() - t0)
  n = req.max_new_tokens
  return SpeculativeOutput(tokens=out.tokens_BL[:, :n], logprobs=out.logprobs_BL[:, :n],
                           lengths=out.lengths_B, finish_reason=out.reason_B, cost=cost,
                           stats=stats)


def verify_widths(gamma_max: int, buckets: bool) -> tuple[int, ...]:
  """Verify widths: gamma_max + 1 alone, or 2^k + 1 below it as well."""
  if not buckets:
    return (gamma_max + 1,)
  small = {2 ** k + 1 for k in range(gamma_max.bit_length()) if 2 ** k + 1 < gamma_max + 1}
  return tuple(sorted(small | {gamma_max + 1}))


def _stats(out) -> SpeculativeStats:
  acc, tested = int(out.accepted_B.sum()), int(out.tested_B.sum())
  proposed, rounds = int(out.proposed_B.sum()), int(out.rounds)
  alpha = acc / tested if tested else 1.0
  mean_gamma = float(out.gamma_sum) / rounds if rounds else 0.0
  committed, row_rounds = int(out.lengths_B.sum()), int(out.active_rounds_B.sum())
  return SpeculativeStats(
      alpha=alpha, acceptance_rate=acc / proposed if proposed else 1.0,
      tokens_per_call=committed / row_rounds if row_rounds else 0.0,
      expected_tokens_per_call=expected_tokens_per_call(alpha, mean_gamma),
      mean_gamma=mean_gamma, target_calls=rounds, draft_calls=int(out.draft_calls),
      accepted=acc, tested=tested)


def _cost(t_step, d_step, tp, dp, out, req, s: SpeculativeStats, wall: float) -> cost_lib.Cost:
  """Prefill(s), the verify calls (`out.verify_tokens` positions per row) and draft calls."""
  b, t = req.batch, req.prefill_len
  tc, dc = out.tcache, out.dcache
  total = cost_lib.Cost(tokens=int(out.lengths_B.sum()), wall_time_s=wall)
  if t:
    total += cost_lib.forward_cost(t_step, tp, tc, b * t)
    if dc is not None:
      total += cost_lib.forward_cost(d_step, dp, dc, b * t)
  if s.target_calls:
    total += cost_lib.forward_cost(t_step, tp, tc, b * int(out.verify_tokens) / s.target_calls,
                                   calls=s.target_calls)
  if s.draft_calls:
    total += cost_lib.forward_cost(d_step, dp, tc if dc is None else dc, b, calls=s.draft_calls)
  return total


def speculative_decode(target_cfg, target_params, draft_cfg, draft_params, prompt_tokens, *,
                       max_new_tokens: int, target_tokenizer=None, draft_tokenizer=None,
                       **kwargs) -> SpeculativeOutput:
  """Speculative decoding between two sparq models; checks they share a vocabulary first."""
  check_compatible(target_cfg, draft_cfg, target_tokenizer, draft_tokenizer)
  return speculative_generate(
      target_params, draft_params, prompt_tokens, target_step_fn=Decoder(target_cfg),
      draft_step_fn=Decoder(draft_cfg), max_new_tokens=max_new_tokens, **kwargs)

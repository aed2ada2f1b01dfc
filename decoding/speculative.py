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

With `draft_cache=None` the draft shares the target's cache (self-speculation:
the draft is the target's first layers, see `decoding.early_exit`).
"""

from __future__ import annotations

import dataclasses
import functools
import time
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array

from decoding import cost as cost_lib
from decoding import prompts as prompts_lib
from decoding import speculative_loop
from decoding.kv_cache import KVCache, init_cache
from decoding.sampling import Sampler

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


def speculative_generate(target_params, draft_params, prompt_tokens, *,
                         target_step_fn: Callable, draft_step_fn: Callable, max_new_tokens: int,
                         target_cache: KVCache | Callable[[int, int], KVCache],
                         draft_cache: KVCache | Callable[[int, int], KVCache] | None = None,
                         sampler: Sampler | None = None, gamma: int = 4,
                         gamma_max: int | None = None, schedule: str = "fixed",
                         verify_buckets: bool | None = None, prompt_lengths=None,
                         key: Array | None = None,
                         eos_id: int | Sequence[int] | None = None,
                         stop_sequences: Sequence[Sequence[int]] = (), pad_id: int = 0,
                         draft_cost_params=None) -> SpeculativeOutput:
  """Speculative sampling with one jitted while_loop; rows accept independently.

  Args:
    target_step_fn / draft_step_fn: `(params, tokens_BT, cache) -> (logits, cache)`;
      reuse the same objects across calls (they are static jit keys).
    target_cache / draft_cache: empty caches with batch B (donated), or factories
      `(batch, max_len) -> KVCache`. draft_cache=None: the draft writes into the
      target's cache (it must only touch layers whose keys the target overwrites).
    gamma: draft tokens per round (the first round's under "heuristic").
    gamma_max: the adaptive cap and the verify width - 1 (default: gamma, or
      2 * gamma under "heuristic"). It is the only static one: gamma and the
      schedule are traced, so calls that share gamma_max share one compilation.
    verify_buckets: verify only the first w >= gamma + 1 positions, w from
      {2, 3, 5, 9, ...} and gamma_max + 1 (one compiled target forward per width):
      cheaper rounds when gamma is small, where verify cost grows with width
      (CPUs). Default: on for schedule="heuristic".
    draft_cost_params: the params the draft actually reads, for the Cost record
      (default draft_params).
  Other arguments as in `decoding.generate`.
  """
  t0 = time.perf_counter()
  prompt_BP, lens_B = prompts_lib.pad_prompts(prompt_tokens, prompt_lengths, pad_id)
  b = prompt_BP.shape[0]
  if not isinstance(max_new_tokens, (int, np.integer)) or max_new_tokens < 1:
    raise ValueError(f"max_new_tokens={max_new_tokens!r} must be an integer >= 1")
  if schedule not in SCHEDULES:
    raise ValueError(f"schedule={schedule!r}; valid: {SCHEDULES}")
  if not isinstance(gamma, (int, np.integer)) or gamma < 1:
    raise ValueError(f"gamma={gamma!r} must be an integer >= 1")
  if gamma_max is None:
    gamma_max = gamma if schedule == "fixed" else 2 * gamma
  if not isinstance(gamma_max, (int, np.integer)) or gamma_max < gamma:
    raise ValueError(f"gamma_max={gamma_max!r} must be an integer >= gamma={gamma}")
  sampler = Sampler.greedy(b) if sampler is None else sampler
  if sampler.batch != b:
    raise ValueError(f"sampler has {sampler.batch} rows, the prompt batch has {b}")
  max_prompt = int(lens_B.max())
  need = max_prompt + max_new_tokens + gamma_max - 1
  size = max(prompts_lib.round_up(need, 64), prompts_lib.bucket(max_prompt - 1))
  make = lambda c: c(b, size) if callable(c) and not isinstance(c, KVCache) else c
  target_cache, draft_cache = make(target_cache), make(draft_cache)
  for name, c in (("target_cache", target_cache), ("draft_cache", draft_cache)):
    if c is not None:
      _check_cache(name, c, b, max_prompt, need)
  _check_vocab(target_params, draft_params, target_step_fn, draft_step_fn, target_cache,
               draft_cache, b)
  widths = verify_widths(int(gamma_max), schedule == "heuristic" if verify_buckets is None
                         else verify_buckets)
  eos_E = jnp.asarray(np.atleast_1d(np.asarray(-1 if eos_id is None else eos_id, np.int32)))
  stop_NS = jnp.asarray(prompts_lib.stop_array(stop_sequences))
  keys_B = prompts_lib.row_keys(key, b)
  t = min(prompts_lib.bucket(max_prompt - 1), target_cache.max_len) if max_prompt > 1 else 0
  buf = prompts_lib.bucket(max_new_tokens)
  out = speculative_loop.run_jit(
      target_params, draft_params, jnp.asarray(prompt_BP), jnp.asarray(lens_B), sampler, keys_B,
      target_cache, draft_cache, eos_E, stop_NS, jnp.int32(max_new_tokens), jnp.int32(pad_id),
      jnp.int32(gamma), jnp.bool_(schedule == "heuristic"), target_step_fn=target_step_fn,
      draft_step_fn=draft_step_fn, prefill_len=t, buf_len=buf, gamma_max=int(gamma_max),
      widths=widths)
  out = jax.block_until_ready(out)
  wall = time.perf_counter() - t0
  stats = _stats(out)
  sizes = dict(target=target_cache, draft=draft_cache)
  cost = _cost(target_params, draft_cost_params or draft_params, sizes, b, t,
               int(out.verify_tokens), stats, int(out.lengths_B.sum()), wall)
  tokens_BL = out.tokens_BL[:, :max_new_tokens]
  return SpeculativeOutput(tokens=tokens_BL, logprobs=out.logprobs_BL[:, :max_new_tokens],
                           lengths=out.lengths_B, finish_reason=out.reason_B, cost=cost,
                           stats=stats)


def verify_widths(gamma_max: int, buckets: bool) -> tuple[int, ...]:
  """Verify widths: gamma_max + 1 alone, or 2^k + 1 below it as well."""
  if not buckets:
    return (gamma_max + 1,)
  small = {2 ** k + 1 for k in range(gamma_max.bit_length()) if 2 ** k + 1 < gamma_max + 1}
  return tuple(sorted(small | {gamma_max + 1}))


def _check_cache(name: str, cache: KVCache, b: int, max_prompt: int, need: int) -> None:
  if cache.batch != b:
    raise ValueError(f"{name} has batch {cache.batch}, the prompt batch has {b}")
  if need > cache.max_len:
    raise ValueError(f"{name} has max_len={cache.max_len}; prompt length {max_prompt} + "
                     f"max_new_tokens + gamma_max needs {need} slots")


_VOCAB_CACHE: dict = {}


def _check_vocab(tp, dp, t_step, d_step, tc, dc, b: int) -> None:
  """Compares the two models' logit widths by abstract evaluation (no compute; memoised)."""
  leaves, tree = jax.tree.flatten((tp, dp, tc, dc))
  sig = (t_step, d_step, tree, b, tuple((x.shape, str(x.dtype)) for x in leaves))
  if sig not in _VOCAB_CACHE:
    tok = jax.ShapeDtypeStruct((b, 1), jnp.int32)
    vt = jax.eval_shape(lambda p, x, c: t_step(p, x, c)[0], tp, tok, tc).shape[-1]
    vd = jax.eval_shape(lambda p, x, c: d_step(p, x, c)[0], dp, tok,
                        tc if dc is None else dc).shape[-1]
    _VOCAB_CACHE[sig] = (vt, vd)
  vt, vd = _VOCAB_CACHE[sig]
  if vd != vt:
    raise ValueError(f"draft vocabulary ({vd} logits) differs from the target's ({vt}); "
                     "both models need the same tokenizer")


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


def _cost(tp, dp, caches: dict, b: int, t: int, verify_tokens: int, s: SpeculativeStats,
          tokens: int, wall: float) -> cost_lib.Cost:
  """Prefill(s), the verify calls (`verify_tokens` positions per row) and draft calls."""
  total = cost_lib.Cost(tokens=tokens, wall_time_s=wall)
  tc, dc = caches["target"], caches["draft"]

  def calls(params, cache, n_calls, n_tok):
    kh, dh = cache.v[0].shape[1], cache.v[0].shape[3]
    h = cost_lib.query_heads(params, kh, dh)
    one = cost_lib.forward_cost(params, n_tok, kv_read_bytes=cache.nbytes, attn_flops=(
        cost_lib.attention_flops(len(cache.k), h, dh, n_tok, cache.max_len)))
    return cost_lib.Cost(**{f: getattr(one, f) * n_calls for f in (
        "forward_passes", "forward_tokens", "flops", "bytes_moved")})

  if t:
    total += calls(tp, tc, 1, b * t)
    if dc is not None:
      total += calls(dp, dc, 1, b * t)
  if s.target_calls:
    width = verify_tokens / s.target_calls
    total += calls(tp, tc, s.target_calls, b * width).replace(
        forward_tokens=b * verify_tokens)
  total += calls(dp, tc if dc is None else dc, s.draft_calls, b)
  return total


@functools.cache
def model_step_fn(cfg, exit_layer: int | None = None) -> Callable:
  """A cached `step_fn` for a ModelConfig (one object per config: no re-jit per call)."""
  from model import transformer  # local: model imports decoding.kv_cache

  def step_fn(params, tokens_BT, cache):
    return transformer.apply(cfg, params, tokens_BT, cache=cache, exit_layer=exit_layer)

  return step_fn


def speculative_decode(target_cfg, target_params, draft_cfg, draft_params, prompt_tokens, *,
                       max_new_tokens: int, target_tokenizer=None, draft_tokenizer=None,
                       **kwargs) -> SpeculativeOutput:
  """Speculative decoding between two sparq models; checks they share a vocabulary first."""
  check_compatible(target_cfg, draft_cfg, target_tokenizer, draft_tokenizer)
  for name, cfg in (("target", target_cfg), ("draft", draft_cfg)):
    kwargs.setdefault(f"{name}_cache", functools.partial(model_cache, cfg))
  return speculative_generate(
      target_params, draft_params, prompt_tokens, target_step_fn=model_step_fn(target_cfg),
      draft_step_fn=model_step_fn(draft_cfg), max_new_tokens=max_new_tokens, **kwargs)


def model_cache(cfg, batch: int, max_len: int) -> KVCache:
  """A cache clipped to the model's max_seq_len (`_check_cache` then names a shortfall)."""
  return init_cache(cfg, batch, min(max_len, cfg.max_seq_len))

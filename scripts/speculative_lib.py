"""`--method=speculative` for scripts/generate.py (registered in generate_lib.METHODS).

Settings come in `Options.extra`:
  draft: a draft checkpoint / Hugging Face dir (same tokenizer as the target), or
    "exit:K" to draft with the target's first K layers and its early-exit head
    (a --model written by scripts/train_early_exit.py);
  gamma (default 4), gamma_max (default: gamma, or 2 * gamma when adaptive),
  schedule: "fixed" | "heuristic" (adaptive gamma).
"""

from __future__ import annotations

import os
import time

import jax
import jax.numpy as jnp

import model
from decoding import early_exit, speculative
from scripts import decode_lib

SETTINGS = ("draft", "gamma", "gamma_max", "schedule")


def validate(extra: dict) -> None:
  """Checks the speculative settings before any model is loaded."""
  unknown = sorted(set(extra) - set(SETTINGS))
  if unknown:
    raise ValueError(f"unknown speculative settings {unknown}; valid: {list(SETTINGS)}")
  draft = extra.get("draft")
  if not draft:
    raise ValueError("--method=speculative needs --draft: a checkpoint / HF dir, or exit:K")
  if draft.startswith("exit:"):
    k = draft.split(":", 1)[1]
    if not k.isdigit() or int(k) < 1:
      raise ValueError(f"--draft={draft!r}: expected exit:K with an integer K >= 1")
  elif not os.path.isdir(draft):
    raise ValueError(f"--draft={draft!r} is not a directory (a checkpoint or HF dir, or exit:K)")
  gamma = extra.get("gamma", 4)
  if not isinstance(gamma, int) or gamma < 1:
    raise ValueError(f"--gamma={gamma!r} must be an integer >= 1")
  gamma_max = extra.get("gamma_max")
  if gamma_max is not None and (not isinstance(gamma_max, int) or gamma_max < gamma):
    raise ValueError(f"--gamma_max={gamma_max!r} must be an integer >= --gamma={gamma}")
  schedule = extra.get("schedule", "fixed")
  if schedule not in speculative.SCHEDULES:
    raise ValueError(f"--schedule={schedule!r}; valid: {list(speculative.SCHEDULES)}")


def run_speculative(run: decode_lib.Run, prompts: list[list[int]],
                    opts: decode_lib.Options) -> list[dict]:
  """Speculative decoding of `prompts` with the target `run` and the draft in opts.extra."""
  validate(opts.extra)
  draft = opts.extra["draft"]
  kw = {k: opts.extra[k] for k in ("gamma", "gamma_max", "schedule") if k in opts.extra}
  common = dict(decode_lib.request_kwargs(run, opts, len(prompts)), **kw)
  if draft.startswith("exit:"):
    out = early_exit.self_speculative_decode(run.cfg, early_exit.from_legacy(run.params),
                                             int(draft[5:]), prompts, **common)
  else:
    d = decode_lib.load(draft, flag="--draft")
    out = speculative.speculative_decode(run.cfg, run.params, d.cfg, d.params, prompts,
                                         target_tokenizer=run.tokenizer,
                                         draft_tokenizer=d.tokenizer, **common)
  return decode_lib.rows(run, out, stats=out.stats.to_dict())


def forward_ms(cfg, params, t: int, exit_layer: int | None = None, steps: int = 32,
               ctx: int = 192, repeats: int = 5) -> float:
  """Mean ms of one cached forward over t tokens at batch 1 after `ctx` cached tokens (the
  best of `repeats` jitted loops of `steps` forwards, compile excluded): what a target
  verify (t = gamma + 1), a target step or a draft step costs. exit_layer: the target's
  first layers and its early-exit head (`decoding.early_exit.ExitDecoder`)."""
  step = model.Decoder(cfg) if exit_layer is None else early_exit.ExitDecoder(cfg, exit_layer)

  @jax.jit
  def loop(params, cache):
    def body(_, carry):
      cache, tok = carry
      logits, cache = step(params, jnp.broadcast_to(tok, (1, t)), cache)
      return cache.replace(lengths=cache.lengths - t + 1), jnp.argmax(logits[:, -1:], -1)
    return jax.lax.fori_loop(0, steps, body, (cache, jnp.zeros((1, 1), jnp.int32)))[1]

  cache = step.init_cache(1, min(512, cfg.max_seq_len)).with_lengths(jnp.array([ctx]))
  jax.block_until_ready(loop(params, cache))  # compile
  best = float("inf")
  for _ in range(repeats):
    t0 = time.perf_counter()
    jax.block_until_ready(loop(params, cache))
    best = min(best, time.perf_counter() - t0)
  return 1e3 * best / steps

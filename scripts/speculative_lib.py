"""`--method=speculative` for scripts/generate.py (registered in generate_lib.METHODS).

Settings come in `Options.extra`:
  draft: a draft checkpoint / Hugging Face dir (same tokenizer as the target), or
    "exit:K" to draft with the target's first K layers and its early-exit head
    (a --model written by scripts/train_early_exit.py);
  gamma (default 4), gamma_max (default: gamma, or 2 * gamma when adaptive),
  schedule: "fixed" | "heuristic" (adaptive gamma).
"""

from __future__ import annotations

import jax

from decoding import Sampler, early_exit, speculative


def run_speculative(run, prompts: list[list[int]], opts) -> list[dict]:
  """Speculative decoding of `prompts` with the target `run` and the draft in opts.extra."""
  from scripts import generate_lib  # generate_lib imports this module to register it

  extra = dict(opts.extra)
  draft = extra.pop("draft", None)
  if not draft:
    raise ValueError("--method=speculative needs a draft: a checkpoint / HF dir, or exit:K")
  kw = {k: extra.pop(k) for k in ("gamma", "gamma_max", "schedule") if k in extra}
  if extra:
    raise ValueError(f"unknown speculative settings {sorted(extra)}; valid: draft, gamma, "
                     "gamma_max, schedule")
  b = len(prompts)
  sampler = Sampler.create(b, temperature=opts.temperature, top_k=opts.top_k, top_p=opts.top_p,
                           min_p=opts.min_p, repetition_penalty=opts.repetition_penalty)
  keys = jax.vmap(lambda i: jax.random.fold_in(jax.random.key(opts.seed), i))(
      jax.numpy.arange(b))
  common = dict(max_new_tokens=opts.max_new_tokens, sampler=sampler, key=keys,
                eos_id=generate_lib._eos_ids(run.tokenizer),
                stop_sequences=generate_lib._stop_sequences(run.tokenizer, opts.stop),
                pad_id=run.tokenizer.pad_id, **kw)
  if draft.startswith("exit:"):
    k = draft.split(":", 1)[1]
    if not k.isdigit():
      raise ValueError(f"draft={draft!r}: expected exit:K with an integer K")
    out = early_exit.self_speculative_decode(run.cfg, run.params, int(k), prompts, **common)
  else:
    d = generate_lib.load(draft)
    out = speculative.speculative_decode(run.cfg, run.params, d.cfg, d.params, prompts,
                                         target_tokenizer=run.tokenizer,
                                         draft_tokenizer=d.tokenizer, **common)
  results = []
  for i in range(b):
    n = int(out.lengths[i])
    ids = [int(t) for t in out.tokens[i, :n]]
    results.append(dict(text=run.tokenizer.decode(ids), tokens=ids,
                        logprob=float(out.logprobs[i, :n].sum()), stats=out.stats.to_dict()))
  for r in results:
    r["cost"] = out.cost.to_dict()
  return results

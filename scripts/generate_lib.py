"""Text generation from a checkpoint or a Hugging Face dir (the library behind generate.py).

Methods live in `METHODS`: name -> fn(run, prompts: list[list[int]], opts) -> list[dict]:
sample, beam, and speculative (`scripts.speculative_lib`). Adding a decoding method is one
function plus one registry entry; the shared pieces (loading, options, request arguments)
are in `scripts.decode_lib`.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
from collections.abc import Callable, Collection

import numpy as np

import decoding
import model
import sparsity
from model.config import ATTN_QK, KV_QUANTS
from model.tokenizer import Tokenizer
from scripts import convert_lib, decode_lib, speculative_lib
from scripts.decode_lib import Options, Run

# Options fields set by flags of the same name (scripts/generate.py); `extra` holds the
# speculative settings, and `stream` is decided by the main.
OPTION_FLAGS = ("max_new_tokens", "temperature", "top_k", "top_p", "min_p",
                "repetition_penalty", "seed", "stop", "beam_width", "length_penalty",
                "num_return")


class _Streamer:
  """Prints row 0's text as tokens arrive (waits on incomplete UTF-8 sequences)."""

  def __init__(self, tok: Tokenizer, out=None):
    self.tok, self.out, self.ids, self.printed = tok, out or sys.stdout, [], ""

  def __call__(self, step, tok_B, active_B):
    del step
    if not bool(np.asarray(active_B)[0]):
      return
    self.ids.append(int(np.asarray(tok_B)[0]))
    text = self.tok.decode(self.ids).rstrip("\ufffd")
    if len(text) > len(self.printed):
      self.out.write(text[len(self.printed):])
      self.out.flush()
      self.printed = text


def run_sample(run: Run, prompts: list[list[int]], opts: Options) -> list[dict]:
  """Sampling (temperature 0 = greedy) with the per-row sampler settings of `opts`."""
  streamer = _Streamer(run.tokenizer) if opts.stream else None
  out = decoding.generate(run.params, prompts, run.step_fn, stream_fn=streamer,
                          **decode_lib.request_kwargs(run, opts, len(prompts)))
  if streamer is not None:
    print(flush=True)
  return decode_lib.rows(run, out)


def run_beam(run: Run, prompts: list[list[int]], opts: Options) -> list[dict]:
  """Beam search; each prompt returns its `num_return` best hypotheses."""
  out = decoding.beam_search(run.params, prompts, run.step_fn, beam_width=opts.beam_width,
                             max_new_tokens=opts.max_new_tokens,
                             eos_id=decode_lib.eos_ids(run.tokenizer),
                             length_penalty=opts.length_penalty, pad_id=run.tokenizer.pad_id)
  results = []
  for i in range(len(prompts)):
    hyps = []
    for j in range(opts.num_return):
      n = int(out.lengths[i, j])
      ids = np.asarray(out.tokens[i, j, :n]).tolist()
      hyps.append(dict(text=run.tokenizer.decode(ids), tokens=ids,
                       score=float(out.scores[i, j]), logprob=float(out.logprobs[i, j])))
    results.append(dict(text=hyps[0]["text"], hypotheses=hyps, cost=out.cost.to_dict()))
  return results


METHODS: dict[str, Callable[[Run, list[list[int]], Options], list[dict]]] = {
    "sample": run_sample,
    "beam": run_beam,
    "speculative": speculative_lib.run_speculative,
}
# Flags that only one method reads: given explicitly with another --method they would be
# silently ignored, so they are refused (`check_method_flags`).
METHOD_FLAGS = {
    "beam": ("beam_width", "length_penalty", "num_return"),
    "speculative": speculative_lib.SETTINGS,
}


def options(method: str, values: dict, texts: list[str]) -> Options:
  """The Options of flag `values` (names in OPTION_FLAGS and speculative_lib.SETTINGS)."""
  extra = {}
  if method == "speculative":
    extra = {k: values[k] for k in speculative_lib.SETTINGS if values.get(k) is not None}
  stream = bool(values.get("stream")) and len(texts) == 1 and method == "sample"
  kw = {k: values[k] for k in OPTION_FLAGS if k in values}
  kw["stop"] = tuple(kw.get("stop", ()))
  return Options(**kw, stream=stream, extra=extra)


def validate(method: str, opts: Options, texts: list[str]) -> None:
  """Checks flags before any model is loaded or compiled."""
  if method not in METHODS:
    raise ValueError(f"--method={method!r}; valid: {sorted(METHODS)}")
  if not texts:
    raise ValueError("--prompt is required (repeat it for a batch)")
  if opts.max_new_tokens < 1:
    raise ValueError(f"--max_new_tokens={opts.max_new_tokens} must be >= 1")
  decoding.Sampler.create(1, temperature=opts.temperature, top_k=opts.top_k, top_p=opts.top_p,
                          min_p=opts.min_p, repetition_penalty=opts.repetition_penalty)
  if opts.beam_width < 1:
    raise ValueError(f"--beam_width={opts.beam_width} must be >= 1")
  if method == "beam" and not 1 <= opts.num_return <= opts.beam_width:
    raise ValueError(f"--num_return={opts.num_return} must be in [1, --beam_width="
                     f"{opts.beam_width}]")
  if method == "speculative":
    speculative_lib.validate(opts.extra)


def check_method_flags(method: str, present: Collection[str]) -> None:
  """ValueError naming the flags in `present` (the ones the user typed) that `method` does
  not read (`METHOD_FLAGS`), instead of ignoring them."""
  for owner, names in METHOD_FLAGS.items():
    stray = [f"--{n}" for n in names if n in present]
    if owner != method and stray:
      raise ValueError(f"{', '.join(stray)} only appl{'ies' if len(stray) == 1 else 'y'} to "
                       f"--method={owner}; got --method={method} (drop "
                       f"{'it' if len(stray) == 1 else 'them'} or pass --method={owner})")


def check_output_file(path: str, flag: str) -> None:
  """ValueError naming `flag` unless `path` can be written as a file (checked before the
  model loads, so a typo in the folder does not cost the whole generation)."""
  folder = os.path.dirname(os.path.abspath(path))
  if os.path.isdir(path):
    raise ValueError(f"{flag}={path} is a folder; give a file path")
  if not os.path.isdir(folder):
    raise ValueError(f"{flag}={path}: folder {folder} does not exist")
  if not os.access(folder, os.W_OK | os.X_OK):
    raise ValueError(f"{flag}={path}: folder {folder} is not writable")


def kv_settings(values: dict) -> dict:
  """ModelConfig fields of --kv_quant / --attn_qk ('' or None: off), checked before loading."""
  kv_quant, attn_qk = values.get("kv_quant") or None, values.get("attn_qk") or None
  if kv_quant not in (None, *KV_QUANTS):
    raise ValueError(f"--kv_quant={kv_quant!r}; valid: {', '.join(KV_QUANTS)} (or unset)")
  if attn_qk not in (None, *ATTN_QK):
    raise ValueError(f"--attn_qk={attn_qk!r}; valid: {', '.join(ATTN_QK)} (or unset)")
  if attn_qk == "int8" and kv_quant != "int8":
    raise ValueError(f"--attn_qk=int8 reads an int8 KV cache; got --kv_quant={kv_quant!r}, "
                     "valid: --kv_quant=int8")
  out = dict(kv_quant=kv_quant, attn_qk=attn_qk)
  # Pruned attention: a block selector (--attn_select) or a KV eviction policy (--evict).
  select = sparsity.parse_selector(values["attn_select"]) if values.get("attn_select") else None
  evict = sparsity.parse_policy(values["evict"]) if values.get("evict") else None
  if select is not None and evict is not None:
    raise ValueError(f"--attn_select={values['attn_select']!r} and --evict={values['evict']!r} "
                     "cannot be combined (an evicting cache has no block-sparse read); pass one")
  if select is not None and attn_qk is not None:
    raise ValueError(f"--attn_select reads float block scores; --attn_qk={attn_qk!r} has no "
                     "block-sparse path (unset it)")
  if select is not None:
    out["attn_select"] = select
  if evict is not None:
    out["evict"] = evict
  return out


def with_kv_settings(run: Run, settings: dict) -> Run:
  """`run` decoding with the given KV-cache format / Q.K^T numerics, block selector or
  eviction policy (same params)."""
  if not any(settings.values()):
    return run
  pruned = {k: settings[k] for k in ("attn_select", "evict") if settings.get(k) is not None}
  cfg = run.cfg.replace(**{k: settings.get(k) for k in ("kv_quant", "attn_qk")})
  return dataclasses.replace(run, cfg=cfg, step_fn=model.Decoder(cfg, **pruned))


def generate_text(run: Run, texts: list[str], method: str, opts: Options) -> list[dict]:
  """Encodes `texts`, runs `method`, returns one result dict per prompt."""
  validate(method, opts, texts)
  return METHODS[method](run, decode_lib.encode(run, texts), opts)


def format_results(texts: list[str], results: list[dict], streamed: bool) -> str:
  """The continuations (unless streamed), speculative statistics and the cost line."""
  lines = []
  if not streamed:
    for text, r in zip(texts, results, strict=True):
      for j, h in enumerate(r.get("hypotheses", [r])):
        tag = f" [{j}] score={h['score']:.3f}" if "score" in h else ""
        lines.append(f"--- prompt: {text!r}{tag}\n{text}{h['text']}")
  if "stats" in results[0]:
    st = results[0]["stats"]
    lines.append(f"--- speculative: alpha {st['alpha']:.3f}, {st['tokens_per_call']:.2f} tokens "
                 f"per target call, mean gamma {st['mean_gamma']:.2f}")
  cost = results[0]["cost"]
  lines.append(f"--- {cost['tokens']} tokens in {cost['wall_time_s']:.2f}s "
               f"({cost['tokens'] / max(cost['wall_time_s'], 1e-9):.1f} tok/s incl. compile), "
               f"{cost['forward_passes']} forward passes")
  return "\n".join(lines)


def generate_from_flags(values: dict, present: Collection[str] = ()) -> str:
  """scripts/generate.py: validate the flags, load the model, generate, write --output.

  present: the names of the flags given on the command line (absl's `FLAGS[n].present`),
  so a method-specific flag given with another method is refused, not ignored.
  """
  texts, method = list(values["prompt"]), values["method"]
  opts = options(method, values, texts)
  validate(method, opts, texts)
  check_method_flags(method, present)
  kv = kv_settings(values)
  if values.get("output"):
    check_output_file(values["output"], "--output")
  draft = opts.extra.get("draft") or ""
  if method == "speculative" and not draft.startswith("exit:"):
    convert_lib.model_kind(draft, "--draft")  # a junk draft dir fails before the target loads
  run = decode_lib.load(values["model"], preset=values["preset"], step=values["step"],
                        tokenizer=values["tokenizer"], seed=values["seed"])
  run = with_kv_settings(run, kv)
  if opts.stream:
    print(texts[0], end="", flush=True)
  results = generate_text(run, texts, method, opts)
  text = format_results(texts, results, opts.stream)
  if values.get("output"):
    with open(values["output"], "w") as f:
      json.dump(results, f, indent=2)
    text += f"\nwrote {values['output']}"
  return text

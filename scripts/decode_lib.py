"""What every decoding method of the scripts shares: a loaded model, the options, requests.

`load` gives a `Run` (config, params, tokenizer, its `model.Decoder`) from a sparq
checkpoint, a Hugging Face dir or random weights; `Options` holds the flags of
scripts/generate.py; `request_kwargs` turns them into the keyword arguments every
`decoding` entry point takes (sampler, row keys, EOS ids, stop sequences, pad id).
"""

from __future__ import annotations

import dataclasses

import jax
import numpy as np

import decoding
import model
from model.config import ModelConfig
from model.tokenizer import Tokenizer
from scripts import convert_lib


@dataclasses.dataclass
class Run:
  """A loaded model: config, params, tokenizer and its step_fn."""

  cfg: ModelConfig
  params: dict
  tokenizer: Tokenizer
  step_fn: model.Decoder


@dataclasses.dataclass(frozen=True)
class Options:
  """Decoding options shared by the methods (flags of scripts/generate.py)."""

  max_new_tokens: int = 64
  temperature: float = 0.0
  top_k: int = 0
  top_p: float = 1.0
  min_p: float = 0.0
  repetition_penalty: float = 1.0
  seed: int = 0
  stop: tuple[str, ...] = ()
  beam_width: int = 4
  length_penalty: float = 1.0
  num_return: int = 1
  stream: bool = False
  extra: dict = dataclasses.field(default_factory=dict)  # method-specific settings


def load(path: str | None, *, preset: str | None = None, step: int | None = None,
         tokenizer: str = "auto", seed: int = 0, flag: str = "--model") -> Run:
  """A sparq checkpoint dir or HF dir at `path`, or random weights for `preset`.

  flag: the flag that gave `path` (named in its errors; "--draft" for a speculative draft).
  """
  if (path is None) == (preset is None):
    raise ValueError("pass exactly one of --model=PATH (checkpoint or HF dir) or --preset=NAME")
  chosen_by = None  # the flag that picked the tokenizer, for its errors
  if tokenizer == "auto":
    found = convert_lib.tokenizer_path(path) if path is not None else None
    tokenizer, chosen_by = (found, f"{flag}={path}") if found else ("byte", None)
  tok = convert_lib.load_tokenizer(tokenizer, chosen_by)
  if path is not None:  # the tokenizer (cheap) first: its errors come before the weights load
    cfg, params = convert_lib.load_model(path, step=step, flag=flag)
  else:
    cfg = model.get_preset(preset)
    params = model.init(cfg, jax.random.key(seed))
  if tok.vocab_size > cfg.vocab_size:
    source = f"{flag}={path}" if path else f"--preset={preset}"
    raise ValueError(f"tokenizer {tokenizer!r} has {tok.vocab_size} ids, the model "
                     f"({source}) only {cfg.vocab_size}")
  return Run(cfg, params, tok, model.Decoder(cfg))


def encode(run: Run, texts: list[str], add_bos: bool = True) -> list[list[int]]:
  bos = add_bos and run.tokenizer.bos_id is not None
  ids = [run.tokenizer.encode(t, add_bos=bos) for t in texts]
  empty = [i for i, x in enumerate(ids) if not x]
  if empty:
    raise ValueError(f"--prompt number(s) {empty} encode to no tokens; give some text")
  return ids


def eos_ids(tok: Tokenizer) -> list[int] | None:
  ids = getattr(tok, "stop_ids", None) or ([tok.eos_id] if tok.eos_id is not None else [])
  return list(ids) or None


def sampler_and_keys(opts: Options, b: int) -> tuple[decoding.Sampler, jax.Array]:
  """The `b`-row sampler of `opts` and row keys fold_in(seed, row)."""
  sampler = decoding.Sampler.create(b, temperature=opts.temperature, top_k=opts.top_k,
                                    top_p=opts.top_p, min_p=opts.min_p,
                                    repetition_penalty=opts.repetition_penalty)
  keys = jax.vmap(lambda i: jax.random.fold_in(jax.random.key(opts.seed), i))(np.arange(b))
  return sampler, keys


def request_kwargs(run: Run, opts: Options, b: int) -> dict:
  """The request arguments of a `decoding` entry point for `b` prompts."""
  sampler, keys = sampler_and_keys(opts, b)
  return dict(max_new_tokens=opts.max_new_tokens, sampler=sampler, key=keys,
              eos_id=eos_ids(run.tokenizer),
              stop_sequences=[run.tokenizer.encode(s) for s in opts.stop],
              pad_id=run.tokenizer.pad_id)


def rows(run: Run, out, **extra) -> list[dict]:
  """One result dict per row of a generate-like output (text, tokens, finish reason, cost)."""
  results = []
  for i in range(out.tokens.shape[0]):
    n = int(out.lengths[i])
    ids = np.asarray(out.tokens[i, :n]).tolist()
    results.append(dict(text=run.tokenizer.decode(ids), tokens=ids,
                        finish_reason=decoding.Finish(int(out.finish_reason[i])).name.lower(),
                        logprob=float(np.asarray(out.logprobs[i, :n]).sum()),
                        cost=out.cost.to_dict(), **extra))  # the batch's cost, shared by rows
  return results

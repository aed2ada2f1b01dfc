"""Text generation from a checkpoint or a Hugging Face dir (the library behind generate.py).

Methods live in `METHODS`: name -> fn(run: Run, prompts: list[list[int]], opts) -> list[dict]:
sample, beam, and speculative (`scripts.speculative_lib`). Adding a decoding method is one
function plus one registry entry.
"""

from __future__ import annotations

import dataclasses
import sys
from collections.abc import Callable

import jax
import numpy as np

import decoding
import model
from model.config import ModelConfig
from model.tokenizer import Tokenizer, get_tokenizer
from scripts import speculative_lib


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
         tokenizer: str = "auto", seed: int = 0) -> Run:
  """A sparq checkpoint dir or HF dir at `path`, or random weights for `preset`."""
  if (path is None) == (preset is None):
    raise ValueError("pass exactly one of --model=PATH (checkpoint or HF dir) or --preset=NAME")
  if path is not None:
    from scripts import convert_lib  # orbax / safetensors only when loading from disk

    cfg, params = convert_lib.load_model(path, step=step)
    if tokenizer == "auto":
      tokenizer = convert_lib.tokenizer_path(path) or "byte"
  else:
    cfg = model.get_preset(preset)
    params = model.init(cfg, jax.random.key(seed))
    tokenizer = "byte" if tokenizer == "auto" else tokenizer
  tok = get_tokenizer(tokenizer)
  if tok.vocab_size > cfg.vocab_size:
    raise ValueError(f"tokenizer {tokenizer!r} has {tok.vocab_size} ids, the model only "
                     f"{cfg.vocab_size}")
  return Run(cfg, params, tok, model.Decoder(cfg))


def encode(run: Run, texts: list[str], add_bos: bool = True) -> list[list[int]]:
  bos = add_bos and run.tokenizer.bos_id is not None
  ids = [run.tokenizer.encode(t, add_bos=bos) for t in texts]
  empty = [i for i, x in enumerate(ids) if not x]
  if empty:
    raise ValueError(f"--prompt number(s) {empty} encode to no tokens; give some text")
  return ids


def _eos_ids(tok: Tokenizer) -> list[int] | None:
  ids = getattr(tok, "stop_ids", None) or ([tok.eos_id] if tok.eos_id is not None else [])
  return list(ids) or None


def _stop_sequences(tok: Tokenizer, stop: tuple[str, ...]) -> list[list[int]]:
  return [tok.encode(s) for s in stop]


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


def sampler_and_keys(opts: Options, b: int) -> tuple[decoding.Sampler, jax.Array]:
  """The `b`-row sampler of `opts` and row keys fold_in(seed, row)."""
  sampler = decoding.Sampler.create(b, temperature=opts.temperature, top_k=opts.top_k,
                                    top_p=opts.top_p, min_p=opts.min_p,
                                    repetition_penalty=opts.repetition_penalty)
  keys = jax.vmap(lambda i: jax.random.fold_in(jax.random.key(opts.seed), i))(np.arange(b))
  return sampler, keys


def run_sample(run: Run, prompts: list[list[int]], opts: Options) -> list[dict]:
  """Sampling (temperature 0 = greedy) with the per-row sampler settings of `opts`."""
  b = len(prompts)
  sampler, keys = sampler_and_keys(opts, b)
  streamer = _Streamer(run.tokenizer) if opts.stream else None
  out = decoding.generate(run.params, prompts, run.step_fn, sampler=sampler,
                          max_new_tokens=opts.max_new_tokens,
                          key=keys,
                          eos_id=_eos_ids(run.tokenizer),
                          stop_sequences=_stop_sequences(run.tokenizer, opts.stop),
                          pad_id=run.tokenizer.pad_id, stream_fn=streamer)
  if streamer is not None:
    print(flush=True)
  results = []
  for i in range(b):
    n = int(out.lengths[i])
    ids = np.asarray(out.tokens[i, :n]).tolist()
    results.append(dict(text=run.tokenizer.decode(ids), tokens=ids,
                        finish_reason=decoding.Finish(int(out.finish_reason[i])).name.lower(),
                        logprob=float(np.asarray(out.logprobs[i, :n]).sum())))
  return _with_cost(results, out.cost)


def run_beam(run: Run, prompts: list[list[int]], opts: Options) -> list[dict]:
  """Beam search; each prompt returns its `num_return` best hypotheses."""
  out = decoding.beam_search(run.params, prompts, run.step_fn, beam_width=opts.beam_width,
                             max_new_tokens=opts.max_new_tokens,
                             eos_id=_eos_ids(run.tokenizer), length_penalty=opts.length_penalty,
                             pad_id=run.tokenizer.pad_id)
  results = []
  for i in range(len(prompts)):
    hyps = []
    for j in range(opts.num_return):
      n = int(out.lengths[i, j])
      ids = np.asarray(out.tokens[i, j, :n]).tolist()
      hyps.append(dict(text=run.tokenizer.decode(ids), tokens=ids,
                       score=float(out.scores[i, j]), logprob=float(out.logprobs[i, j])))
    results.append(dict(text=hyps[0]["text"], hypotheses=hyps))
  return _with_cost(results, out.cost)


def _with_cost(results: list[dict], cost: decoding.Cost) -> list[dict]:
  for r in results:
    r["cost"] = cost.to_dict()  # the batch's cost, shared by its rows
  return results


METHODS: dict[str, Callable[[Run, list[list[int]], Options], list[dict]]] = {
    "sample": run_sample,
    "beam": run_beam,
    "speculative": speculative_lib.run_speculative,
}


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


def generate_text(run: Run, texts: list[str], method: str, opts: Options) -> list[dict]:
  """Encodes `texts`, runs `method`, returns one result dict per prompt."""
  validate(method, opts, texts)
  return METHODS[method](run, encode(run, texts), opts)

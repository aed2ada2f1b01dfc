"""Next-token loss, perplexity and bits-per-byte of any params tree (float, masked, QArray)."""

from __future__ import annotations

import functools
import json
import math
import os
import time

import jax
import jax.numpy as jnp
import ml_collections
import optax

from model import transformer
from model.checkpoint import qarray_manifest
from model.config import ModelConfig
from model.tree import NonFiniteError, tree_nbytes
from scripts import checkpoint_lib, cli_lib, data_lib


def nll_sum(model_cfg: ModelConfig, params, batch) -> tuple[jax.Array, jax.Array]:
  """(sum of next-token NLL in nats, number of targets) over a packed batch."""
  tokens_BL = batch["tokens"]
  logits_BLV, _ = transformer.apply(model_cfg, params, tokens_BL, positions=batch["positions"],
                                    segment_ids=batch["segment_ids"])
  mask_BT = data_lib.target_mask(batch["segment_ids"])
  nll_BT = optax.softmax_cross_entropy_with_integer_labels(logits_BLV[:, :-1], tokens_BL[:, 1:])
  return jnp.sum(nll_BT * mask_BT), jnp.sum(mask_BT)


@functools.partial(jax.jit, static_argnums=0)
def _eval_step(model_cfg: ModelConfig, params, batch):
  return nll_sum(model_cfg, params, batch)


def summarize(nll: float, count: float) -> dict[str, float]:
  """loss (nats/target), perplexity, bits-per-byte (byte tokenizer: one target per byte)."""
  loss = nll / max(count, 1.0)
  return {"loss": loss, "ppl": math.exp(min(loss, 700.0)), "bpb": loss / math.log(2),
          "targets": float(count)}


def evaluate(model_cfg: ModelConfig, params, batches, *, split: str = "val",
             max_batches: int | None = None, put_batch=None) -> dict[str, float]:
  """Evaluates `params` on an iterable of batches, or on a split of a `data` ConfigDict.

  Args:
    batches: an iterable of batch dicts, or a `data` config section (corpus, path,
      seq_len, batch_size, ...), in which case `split` is read and covered in order.
    max_batches: stop after this many batches (None: all).
    put_batch: optional placement of a numpy batch (e.g. a sharded device_put).
  Returns:
    {"loss", "ppl", "bpb", "targets", "batches", "seconds"}.
  """
  if isinstance(batches, ml_collections.ConfigDict):
    data = batches
    if data.seq_len > model_cfg.max_seq_len:
      raise ValueError(f"config.data.seq_len={data.seq_len} exceeds the model's "
                       f"max_seq_len={model_cfg.max_seq_len}")
    stream = data_lib.load_split(data, split)
    batches = data_lib.eval_batches(stream, data.batch_size, data.seq_len, max_batches)
  t0 = time.perf_counter()
  nll, count, n = 0.0, 0.0, 0
  parts = []
  for batch in batches:
    if max_batches is not None and n >= max_batches:
      break
    batch = put_batch(batch) if put_batch else jax.tree.map(jnp.asarray, batch)
    parts.append(_eval_step(model_cfg, params, batch))
    n += 1
  for s, c in jax.device_get(parts):  # one sync at the end keeps dispatch asynchronous
    nll += float(s)
    count += float(c)
  out = summarize(nll, count)
  out.update(batches=float(n), seconds=time.perf_counter() - t0)
  return out


def evaluate_checkpoint(workdir: str, data=None, *, splits=("val", "test"),
                        step: int | None = None, max_batches: int | None = None,
                        output: str | None = None) -> dict:
  """Evaluates a checkpoint of `workdir` on `splits`; writes and returns a JSON-able dict.

  data: a `data` config section (default: the one `workdir` was trained with).
  output: the JSON path (default `workdir/eval_step<N>.json`).
  """
  for s in splits:
    if s not in data_lib.SPLITS:
      raise ValueError(f"split={s!r}; valid: {data_lib.SPLITS}")
  if max_batches is not None and max_batches < 1:
    raise ValueError(f"--max_batches={max_batches} must be >= 1")
  data = data_config_for(workdir) if data is None else data
  data_lib.validate(data)
  params, model_cfg, step = checkpoint_lib.load_params(workdir, step)
  data_lib.check_vocab(model_cfg.vocab_size, f"the checkpoint's vocab_size (in {workdir!r})")
  if data.seq_len > model_cfg.max_seq_len:
    raise ValueError(f"seq_len={data.seq_len} exceeds the checkpoint's "
                     f"max_seq_len={model_cfg.max_seq_len}")
  result = {"workdir": os.path.abspath(workdir), "step": step,
            "param_bytes": tree_nbytes(params), "n_quantized": len(qarray_manifest(params)),
            "unigram_entropy_bits": data_lib.unigram_entropy_bits(data_lib.load_split(data,
                                                                                      "train"))}
  for s in splits:
    result[s] = evaluate(model_cfg, params, data, split=s, max_batches=max_batches)
    if not math.isfinite(result[s]["loss"]):
      raise NonFiniteError(f"{s} loss of {workdir!r} step {step} is "
                               f"{result[s]['loss']} (finite weights, vocab covered); nothing "
                               "written")
  result["output"] = output or os.path.join(workdir, f"eval_step{step}.json")
  with open(result["output"], "w") as f:
    json.dump(result, f, indent=2)
  return result


def data_config_for(workdir: str):
  """The `data` section a workdir was trained with (defaults where it has no config.json)."""
  data = data_lib.default_config()
  path = os.path.join(workdir, "config.json")
  if os.path.exists(path):
    saved = cli_lib.read_json(path, f"--workdir={workdir}").get("data", {})
    data.update({k: v for k, v in saved.items() if k in data})
  return data


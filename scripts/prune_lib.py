"""Pruning a checkpoint: load, `sparsity.prune`, save the pruned params with their report.

Data-aware recipes (wanda, sparsegpt, saliency, dist=owl, score=activation) are
calibrated on random windows of the corpus' train split (the one the run was
trained on; re-tokenized with the checkpoint's own tokenizer for a model imported
from Hugging Face). Structured recipes (neurons, heads, kv_groups) also write the
physically smaller model (a smaller ModelConfig) next to the masked one.
"""

from __future__ import annotations

import json
import os

import jax

import sparsity
from model.calibration import Calibration
from scripts import checkpoint_lib, convert_lib, data_lib, eval_lib
from sparsity import rules as rules_lib

REPORT_NAME = "prune_report.json"
SHRUNK_DIR = "shrunk"
CALIB_MODES = ("sequential", "one_pass")


def check_out(out: str, workdir: str, flag: str = "--out") -> str:
  """The absolute `out` if it is a writable folder other than `workdir` holding no checkpoint
  yet; else a ValueError naming `flag` and the fix. Called before anything is loaded, so a
  reused --out fails at once, not after the compute at save time."""
  path = checkpoint_lib.check_writable_dir(out, flag, differ_from=workdir)
  for folder in (path, os.path.join(path, SHRUNK_DIR)):
    if checkpoint_lib.has_checkpoint(folder):
      raise ValueError(f"{flag}={out} already holds a checkpoint ({folder}/"
                       f"{checkpoint_lib.CKPT_SUBDIR}); pass a fresh {flag} or delete it")
  return path


def needs_calibration(recipe: str) -> bool:
  """Whether a recipe reads calibration data (validated recipe string)."""
  name, kwargs = sparsity.parse_recipe(recipe)
  method = sparsity.PRUNE_METHODS[name]
  return (method.needs_calib or kwargs.get("dist") == "owl"
          or kwargs.get("score") == "activation")


def calibration(workdir: str, model_cfg, *, n_seqs: int, seq_len: int | None, seed: int,
                sequential: bool, tokenizer: str = "auto") -> Calibration:
  """Calibration windows from the train split of the data `workdir` was trained on."""
  data = eval_lib.data_config_for(workdir)
  seq_len = seq_len or min(data.seq_len, model_cfg.max_seq_len)
  if seq_len > model_cfg.max_seq_len:
    raise ValueError(f"--calib_len={seq_len} exceeds the checkpoint's "
                     f"max_seq_len={model_cfg.max_seq_len}")
  what = None  # the flag that picked the tokenizer, for its errors
  if tokenizer == "auto":
    found = convert_lib.tokenizer_path(workdir)
    tokenizer, what = (found, f"--workdir={workdir}") if found else ("byte", None)
  tok = None if tokenizer == "byte" else convert_lib.load_tokenizer(tokenizer, what)
  batches = data_lib.calibration_batches(data, n_seqs, seq_len, seed=seed, tokenizer=tok)
  return Calibration(model_cfg, batches, sequential=sequential)


def prune_checkpoint(workdir: str, recipe: str, out: str, *, step: int | None = None,
                     seed: int = 0, rules=(), calib_seqs: int = 128,
                     calib_len: int | None = None, calib_mode: str = "sequential",
                     tokenizer: str = "auto") -> dict:
  """Prunes a checkpoint of `workdir` into `out`; returns the report (also written as JSON).

  `workdir` is a sparq run folder (latest or --step checkpoint), an imported one
  (`scripts.convert --to=sparq`), or a Hugging Face folder (config.json + safetensors).

  rules: `(regex, spec)` pairs or 'REGEX=SPEC' strings (SPEC none | prune | a sparsity),
  tried before the default skips (embeddings, LM head, norms, biases).
  calib_seqs / calib_len / calib_mode: calibration windows (count, tokens per window,
  default the run's seq_len) and mode for data-aware recipes (a recipe's own mode=
  option wins).
  """
  name, kwargs = sparsity.parse_recipe(recipe)  # bad recipes fail before anything is read
  if calib_mode not in CALIB_MODES:
    raise ValueError(f"--calib_mode={calib_mode!r}; valid: {CALIB_MODES}")
  rules = [rules_lib.parse_rule(r) if isinstance(r, str) else tuple(r) for r in rules]
  check_out(out, workdir)
  if convert_lib.model_kind(workdir, "--workdir") == "hf":  # pruned without importing first
    model_cfg, params = convert_lib.load_hf(workdir, "--workdir")
    step = 0
  else:
    params, model_cfg, step = checkpoint_lib.load_params(workdir, step)
  calib = None
  if needs_calibration(recipe):
    calib = calibration(workdir, model_cfg, n_seqs=calib_seqs, seq_len=calib_len, seed=seed,
                        sequential=calib_mode == "sequential", tokenizer=tokenizer)
  pruned, _, report = sparsity.prune_with_masks(
      params, recipe, key=jax.random.key(seed), rules=rules, calib=calib, cfg=model_cfg)
  report.update(source=os.path.abspath(workdir), step=step, seed=seed)
  if calib is not None:
    report["calibration"] = dict(n_seqs=calib_seqs, tokens=calib.n_tokens,
                                 mode=kwargs.get("mode", calib_mode))
  meta = {"prune": {k: report[k] for k in ("recipe", "rules", "source", "seed", "totals")}}
  checkpoint_lib.save_params(out, pruned, model_cfg, step, meta=meta)
  if sparsity.PRUNE_METHODS[name].structured:
    small_cfg, small, shrink_report = sparsity.shrink_recipe(params, recipe, cfg=model_cfg,
                                                             calib=calib)
    path = os.path.join(out, SHRUNK_DIR)
    checkpoint_lib.save_params(path, small, small_cfg, step, meta=meta)
    report["shrunk"] = dict(shrink_report, path=path, model_config=small_cfg.to_dict())
  with open(os.path.join(out, REPORT_NAME), "w") as f:
    json.dump(report, f, indent=2)
  return report


def summary(report: dict, out: str) -> str:
  """The report's table and where the outputs are."""
  out = os.path.abspath(out)
  text = (f"{sparsity.format_report(report)}\npruned checkpoint (step {report['step']}) in "
          f"{out}; report {os.path.join(out, REPORT_NAME)}")
  if "shrunk" in report:
    s = report["shrunk"]
    mc = s["model_config"]
    text += (f"\nshrunk model ({s['params_after']:,} params, ffn_dim {mc['ffn_dim']}, "
             f"{mc['n_heads']} heads) in {s['path']}")
  return text

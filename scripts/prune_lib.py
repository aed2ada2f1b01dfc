"""Pruning a checkpoint: load, `sparsity.prune`, save the pruned params with their report."""

from __future__ import annotations

import json
import os

import jax

import sparsity
from scripts import checkpoint_lib
from sparsity import rules as rules_lib

REPORT_NAME = "prune_report.json"


def prune_checkpoint(workdir: str, recipe: str, out: str, *, step: int | None = None,
                     seed: int = 0, rules=()) -> dict:
  """Prunes a checkpoint of `workdir` into `out`; returns the report (also written as JSON).

  rules: `(regex, spec)` pairs or 'REGEX=SPEC' strings (SPEC none | prune | a sparsity),
  tried before the default skips (embeddings, LM head, norms, biases).
  """
  sparsity.parse_recipe(recipe)  # bad recipes fail before anything is loaded or written
  rules = [rules_lib.parse_rule(r) if isinstance(r, str) else tuple(r) for r in rules]
  checkpoint_lib.check_writable_dir(out, "--out", differ_from=workdir)
  params, model_cfg, step = checkpoint_lib.load_params(workdir, step)
  pruned, report = sparsity.prune(params, recipe, key=jax.random.key(seed), rules=rules)
  report.update(source=os.path.abspath(workdir), step=step, seed=seed)
  meta = {"prune": {k: report[k] for k in ("recipe", "rules", "source", "seed", "totals")}}
  checkpoint_lib.save_params(out, pruned, model_cfg, step, meta=meta)
  with open(os.path.join(out, REPORT_NAME), "w") as f:
    json.dump(report, f, indent=2)
  return report


def summary(report: dict, out: str) -> str:
  """The report's table and where the outputs are."""
  out = os.path.abspath(out)
  return (f"{sparsity.format_report(report)}\npruned checkpoint (step {report['step']}) in "
          f"{out}; report {os.path.join(out, REPORT_NAME)}")

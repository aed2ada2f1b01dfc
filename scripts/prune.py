r"""Prunes a checkpoint: python -m scripts.prune --workdir=RUN --prune=magnitude:0.5 --out=OUT.

Loads the latest (or --step) checkpoint of --workdir, applies the recipe
(`magnitude:S`, `magnitude_global:S`, `random:S`; see `sparsity.PRUNE_METHODS`),
and writes an ordinary params checkpoint to OUT (its meta holds the recipe)
plus OUT/prune_report.json (per-layer sparsity, non-zeros, bytes, errors).
Rules: --rule='REGEX=SPEC' (repeatable; SPEC none | prune | a sparsity), tried
before the default skips (embeddings, LM head, norms, biases).
"""

from __future__ import annotations

import json
import os

import jax
from absl import app, flags

import sparsity
from scripts import checkpoint_lib
from sparsity import rules as rules_lib

_WORKDIR = flags.DEFINE_string("workdir", None, "Run folder holding the checkpoint to prune.")
_PRUNE = flags.DEFINE_string("prune", None, "Recipe, e.g. magnitude:0.5.")
_OUT = flags.DEFINE_string("out", None, "Output folder for the pruned checkpoint and report.")
_STEP = flags.DEFINE_integer("step", None, "Checkpoint step (default: latest).")
_SEED = flags.DEFINE_integer("seed", 0, "Seed for stochastic recipes (random).")
_RULES = flags.DEFINE_multi_string("rule", [], "Extra rule REGEX=SPEC, first match wins.")
flags.mark_flags_as_required(["workdir", "prune", "out"])

REPORT_NAME = "prune_report.json"


def prune_checkpoint(workdir: str, recipe: str, out: str, *, step: int | None = None,
                     seed: int = 0, rules=()) -> dict:
  """Prunes a checkpoint of `workdir` into `out`; returns the report (also written as JSON)."""
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


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  try:
    report = prune_checkpoint(_WORKDIR.value, _PRUNE.value, _OUT.value, step=_STEP.value,
                              seed=_SEED.value, rules=_RULES.value)
  except ValueError as e:
    raise SystemExit(f"error: {e}") from None
  print(sparsity.format_report(report))
  print(f"pruned checkpoint (step {report['step']}) in {os.path.abspath(_OUT.value)}; "
        f"report {os.path.join(os.path.abspath(_OUT.value), REPORT_NAME)}")


if __name__ == "__main__":
  app.run(main)

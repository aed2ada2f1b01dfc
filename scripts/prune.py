r"""Prunes a checkpoint: python -m scripts.prune --workdir=RUN --prune=magnitude:0.5 --out=OUT.

Loads the latest (or --step) checkpoint of --workdir, applies the recipe
(`magnitude:S`, `magnitude_global:S`, `random:S`; see `sparsity.PRUNE_METHODS`),
and writes an ordinary params checkpoint to OUT (its meta holds the recipe)
plus OUT/prune_report.json (per-layer sparsity, non-zeros, bytes, errors).
Rules: --rule='REGEX=SPEC' (repeatable; SPEC none | prune | a sparsity), tried
before the default skips (embeddings, LM head, norms, biases).
"""

from absl import flags

from scripts import cli_lib, prune_lib

_WORKDIR = flags.DEFINE_string("workdir", None, "Run folder holding the checkpoint to prune.")
_PRUNE = flags.DEFINE_string("prune", None, "Recipe, e.g. magnitude:0.5.")
_OUT = flags.DEFINE_string("out", None, "Output folder for the pruned checkpoint and report.")
_STEP = flags.DEFINE_integer("step", None, "Checkpoint step (default: latest).")
_SEED = flags.DEFINE_integer("seed", 0, "Seed for stochastic recipes (random).")
_RULES = flags.DEFINE_multi_string("rule", [], "Extra rule REGEX=SPEC, first match wins.")
flags.mark_flags_as_required(["workdir", "prune", "out"])


def main():
  report = prune_lib.prune_checkpoint(_WORKDIR.value, _PRUNE.value, _OUT.value,
                                      step=_STEP.value, seed=_SEED.value, rules=_RULES.value)
  print(prune_lib.summary(report, _OUT.value))


if __name__ == "__main__":
  cli_lib.run(main)

r"""Prunes a checkpoint: python -m scripts.prune --workdir=RUN --prune=wanda:0.5 --out=OUT.

Recipes (see `sparsity.recipes`): magnitude:S | magnitude:N:M | magnitude:S:block=4x4,
magnitude_global:S, random:S, wanda:S | wanda:2:4, sparsegpt:S | sparsegpt:2:4,
saliency:S, neurons:S, heads:S, kv_groups:S; options such as :dist=erk|owl and
:mode=one_pass. Data-aware recipes calibrate on --calib_seqs windows of the run's
train split. Writes an ordinary params checkpoint to OUT (its meta holds the recipe),
OUT/prune_report.json, and for structured recipes the shrunk model in OUT/shrunk.
Rules: --rule='REGEX=SPEC' (repeatable; SPEC none | prune | a sparsity).
"""

from absl import flags

from scripts import cli_lib, prune_lib

_WORKDIR = flags.DEFINE_string("workdir", None, "Run folder holding the checkpoint to prune.")
_PRUNE = flags.DEFINE_string("prune", None, "Recipe, e.g. wanda:0.5 or sparsegpt:2:4.")
_OUT = flags.DEFINE_string("out", None, "Output folder for the pruned checkpoint and report.")
_STEP = flags.DEFINE_integer("step", None, "Checkpoint step (default: latest).")
_SEED = flags.DEFINE_integer("seed", 0, "Seed for stochastic recipes and calibration windows.")
_RULES = flags.DEFINE_multi_string("rule", [], "Extra rule REGEX=SPEC, first match wins.")
_CALIB_SEQS = flags.DEFINE_integer("calib_seqs", 128, "Calibration windows.")
_CALIB_LEN = flags.DEFINE_integer("calib_len", None, "Tokens per window (default: seq_len).")
_CALIB_MODE = flags.DEFINE_enum("calib_mode", "sequential", prune_lib.CALIB_MODES,
                                "Calibrate block by block on pruned blocks, or one pass.")
flags.mark_flags_as_required(["workdir", "prune", "out"])


def main():
  report = prune_lib.prune_checkpoint(
      _WORKDIR.value, _PRUNE.value, _OUT.value, step=_STEP.value, seed=_SEED.value,
      rules=_RULES.value, calib_seqs=_CALIB_SEQS.value, calib_len=_CALIB_LEN.value,
      calib_mode=_CALIB_MODE.value)
  print(prune_lib.summary(report, _OUT.value))


if __name__ == "__main__":
  cli_lib.run(main)

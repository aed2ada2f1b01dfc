r"""Trains a sparq LM: python -m scripts.train --config=scripts/configs/train.py:tiny --workdir=DIR.

Overrides: --config.a.b=value (e.g. --config.train.steps=200). Resumes from the
latest checkpoint in --workdir. Exits non-zero with a clear message on bad input.
"""

from absl import app, flags, logging
from ml_collections import config_flags

from scripts import train_lib

_CONFIG = config_flags.DEFINE_config_file("config", None, "Training config file.",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Output folder (checkpoints, metrics).")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if not flags.FLAGS["verbosity"].present:  # orbax logs every file at INFO
    logging.set_verbosity(logging.WARNING)
  try:
    result = train_lib.train_and_evaluate(_CONFIG.value, _WORKDIR.value)
  except (ValueError, train_lib.NonFiniteLossError) as e:
    raise SystemExit(f"error: {e}") from None
  s = result.summary
  print(f"step {s['step']}: val bits/byte {s['val_bpb']:.4f} (unigram entropy "
        f"{s['unigram_entropy_bits']:.3f}), {s['params']:,} params, "
        f"{(s['tokens_per_s'] or float('nan')) / 1e3:.1f}k train tokens/s; "
        f"outputs in {s['workdir']}")


if __name__ == "__main__":
  app.run(main)

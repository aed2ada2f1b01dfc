r"""Trains an LM: python -m scripts.train --config=scripts/configs/train/lm.py:tiny --workdir=DIR.

Overrides: --config.a.b=value (e.g. --config.train.steps=200). Resumes from the
latest checkpoint in --workdir. Exits with status 2 and one line on bad input. A
config with a `sparsity` section (configs/train/sparse.py:METHOD) trains sparse; one with
a `qat` section (configs/train/qat.py:int4, :matryoshka, ...) trains quantization-aware.
"""

from absl import flags
from ml_collections import config_flags

from scripts import cli_lib, qat_lib, sparse_train_lib, train_lib

_CONFIG = config_flags.DEFINE_config_file("config", None, "Training config file.",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Output folder (checkpoints, metrics).")
flags.mark_flags_as_required(["config", "workdir"])


def main():
  config = _CONFIG.value
  if "qat" in config:
    result = qat_lib.train_qat(config, _WORKDIR.value)
  else:
    result = sparse_train_lib.train(config, _WORKDIR.value)
  print(train_lib.format_summary(result.summary))


if __name__ == "__main__":
  cli_lib.run(main, errors=(train_lib.NonFiniteLossError,))

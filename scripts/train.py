r"""Trains an LM: python -m scripts.train --config=scripts/configs/train/lm.py:tiny --workdir=DIR.

Overrides: --config.a.b=value (e.g. --config.train.steps=200). Resumes from the
latest checkpoint in --workdir. Exits with status 2 and one line on bad input. A
config with a `sparsity` section (configs/train/sparse.py:METHOD) trains sparse.
"""

from absl import flags
from ml_collections import config_flags

from scripts import cli_lib, sparse_train_lib, train_lib

_CONFIG = config_flags.DEFINE_config_file("config", None, "Training config file.",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Output folder (checkpoints, metrics).")
flags.mark_flags_as_required(["config", "workdir"])


def main():
  result = sparse_train_lib.train(_CONFIG.value, _WORKDIR.value)
  print(train_lib.format_summary(result.summary))


if __name__ == "__main__":
  cli_lib.run(main, errors=(train_lib.NonFiniteLossError,))

r"""Trains and scores a retrieval model: python -m scripts.train_retrieval \
  --config=scripts/configs/train/retrieval.py:512 --workdir=DIR.

Writes a passkey / key-value corpus, trains a small byte model on it (resumes from
DIR/train), decodes held-out problems greedily and prints the accuracy; details in
`scripts.retrieval_lib`. Overrides: --config.a.b=value. Exits with status 2 and one
line on bad input.
"""

from absl import flags
from ml_collections import config_flags

from scripts import cli_lib, retrieval_lib, train_lib

_CONFIG = config_flags.DEFINE_config_file("config", None, "Retrieval config file.",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Output folder (corpus, checkpoints, results).")
flags.mark_flags_as_required(["config", "workdir"])


def main():
  print(retrieval_lib.format_result(retrieval_lib.run(_CONFIG.value, _WORKDIR.value)))


if __name__ == "__main__":
  cli_lib.run(main, errors=(train_lib.NonFiniteLossError,))

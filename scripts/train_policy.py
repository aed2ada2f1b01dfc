r"""Trains a search policy per task: python -m scripts.train_policy \
  --config=scripts/configs/train/policy.py:arithmetic --workdir=DIR.

Writes a corpus of the task's problems, trains a small byte model on it (resumes from
DIR/train), samples held-out problems at the default difficulty and prints pass@1 (one
sample at temperature 1.0) and greedy accuracy; details in `scripts.policy_lib`.
Overrides: --config.a.b=value. Exits with status 2 and one line on bad input.
"""

from absl import flags
from ml_collections import config_flags

from scripts import cli_lib, policy_lib, train_lib

_CONFIG = config_flags.DEFINE_config_file("config", None, "Policy config file.",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Output folder (corpus, checkpoints, results).")
flags.mark_flags_as_required(["config", "workdir"])


def main():
  print(policy_lib.format_result(policy_lib.run(_CONFIG.value, _WORKDIR.value)))


if __name__ == "__main__":
  cli_lib.run(main, errors=(train_lib.NonFiniteLossError,))

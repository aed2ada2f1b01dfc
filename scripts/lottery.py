r"""Lottery tickets (IMP + rewinding): python -m scripts.lottery --workdir=runs/lottery.

Trains dense, then each round (--config.lottery.rounds) prunes a fraction
(--config.lottery.prune_fraction) of the surviving weights, rewinds them to the
weights of step --config.lottery.rewind_step and retrains, with the random-reinit
and random-mask controls; prints val bits/byte per round (also results.jsonl).
Any field can be overridden, e.g. --config.model.preset=tiny --config.train.steps=300
(defaults: `scripts.lottery_lib.default_config`). A killed run resumes at the first
unfinished round. Exits with status 2 and one line on bad input.
"""

from absl import flags
from ml_collections import config_flags

from scripts import cli_lib, lottery_lib, train_lib

_CONFIG = config_flags.DEFINE_config_dict("config", lottery_lib.default_config(),
                                          "Lottery config (--config.a.b=value overrides).")
_WORKDIR = flags.DEFINE_string("workdir", None, "Output folder (rounds, results.jsonl).")
flags.mark_flags_as_required(["workdir"])


def main():
  print(lottery_lib.format_records(lottery_lib.run(_CONFIG.value, _WORKDIR.value)))


if __name__ == "__main__":
  cli_lib.run(main, errors=(train_lib.NonFiniteLossError,))

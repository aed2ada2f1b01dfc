r"""Evaluates a checkpoint: python -m scripts.eval --workdir=DIR [--split=val,test] [--step=N].

Prints and writes JSON with loss, perplexity and bits-per-byte per split. Works
for float, pruned and quantized (QArray) checkpoints. The data section comes from
DIR/config.json (the training run's), or from --config when given, e.g.
--config=scripts/configs/train/lm.py --config.data.corpus=files --config.data.path=notes/.
"""

import json

from absl import flags
from ml_collections import config_flags

from scripts import cli_lib, eval_lib

_WORKDIR = flags.DEFINE_string("workdir", None, "Folder holding checkpoints/.")
_STEP = flags.DEFINE_integer("step", None, "Checkpoint step (default: latest).")
_SPLIT = flags.DEFINE_list("split", ["val", "test"], "Splits to evaluate.")
_MAX_BATCHES = flags.DEFINE_integer("max_batches", None, "Batches per split (default: all).")
_OUTPUT = flags.DEFINE_string("output", None, "JSON path (default: DIR/eval_step<N>.json).")
_CONFIG = config_flags.DEFINE_config_file("config", None, "Optional config for the data section.")
flags.mark_flag_as_required("workdir")


def main():
  data = _CONFIG.value.data if _CONFIG.value else None
  result = eval_lib.evaluate_checkpoint(_WORKDIR.value, data, splits=tuple(_SPLIT.value),
                                        step=_STEP.value, max_batches=_MAX_BATCHES.value,
                                        output=_OUTPUT.value)
  print(json.dumps(result, indent=2))
  print(f"wrote {result['output']}")


if __name__ == "__main__":
  cli_lib.run(main)

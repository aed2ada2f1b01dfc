r"""Evaluates a checkpoint: python -m scripts.eval --workdir=DIR [--split=val,test] [--step=N].

Prints and writes JSON with loss, perplexity and bits-per-byte per split. Works
for float, pruned and quantized (QArray) checkpoints. The data section comes from
DIR/config.json (the training run's), or from --config when given, e.g.
--config=scripts/configs/train.py --config.data.corpus=files --config.data.path=notes/.
"""

import json
import os

from absl import app, flags, logging
from ml_collections import config_flags

from scripts import eval_lib

_WORKDIR = flags.DEFINE_string("workdir", None, "Folder holding checkpoints/.")
_STEP = flags.DEFINE_integer("step", None, "Checkpoint step (default: latest).")
_SPLIT = flags.DEFINE_list("split", ["val", "test"], "Splits to evaluate.")
_MAX_BATCHES = flags.DEFINE_integer("max_batches", None, "Batches per split (default: all).")
_OUTPUT = flags.DEFINE_string("output", None, "JSON path (default: DIR/eval_step<N>.json).")
_CONFIG = config_flags.DEFINE_config_file("config", None, "Optional config for the data section.")
flags.mark_flag_as_required("workdir")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if not flags.FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)
  data = _CONFIG.value.data if _CONFIG.value else eval_lib.data_config_for(_WORKDIR.value)
  try:
    if _MAX_BATCHES.value is not None and _MAX_BATCHES.value < 1:
      raise ValueError(f"--max_batches={_MAX_BATCHES.value} must be >= 1")
    result = eval_lib.evaluate_checkpoint(_WORKDIR.value, data, splits=tuple(_SPLIT.value),
                                          step=_STEP.value, max_batches=_MAX_BATCHES.value)
  except ValueError as e:
    raise SystemExit(f"error: {e}") from None
  output = _OUTPUT.value or os.path.join(_WORKDIR.value, f"eval_step{result['step']}.json")
  with open(output, "w") as f:
    json.dump(result, f, indent=2)
  print(json.dumps(result, indent=2))
  print(f"wrote {output}")


if __name__ == "__main__":
  app.run(main)

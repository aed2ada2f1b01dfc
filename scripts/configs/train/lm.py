r"""python -m scripts.train --config=scripts/configs/train/lm.py:tiny --workdir=runs/tiny

Trains a byte-level LM on the Python standard library (the default corpus) and
writes checkpoints, metrics.jsonl, TensorBoard logs and summary.json to
--workdir. The argument picks the model preset (default "tiny"). Any field can
be overridden, e.g. `--config.model.n_layers=2 --config.data.seq_len=128
--config.train.steps=200`. Model fields left at None take the preset's value;
the defaults of every section are in `scripts.train_lib.default_config`.
"""

import ml_collections

from scripts import train_lib


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """Training config; `arg` is the model preset name."""
  c = train_lib.default_config(arg or "tiny")
  c.lock()
  return c

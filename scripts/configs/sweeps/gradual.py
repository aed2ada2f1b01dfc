r"""python -m scripts.sweeps.gradual --config=scripts/configs/sweeps/gradual.py --workdir=OUT

Zhu & Gupta's comparison: the tiny model trained with gradual magnitude pruning
(cubic schedule over 10-60% of training) to 50 / 75 / 90% sparsity vs dense
models of width 48-128, all 600 steps; writes OUT/results.{jsonl,md} and
OUT/bpb_vs_nonzeros.png (~25 min on 2 CPU cores). `gradual.py:smoke`: 2 tiny points.
"""

import ml_collections

from scripts import gradual_sweep_lib


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """The gradual-vs-dense sweep; `arg` is None or "smoke"."""
  if arg not in (None, "", "smoke"):
    raise ValueError(f"gradual sweep config arg={arg!r}; valid: None, 'smoke'")
  c = gradual_sweep_lib.default_config(smoke=arg == "smoke")
  c.lock()
  return c

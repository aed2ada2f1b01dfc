r"""python -m scripts.train --config=scripts/configs/train/sparse.py:gradual --workdir=runs/sparse

Training-time sparsity from scratch (`scripts.sparse_train_lib`): the argument is
METHOD[,PRESET] with METHOD one of none, oneshot, gradual, set, rigl, granet, polarization,
movement, pdp (default gradual) and PRESET a model preset (default tiny), e.g.
`sparse.py:rigl,test`. The `sparsity` section (defaults in
`sparse_train_lib.default_config`) sets the target sparsity, the mask-update
schedule and the method's knobs; override any field, e.g.
`--config.sparsity.sparsity=0.9 --config.sparsity.update_every=20
--config.train.steps=600`. Masks are checkpointed with the optimizer state; the
run resumes from --workdir, and summary.json reports the final masks' sparsity.
"""

import ml_collections

from scripts import sparse_train_lib, train_lib


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """Training config with a `sparsity` section; `arg` is "METHOD[,PRESET]"."""
  method, _, preset = (arg or "gradual").partition(",")
  if method not in sparse_train_lib.METHODS:
    raise ValueError(f"config argument method {method!r}; valid: {sparse_train_lib.METHODS}")
  c = train_lib.default_config(preset or "tiny")
  c.sparsity = sparse_train_lib.default_config(method)
  c.lock()
  return c

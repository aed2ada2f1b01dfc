r"""python -m scripts.train --config=scripts/configs/train/draft.py:draft --workdir=runs/spec_draft

Models for the speculative-decoding benchmark (`scripts/bench/speculative.py`),
trained by `scripts/train.py` on the same corpus (the stdlib, byte-level) with
the same data section, so they share the tokenizer:
  draft   ~0.43M params: d=128, 2 layers, 4 heads / 2 kv, ffn 384
  target  ~12.7M params: d=512, 4 layers, 8 heads / 4 kv, ffn 1536
  (`python -m scripts.train --config=scripts/configs/train/draft.py:target
   --workdir=runs/spec_target`)
Each run takes a few minutes on 2 CPU cores; it writes checkpoints and
summary.json (val bits/byte) to --workdir. Override any field with
--config.a.b=value, e.g. --config.train.steps=100.
"""

import ml_collections

from scripts import train_lib

MODELS = {
    "draft": dict(d_model=128, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=384),
    "target": dict(d_model=512, n_layers=4, n_heads=8, n_kv_heads=4, ffn_dim=1536),
}
STEPS = {"draft": 600, "target": 700}


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """`arg` is "draft" (default) or "target"."""
  arg = arg or "draft"
  if arg not in MODELS:
    raise ValueError(f"config argument {arg!r}; valid: {sorted(MODELS)}")
  c = train_lib.default_config("tiny")
  for k, v in MODELS[arg].items():
    c.model[k] = v
  c.model.max_seq_len = 2048  # decoding benchmarks run past the training length
  c.data.seq_len = 256
  c.data.batch_size = 4
  c.opt.lr = 3e-3
  c.opt.warmup_steps = 30
  c.train.steps = STEPS[arg]
  c.train.log_every = 25
  c.train.eval_every = 0
  c.train.eval_batches = 8
  c.ckpt.every = STEPS[arg]
  c.ckpt.keep = 1
  c.lock()
  return c

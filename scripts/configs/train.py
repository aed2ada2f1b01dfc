r"""python -m scripts.train --config=scripts/configs/train.py:tiny --workdir=runs/tiny

Trains a byte-level LM on the Python standard library (the default corpus) and
writes checkpoints, metrics.jsonl, TensorBoard logs and summary.json to
--workdir. The argument picks the model preset (default "tiny"). Any field can
be overridden, e.g. `--config.model.n_layers=2 --config.data.seq_len=128
--config.train.steps=200`. Model fields left at None take the preset's value.
"""

import dataclasses

import ml_collections
from ml_collections import config_dict

from model.config import ModelConfig

# ModelConfig fields that can be overridden from flags (typed placeholders).
MODEL_FIELDS = {
    "vocab_size": int, "d_model": int, "n_layers": int, "n_heads": int, "n_kv_heads": int,
    "head_dim": int, "ffn_dim": int, "max_seq_len": int, "rope_theta": float,
    "norm_eps": float, "qk_norm": bool, "qkv_bias": bool, "tie_embeddings": bool,
    "param_dtype": str, "dtype": str, "attn_impl": str, "matmul_impl": str,
}
assert set(MODEL_FIELDS) <= {f.name for f in dataclasses.fields(ModelConfig)}


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """Training config; `arg` is the model preset name."""
  c = ml_collections.ConfigDict()
  c.model = ml_collections.ConfigDict({"preset": arg or "tiny"})
  for name, typ in MODEL_FIELDS.items():
    c.model[name] = config_dict.placeholder(typ)

  c.data = ml_collections.ConfigDict()
  c.data.corpus = "stdlib"  # "stdlib" | "files"
  c.data.path = ""  # a text file or folder when corpus="files"
  c.data.extensions = ".py,.txt,.md,.rst"  # files read from a folder
  c.data.val_fraction = 0.05
  c.data.test_fraction = 0.05
  c.data.seq_len = 256
  c.data.batch_size = 32
  c.data.seed = 0  # row shuffling

  c.opt = ml_collections.ConfigDict()
  c.opt.lr = 3e-3
  c.opt.warmup_steps = 100
  c.opt.min_lr_ratio = 0.1  # cosine decays to lr * min_lr_ratio
  c.opt.b1 = 0.9
  c.opt.b2 = 0.95
  c.opt.eps = 1e-8
  c.opt.weight_decay = 0.1  # on 2-D kernels and embeddings only
  c.opt.grad_clip = 1.0  # global norm; 0 disables

  c.train = ml_collections.ConfigDict()
  c.train.steps = 1000
  c.train.seed = 0  # parameter init
  c.train.log_every = 25
  c.train.eval_every = 250  # 0: only at the end
  c.train.eval_batches = 16  # validation batches per periodic eval; 0: whole split

  c.ckpt = ml_collections.ConfigDict()
  c.ckpt.every = 250
  c.ckpt.keep = 3

  c.mesh = ml_collections.ConfigDict()
  c.mesh.data = -1  # -1: all devices not used by the other axes
  c.mesh.fsdp = 1
  c.mesh.tensor = 1
  c.lock()
  return c

r"""python -m scripts.main_job --workdir=runs/main   (or: python3 dev.py run)

The main job on embedded defaults: train the "tiny" model on the Python standard
library (~10 min on 2 CPU cores), prune it to 50% (magnitude) with a short
masked fine-tune, quantize it to int8, evaluate every variant (bits per byte on
the test split), decode a code prompt greedily with the KV cache, sample, train
a small draft model and decode speculatively (its speedup over greedy), and
print one table plus where the checkpoints, metrics and JSON report are.
`main_job.py:0.1` scales every step count by 0.1 (a quick smoke run).
"""

import ml_collections

from scripts.configs import main as main_train


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """Main-job config; `arg` is an optional float multiplying all step counts."""
  scale = float(arg) if arg else 1.0
  c = ml_collections.ConfigDict()
  c.train = main_train.get_config(arg)
  c.prune = ml_collections.ConfigDict()
  c.prune.recipe = "magnitude:0.5"
  c.prune.finetune_steps = max(1, int(150 * scale))  # masked fine-tune; 0 disables
  c.prune.finetune_lr = 1e-3
  c.quant = ml_collections.ConfigDict()
  c.quant.recipe = "int8"
  c.eval = ml_collections.ConfigDict()
  c.eval.split = "test"
  c.eval.max_batches = 64  # 0: the whole split
  c.decode = ml_collections.ConfigDict()
  c.decode.prompt = "def fibonacci(n):\n    "
  c.decode.max_new_tokens = 128
  c.decode.temperature = 0.8
  c.decode.top_p = 0.95
  c.decode.num_samples = 4
  c.decode.seed = 0
  c.speculative = ml_collections.ConfigDict()
  # Draft: a 1-layer d=64 model (~0.1M params) on the same corpus and byte tokenizer.
  c.speculative.draft_model = ml_collections.ConfigDict(
      dict(d_model=64, n_layers=1, n_heads=2, n_kv_heads=1, ffn_dim=192))
  c.speculative.draft_steps = max(1, int(400 * scale))  # 0 disables the stage
  c.speculative.gamma = 4
  c.speculative.schedule = "heuristic"  # adaptive gamma (up to 2 * gamma)
  c.speculative.num_prompts = 4  # held-out test-split snippets, decoded one at a time
  c.lock()
  return c

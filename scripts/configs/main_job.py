r"""python -m scripts.main_job --workdir=runs/main   (or: python3 dev.py run)

The main job on embedded defaults: train the "tiny" model (0.82M params, byte
level) on the Python standard library, 900 steps of 16 x 256 tokens (the whole job
~19 min on 2 idle CPU cores), prune it one-shot (magnitude, Wanda, SparseGPT at 50%
and 2:4, calibrated on 64 train windows) with short masked fine-tunes, shrink 50% of
the FFN neurons, quantize it (int8; int4 g32 by RTN, GPTQ and AWQ; W8A8 with SmoothQuant; a 150-step
int4 QAT fine-tune), evaluate every variant (bits per byte on the test split),
decode a code prompt greedily with the KV cache, sample, compare Quest top-k
block-sparse attention with dense (bits/byte, decode speed), train a small draft
model and decode speculatively (its speedup over greedy), train a tiny arithmetic
policy and compare 5 test-time search methods at an equal budget, and print one table
plus where the checkpoints, metrics and JSON report are. `main_job.py:0.1`
scales every step count by 0.1 (a quick smoke run). The training sections
(model, data, opt, train, ckpt, mesh) also run alone:
`python -m scripts.train --config=scripts/configs/main_job.py --workdir=runs/main/float`.
"""

import ml_collections

from scripts import train_lib


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """Main-job config; `arg` is an optional float multiplying all step counts."""
  scale = float(arg) if arg else 1.0
  if scale <= 0:
    raise ValueError(f"main_job.py:{arg}: the step scale must be > 0")
  c = train_lib.default_config("tiny")
  c.data.seq_len = 256
  c.data.batch_size = 16
  c.opt.lr = 3e-3
  c.opt.warmup_steps = 100
  c.train.steps = max(1, int(900 * scale))
  c.train.log_every = 25
  c.train.eval_every = 300
  c.train.eval_batches = 16
  c.ckpt.every = 300
  c.ckpt.keep = 2

  c.prune = ml_collections.ConfigDict(dict(
      # One-shot recipes, each a table row; the first also feeds the "pruned + quant" row.
      recipes=["magnitude:0.5", "wanda:0.5", "sparsegpt:0.5", "magnitude:2:4", "wanda:2:4",
               "sparsegpt:2:4", "sparsegpt:2:4:bits=4"],  # the last: joint 2:4 + int4 pass
      finetune=["magnitude:0.5", "wanda:0.5", "sparsegpt:0.5", "wanda:2:4", "sparsegpt:2:4"],
      finetune_steps=max(1, int(100 * scale)),  # masked fine-tune of `finetune`; 0 disables
      finetune_lr=1e-3,
      calib_seqs=64,  # calibration windows of data.seq_len tokens (train split)
      structured="neurons:0.5:score=activation"))  # physically shrunk model; "" disables
  c.quant = ml_collections.ConfigDict(dict(
      recipe="int8",  # also applied to the first pruned model
      # Data-aware PTQ rows (calibrated on prune.calib_seqs train windows).
      methods=["int4:g32", "int4:g32:gptq", "int4:g32:awq", "w8a8:smoothquant"],
      qat_recipe="int4:g32",  # QAT fine-tune of the float model, exported to QArrays
      qat_steps=max(1, int(150 * scale)),  # 0 disables
      qat_lr=1e-3))
  c.eval = ml_collections.ConfigDict(dict(split="test", max_batches=64))  # 0: the whole split
  c.decode = ml_collections.ConfigDict(dict(
      prompt="def fibonacci(n):\n    ", max_new_tokens=128, temperature=0.8, top_p=0.95,
      num_samples=4, seed=0))
  c.attention = ml_collections.ConfigDict(dict(
      # Block-sparse attention on the float model (sparsity.parse_selector; "" disables):
      # Quest top-k of 16-token blocks, plus the first and the local block; windows of the
      # training length (the model has not seen positions past data.seq_len).
      select="topk:k=4:block=16", windows=16, seq_len=256,  # test windows (bits/byte)
      prompt_len=192, new_tokens=64))  # greedy decode speed after a long prompt
  c.speculative = ml_collections.ConfigDict(dict(
      # Draft: a 1-layer d=64 model (~0.1M params) on the same corpus and byte tokenizer.
      draft_model=dict(d_model=64, n_layers=1, n_heads=2, n_kv_heads=1, ffn_dim=192),
      draft_steps=max(1, int(400 * scale)),  # 0 disables the stage
      gamma=4,
      schedule="heuristic",  # adaptive gamma (up to 2 * gamma)
      num_prompts=4))  # held-out test-split snippets, decoded one at a time
  c.search = ml_collections.ConfigDict(dict(
      # Test-time search at equal compute on multi-step arithmetic (scripts.search_lib): a
      # tiny policy trained for it (1200 steps, ~3 min idle; measured: pass@1 0.19 at
      # temperature 1 and greedy 0.34 on its 32 eval problems; the sweep's policy trains
      # 2000 steps), every method given the same budget of samples (particles / beams)
      # under a noisy PRM (20% false positives and negatives), on 32 held-out problems.
      task="arithmetic", policy_steps=max(1, int(1200 * scale)),  # 0 disables the stage
      corpus_lines=40_000,  # the policy's training corpus (policy_lib's default)
      budget=8, problems=32, reward="noisy:fp=0.2:fn=0.2",
      methods=("majority_vote", "best_of_n", "weighted_vote", "beam_search",
               "particle_filtering")))
  c.lock()
  return c

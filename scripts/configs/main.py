r"""python -m scripts.train --config=scripts/configs/main.py --workdir=runs/main

The main job's training run: the "tiny" preset (0.82M params, byte-level) on the
stdlib corpus, 900 steps of 16 x 256 tokens (3.7M tokens), about 10 minutes on 2
idle CPU cores, ending far below the corpus's unigram byte entropy (4.67 bits;
summary.json holds both). The argument scales the step count (e.g. `main.py:0.1`
for a one-minute smoke run).
"""

from scripts.configs import train


def get_config(arg: str | None = None):
  """Main-job training config; `arg` is an optional float multiplying the steps."""
  c = train.get_config("tiny")
  scale = float(arg) if arg else 1.0
  if scale <= 0:
    raise ValueError(f"main.py:{arg}: the step scale must be > 0")
  c.unlock()
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
  c.lock()
  return c

r"""python -m scripts.train_retrieval --config=scripts/configs/train/retrieval.py:512 --workdir=OUT

Long-context retrieval (`scripts.retrieval_lib`): writes a corpus of 8000 problems of
`decoding.tasks.retrieval` (prompts of exactly CONTEXT bytes), trains a 2-layer
d_model=128 byte model on it for 300 steps of batch 16 (every row one whole problem;
loss on the answer plus 0.1 x the prompt), then greedily decodes 200 held-out problems
(another seed) and writes OUT/retrieval.json (accuracy, by needle depth) and
OUT/outputs.jsonl. Passkey at 512: 98.5% accuracy after ~3 min of training on 2 CPU
cores. The argument is [TASK,]CONTEXT with TASK passkey (default) or kv, e.g.
`retrieval.py:kv,512`, `retrieval.py:1024`; `retrieval.py:smoke` is a few steps at
context 128. Override any field, e.g. `--config.train_config.train.steps=600
--config.task.n_pairs=20 --config.task.curriculum='((256,100),)'`. Reruns resume
training and re-evaluate.
"""

import ml_collections

from decoding.tasks import retrieval
from scripts import retrieval_lib


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """`arg` is "[TASK,]CONTEXT" (default "passkey,512") or "smoke"."""
  if arg == "smoke":
    c = retrieval_lib.default_config("passkey", 128, smoke=True)
  else:
    task, _, context = (arg or "512").rpartition(",")
    task = task or "passkey"
    if task not in retrieval.TASKS or not context.isdigit():
      raise ValueError(f"retrieval config arg={arg!r}; valid: [TASK,]CONTEXT with TASK in "
                       f"{retrieval.TASKS} and CONTEXT an int in {retrieval.MIN_CONTEXT}.."
                       f"{retrieval.MAX_CONTEXT} (prompt bytes), or 'smoke'")
    c = retrieval_lib.default_config(task, retrieval.check_context_len(int(context),
                                                                       "config arg CONTEXT"))
  c.lock()
  return c

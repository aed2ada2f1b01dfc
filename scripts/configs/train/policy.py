r"""python -m scripts.train_policy --config=scripts/configs/train/policy.py:arithmetic --workdir=OUT

A search policy (`scripts.policy_lib`): writes a corpus of 40000 problem lines of the
task (prompt + reference solution, the training difficulty mix in turn), trains the
`tiny` preset (4 layers, d_model 128, 0.82M params) on it with the next-token loss
of the solution bytes (`policy_lib.SolutionLoss`; rows of 128 bytes, batch 16, lr
3e-3), deliberately undertrained so that it is
only partially competent, then samples 200 held-out problems (another seed) at the
task's default difficulty and writes OUT/policy.json (pass@1 at temperature 1.0, greedy
accuracy) and OUT/outputs.jsonl. The argument is the task (arithmetic (default) or
countdown) or "smoke" (a few arithmetic steps). Override any field, e.g.
`--config.train_config.train.steps=800 --config.task.difficulties='((1,1),(2,3))'
--config.eval.samples=4`. Reruns do not train again (an interrupted run resumes) and
re-evaluate; only config.eval may change between them.

Measured on 2 shared CPU cores (seed 0 throughout, 200 held-out problems, pass@1 at
temperature 1.0 / greedy accuracy at the task's default difficulty):
  arithmetic (2, 3): 2000 steps, 284 s: pass@1 0.450, greedy 0.655 (at step 1200 of
    the same run 0.235 / 0.325, at 600 0.03 / 0.09);
  countdown (3, 25): 2000 steps, 392 s: pass@1 0.305, greedy 0.365 (at (4, 25): 0.030 /
    0.055, which is why the task's default is 3 numbers).
"""

import ml_collections

from scripts import policy_lib


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """`arg` is a task name (default "arithmetic") or "smoke"."""
  if arg == "smoke":
    c = policy_lib.default_config("arithmetic", smoke=True)
  else:
    if (arg or "arithmetic") not in policy_lib.TASKS:
      raise ValueError(f"policy config arg={arg!r}; valid: a task in {sorted(policy_lib.TASKS)} "
                       "or 'smoke'")
    c = policy_lib.default_config(arg or "arithmetic")
  c.lock()
  return c

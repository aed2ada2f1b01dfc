r"""python -m scripts.sweeps.search --config=scripts/configs/sweeps/search.py:arithmetic \
  --workdir=OUT

Test-time search at equal cost (`scripts.search_lib`): trains the task's policy
(`scripts/configs/train/policy.py`, pass@1 in the 20-70% regime) unless
--config.policy_dir names one, then runs every method of `config.methods` at budgets
1..64 (step-level methods to 16) on 64 held-out problems under the reward model
`config.reward`, plus repeated sampling (pass@k, coverage law) and a compute-optimal
allocation; writes OUT/search.{md,json} and OUT/search_{tokens,forward_passes,
reward_calls,coverage}.png. The argument is TASK[,REWARD] with REWARD oracle, noisy
(fp = fn = 0.2, the default) or learned; `search.py:smoke` is the test preset.
Override e.g. --config.methods="('majority_vote','beam_search')" --config.budgets="(4,8)".
"""

import ml_collections

from scripts import policy_lib, search_lib

REWARDS = {"oracle": "oracle", "noisy": "noisy:fp=0.2:fn=0.2", "learned": "learned"}


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """`arg`: "TASK[,REWARD]" (default "arithmetic,noisy") or "smoke"."""
  if arg == "smoke":
    c = search_lib.default_config("arithmetic", smoke=True)
  else:
    task, _, rew = (arg or "arithmetic").partition(",")
    if task not in policy_lib.TASKS or (rew and rew not in REWARDS):
      raise ValueError(f"search config arg={arg!r}; valid: TASK[,REWARD] with TASK in "
                       f"{sorted(policy_lib.TASKS)} and REWARD in {sorted(REWARDS)}, or 'smoke'")
    c = search_lib.default_config(task)
    c.reward = REWARDS[rew or "noisy"]
  c.lock()
  return c

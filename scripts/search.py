r"""Runs one test-time search method: python -m scripts.search --policy=DIR \
  --method=beam_search:beam_width=4 --budget=16 --reward=noisy:fp=0.2:fn=0.2 --n=32.

DIR: a `scripts.train_policy` workdir (policy.json + checkpoint). Methods are the keys of
`decoding.search.METHODS` with options as name:opt=value; the reward model is the
task's oracle PRM or a noisy one. Prints accuracy and the mean cost per problem
(generated tokens, forward passes, reward calls, FLOPs). The sweep over methods x
budgets with plots is scripts/sweeps/search.py.
"""

from absl import flags

from scripts import cli_lib, search_lib

flags.DEFINE_string("policy", "runs/policy/arithmetic", "A train_policy workdir.")
flags.DEFINE_string("method", "best_of_n", "Search method spec, e.g. particle_filtering:anneal=0.5")
flags.DEFINE_integer("budget", 8, "Samples / particles / beams (Budget.n).")
flags.DEFINE_string("reward", "noisy:fp=0.2:fn=0.2", "oracle | noisy:fp=..:fn=..[:sharpness=..]")
flags.DEFINE_integer("n", 32, "Problems in the split.")
flags.DEFINE_integer("seed", 2, "Split seed (problems) and search key.")
flags.DEFINE_string("difficulty", "", "Comma-separated difficulty (default: the task's).")
flags.DEFINE_float("temperature", 1.0, "Policy sampling temperature.")
flags.DEFINE_string("output", None, "Write the result as JSON here.")


def main():
  print(search_lib.search_from_flags(flags.FLAGS.flag_values_dict()))


if __name__ == "__main__":
  cli_lib.run(main)

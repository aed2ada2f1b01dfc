r"""python -m scripts.sweeps.search --config=scripts/configs/sweeps/search.py:arithmetic \
  --workdir=OUT

Methods x budgets of test-time search at equal cost on a task split, with the seeds'
claims checked; see scripts/configs/sweeps/search.py. A rerun resumes (the trained
policy, the value head and the finished points are reused).
"""

from absl import flags
from ml_collections import config_flags

from scripts import cli_lib, search_lib, train_lib

_CONFIG = config_flags.DEFINE_config_file(
    "config", "scripts/configs/sweeps/search.py", "Search sweep config file.", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Output folder of the run.")
flags.mark_flag_as_required("workdir")


def main():
  print(search_lib.format_result(search_lib.run(_CONFIG.value, _WORKDIR.value)))


if __name__ == "__main__":
  cli_lib.run(main, errors=(train_lib.NonFiniteLossError,))

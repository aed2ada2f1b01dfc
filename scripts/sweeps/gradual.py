r"""python -m scripts.sweeps.gradual --config=scripts/configs/sweeps/gradual.py --workdir=OUT

Large-sparse (gradual pruning) vs small-dense models at equal non-zeros; see
scripts/configs/sweeps/gradual.py. A rerun resumes (finished points are skipped).
"""

from absl import flags
from ml_collections import config_flags

from scripts import cli_lib, gradual_sweep_lib

_CONFIG = config_flags.DEFINE_config_file(
    "config", "scripts/configs/sweeps/gradual.py", "Sweep config file.", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Output folder of the sweep.")
flags.mark_flag_as_required("workdir")


def main():
  result = gradual_sweep_lib.run(_CONFIG.value, _WORKDIR.value)
  print(result["table"])
  print("wrote " + ", ".join(result["files"]))


if __name__ == "__main__":
  cli_lib.run(main)

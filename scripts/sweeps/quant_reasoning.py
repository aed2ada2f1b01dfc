r"""python -m scripts.sweeps.quant_reasoning \
  --config=scripts/configs/sweeps/quant_reasoning.py --workdir=OUT

Accuracy by weight bits x task difficulty, with output length, on a synthetic
running-sum task; see scripts/configs/sweeps/quant_reasoning.py. A rerun resumes
(the trained model and finished recipes are reused).
"""

from absl import flags
from ml_collections import config_flags

from scripts import cli_lib, reasoning_lib

_CONFIG = config_flags.DEFINE_config_file(
    "config", "scripts/configs/sweeps/quant_reasoning.py", "Protocol config file.",
    lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Output folder of the run.")
flags.mark_flag_as_required("workdir")


def main():
  result = reasoning_lib.run(_CONFIG.value, _WORKDIR.value)
  print(result["table"])
  print("wrote " + ", ".join(result["files"]))


if __name__ == "__main__":
  cli_lib.run(main)

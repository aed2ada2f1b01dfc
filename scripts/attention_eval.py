r"""python -m scripts.attention_eval --config=scripts/configs/sweeps/attention.py --workdir=OUT

Retrieval accuracy, bits/byte, density and recall of every pruned-attention policy on a
model trained here for long-context retrieval; see scripts/configs/sweeps/attention.py.
A rerun resumes (the trained model and finished rows are reused).
"""

from absl import flags
from ml_collections import config_flags

from scripts import attention_eval_lib, cli_lib

_CONFIG = config_flags.DEFINE_config_file(
    "config", "scripts/configs/sweeps/attention.py", "Sweep config file.", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Output folder of the run.")
flags.mark_flag_as_required("workdir")


def main():
  result = attention_eval_lib.run(_CONFIG.value, _WORKDIR.value)
  print(result["table"])
  print("wrote " + ", ".join(result["files"]))


if __name__ == "__main__":
  cli_lib.run(main)

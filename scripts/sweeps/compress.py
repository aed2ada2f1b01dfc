r"""python -m scripts.sweeps.compress --config=scripts/configs/sweeps/compress.py \
    --config.source=RUN --workdir=OUT

Prunes then quantizes the checkpoint of RUN at every grid point, evaluates bits/byte
and writes OUT/results.jsonl (a rerun resumes), results.md, bpb_vs_sparsity.png,
bpb_vs_bits.png and config.json; see scripts/configs/sweeps/compress.py.
"""

from absl import flags
from ml_collections import config_flags

from scripts import cli_lib, compress_sweep_lib

_CONFIG = config_flags.DEFINE_config_file(
    "config", "scripts/configs/sweeps/compress.py", "Sweep config file.", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Output folder of the sweep.")
flags.mark_flag_as_required("workdir")


def main():
  result = compress_sweep_lib.run(_CONFIG.value, _WORKDIR.value)
  print(result["table"])
  print(f"evaluated {result['evaluated']} new of {len(result['rows'])} points; wrote "
        + ", ".join(result["files"].values()))


if __name__ == "__main__":
  cli_lib.run(main)

r"""Quantizes a checkpoint: python -m scripts.quantize --workdir=RUN --out=RUN_INT8 --quant=int8.

Recipes (`quant.recipes` has the grammar): formats int8 | int4 | int2 | fp8[_e4m3|_e5m2] |
fp6[_e2m3|_e3m2] | fp4 | nf4 | w8a8, options `gN` / `tensor` / `channel` / `asym` /
`clip=mse|pP`, methods `gptq` (`act_order`), `awq`, `smoothquant` (`alpha=A`), joint
pruning `+N:M` (`int4:g128:gptq+2:4`), and mixed precision `@first_last` /
`@sensitive=K`. Data-aware recipes calibrate on `--calib_seqs` train windows.
Writes OUT/checkpoints/<step> (params with QArray leaves) and OUT/quant_report.json
(per-layer bytes before / after and relative error, bytes on disk). Bad input exits with
status 2 first.
"""

from absl import flags

import quant
from scripts import cli_lib, quantize_lib

_WORKDIR = flags.DEFINE_string("workdir", None, "Folder with the float (or pruned) checkpoint.")
_OUT = flags.DEFINE_string("out", None, "Output folder for the quantized checkpoint.")
_QUANT = flags.DEFINE_string("quant", "int8", "Quantization recipe, e.g. int8 or int4:g128.")
_STEP = flags.DEFINE_integer("step", None, "Checkpoint step (default: latest).")
_CALIB = flags.DEFINE_integer("calib_seqs", 128, "Calibration windows for data-aware recipes.")
flags.mark_flags_as_required(["workdir", "out"])


def main():
  result = quantize_lib.quantize_checkpoint(_WORKDIR.value, _OUT.value, _QUANT.value,
                                            step=_STEP.value, calib_seqs=_CALIB.value)
  print(quant.format_report(result["report"]))
  print(f"quantized checkpoint: {result['checkpoint']} "
        f"({result['report']['disk_bytes']:,} bytes on disk)\nreport: {result['report_path']}")


if __name__ == "__main__":
  cli_lib.run(main)

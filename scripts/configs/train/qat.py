r"""python -m scripts.train --config=scripts/configs/train/qat.py:int4 --workdir=runs/qat_int4

Quantization-aware training (`scripts.qat_lib.train_qat`): the argument is
VARIANT[,PRESET] with PRESET a model preset (default tiny) and VARIANT one of
  float        no fake quant (the fine-tune baseline of a QAT comparison)
  int4         weight-only int4 per channel, STE
  int4_a8      "mostly 4-bit": int4 kernels, first / last blocks int8, 8-bit activations
  int2         weight-only int2 per channel
  matryoshka   MatQuant: one int8 code, loss summed over the int8 / int4 / int2 slices
Fine-tune a float checkpoint with `--config.qat.init_from=runs/main/float` (e.g. with
`--config.train.steps=200 --config.opt.lr=1e-3 --config.opt.warmup_steps=10`). The
validation bpb is the fake-quant model's; at the end the QArray model is exported to
`workdir/quantized` (or `workdir/matryoshka_int{8,4,2}`) and summary.json reports
the bit-ops. The run resumes from --workdir.
"""

import ml_collections

from scripts import qat_lib, train_lib

VARIANTS = {
    "float": dict(recipe=""),
    "int4": dict(recipe="int4"),
    "int4_a8": dict(recipe="int4", first_last_bits=8, act_bits=8),
    "int2": dict(recipe="int2"),
    "matryoshka": dict(recipe="", matryoshka_bits="8,4,2"),
}


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """Training config with a `qat` section; `arg` is "VARIANT[,PRESET]"."""
  variant, _, preset = (arg or "int4").partition(",")
  if variant not in VARIANTS:
    raise ValueError(f"config argument variant {variant!r}; valid: {sorted(VARIANTS)}")
  c = train_lib.default_config(preset or "tiny")
  c.qat = qat_lib.default_config()
  c.qat.update(VARIANTS[variant])
  c.lock()
  return c

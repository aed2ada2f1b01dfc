r"""python -m scripts.sweeps.quant_reasoning \
  --config=scripts/configs/sweeps/quant_reasoning.py --workdir=OUT

"Quantization hurts reasoning" on a synthetic task: the tiny model trained 500
steps on 60k running-sum problems (difficulty = terms, 1..7), then float, int8,
W8A8, fp8, int4:g32 (RTN and GPTQ), nf4:g32, int4 per-channel and int2:g32 each
decode 64 held-out problems per difficulty; writes OUT/quant_reasoning.{md,json,png}
(accuracy and output length by recipe x difficulty; ~9 min on 2 busy CPU cores).
`quant_reasoning.py:smoke`: test preset, 4 steps, 2 difficulties, float and int4.
Drop a recipe with e.g. `--config.recipes="('float','int8','int4:g32')"`.
"""

import ml_collections

from scripts import reasoning_lib


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """The protocol's config; `arg` is None or "smoke"."""
  if arg not in (None, "", "smoke"):
    raise ValueError(f"quant_reasoning config arg={arg!r}; valid: None, 'smoke'")
  c = reasoning_lib.default_config(smoke=arg == "smoke")
  c.lock()
  return c

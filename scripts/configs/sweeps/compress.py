r"""python -m scripts.sweeps.compress --config=scripts/configs/sweeps/compress.py \
    --config.source=runs/main/float --workdir=runs/sweep_compress

Prunes (each method x sparsity, plus dense) and then quantizes (each recipe, "none"
keeps float) the latest checkpoint of `source`, evaluates bits/byte of every
combination on `eval.split`, and writes WORKDIR/results.jsonl (resumable: a rerun
evaluates only the missing points), results.md, bpb_vs_sparsity.png,
bpb_vs_bits.png and config.json. `compress.py:smoke` is a 10-point grid on 2 batches.
Lists are tuples so that flags can override them, e.g.
`--config.grid.quant_recipes="('none', 'int4:g32')"`.
"""

import ml_collections


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """Compression sweep config; `arg` is None (the full grid) or "smoke"."""
  if arg not in (None, "", "smoke"):
    raise ValueError(f"compress sweep config arg={arg!r}; valid: None (full grid), 'smoke'")
  smoke = arg == "smoke"
  c = ml_collections.ConfigDict()
  c.source = ""  # a run folder with checkpoints/ (its config.json's data section is used)

  c.grid = ml_collections.ConfigDict()
  c.grid.prune_methods = ("magnitude", "random") if smoke else (
      "magnitude", "magnitude_global", "random")
  c.grid.sparsities = (0.25, 0.5) if smoke else (0.1, 0.3, 0.5, 0.7)
  c.grid.dense = True  # also the unpruned model ("none"), the reference of every plot
  c.grid.quant_recipes = ("none", "int8") if smoke else ("none", "int8", "int4:g64", "int2:g32")

  c.eval = ml_collections.ConfigDict()
  c.eval.split = "test"
  c.eval.max_batches = 2 if smoke else 16  # 0: the whole split

  c.seed = 0  # the random pruning baseline's key
  c.lock()
  return c

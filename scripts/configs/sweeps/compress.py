r"""python -m scripts.sweeps.compress --config=scripts/configs/sweeps/compress.py \
    --config.source=runs/main/float --workdir=runs/sweep_compress

Prunes (each method x sparsity, plus dense) and then quantizes (each recipe, "none"
keeps float) the latest checkpoint of `source`, evaluates bits/byte of every
combination on `eval.split`, and writes WORKDIR/results.jsonl (resumable: a rerun
evaluates only the missing points), results.md, bpb_vs_sparsity.png,
bpb_vs_bits.png and config.json. `compress.py:smoke` is a 14-point grid on 2 batches;
`compress.py:prune` sweeps every pruning method on float weights; `compress.py:quant`
every quantization method and format (`config.extra` adds trained checkpoints, e.g.
QAT exports, as `LABEL=RUN_FOLDER`), plotted per method against bits and model bytes.
Data-aware methods (wanda, sparsegpt, gptq, awq, smoothquant) calibrate on `calib_seqs`
train windows.
Lists are tuples so that flags can override them, e.g.
`--config.grid.quant_recipes="('none', 'int4:g32')"`.
"""

import ml_collections


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """Compression sweep config; `arg` is None (the full grid) or "smoke"."""
  if arg not in (None, "", "smoke", "prune", "quant"):
    raise ValueError(f"compress sweep config arg={arg!r}; valid: None (full grid), 'smoke', "
                     "'prune' (float weights, every pruning method), 'quant' (every "
                     "quantization method and format on the float model)")
  smoke = arg == "smoke"
  c = ml_collections.ConfigDict()
  c.source = ""  # a run folder with checkpoints/ (its config.json's data section is used)

  c.grid = ml_collections.ConfigDict()
  c.grid.prune_methods = ("magnitude", "wanda") if smoke else (
      "magnitude", "magnitude_global", "random", "wanda", "sparsegpt")
  c.grid.sparsities = (0.25, 0.5) if smoke else (0.1, 0.3, 0.5, 0.6, 0.7, 0.8)
  c.grid.nm = ("2:4",) if smoke else ("2:4", "4:8", "1:4")  # N:M targets (kept of every M)
  c.grid.dense = True  # also the unpruned model ("none"), the reference of every plot
  c.grid.quant_recipes = ("none", "int8") if smoke else ("none", "int8", "int4:g64", "int2:g32")
  if arg == "prune":  # bits/byte vs sparsity of every method: docs/sweep_prune.md
    c.grid.prune_methods = ("magnitude", "random", "wanda", "sparsegpt")
    c.grid.sparsities = (0.1, 0.3, 0.5, 0.6, 0.7, 0.8)
    c.grid.quant_recipes = ("none",)

  if arg == "quant":  # bits/byte vs bits and vs bytes per method: docs/sweep_quant.md
    c.grid.prune_methods, c.grid.nm = (), ()
    c.grid.quant_recipes = (
        "none", "int8", "w8a8", "w8a8:smoothquant", "fp8", "fp6", "int4:g128", "int4:g128:asym",
        "int4:g128:gptq", "int4:g128:awq", "int4:g32", "int4:g32:asym", "int4:g32:gptq",
        "int4:g32:awq", "int4:g32:clip=mse", "nf4:g32", "fp4:g32", "int4:g32@first_last",
        "int4:g32:gptq+2:4", "int2:g32", "int2:g32:gptq", "int2:g32:asym:clip=mse")
  # Checkpoints trained elsewhere, evaluated alike: "LABEL=RUN_FOLDER" (e.g. QAT exports).
  c.extra = ()
  c.eval = ml_collections.ConfigDict()
  c.eval.split = "test"
  c.eval.max_batches = 2 if smoke else 16  # 0: the whole split

  c.calib_seqs = 8 if smoke else 64  # calibration windows (train split) for data-aware methods
  c.seed = 0  # the random pruning baseline's key and the calibration windows
  c.lock()
  return c

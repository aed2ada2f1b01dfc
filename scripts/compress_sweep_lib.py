"""The compression sweep: prune -> quantize a checkpoint at every grid point, bits/byte of each.

The grid is (dense + prune methods x sparsities) x quant recipes; a point prunes the
source params with `sparsity.prune`, quantizes the result with `quant.quantize`
(unless its quant recipe is "none") and evaluates it with `eval_lib.evaluate`.
Results go through `sweep_lib.run_grid`, so a killed sweep resumes where it stopped.
"""

from __future__ import annotations

import json
import os
import time

import jax
import numpy as np

import model
import quant
import sparsity
from model.calibration import Calibration
from model.qarray import fmt_name
from scripts import checkpoint_lib, data_lib, eval_lib, prune_lib, quantize_lib, sweep_lib

NONE = "none"  # no pruning / no quantization
KEY_FIELDS = ("prune", "quant")
COLUMNS = ("prune", "quant", "quant_method", "bits", "bpb", "bpb_delta", "param_bytes", "nonzeros",
           "sparsity_achieved")
FORMATS = {"bpb": ".4f", "bpb_delta": "+.4f", "sparsity_achieved": ".4f"}
HEADERS = {"bpb_delta": "vs dense float", "sparsity_achieved": "achieved sparsity (pruned kernels)"}
# The run's settings that change every point's numbers: a resumed sweep must match them.
RESUME_FIELDS = ("source", "data", "eval", "seed", "calib_seqs")


def _unique(values, name: str) -> None:
  dupes = sorted({str(v) for v in values if list(values).count(v) > 1})
  if dupes:
    raise ValueError(f"config.grid.{name}={tuple(values)!r} repeats {dupes}")


def validate(config) -> list[dict]:
  """Checks the config without loading anything; returns the grid's points."""
  if not isinstance(config.source, str) or not config.source:
    raise ValueError(f"config.source={config.source!r} must be a run folder with checkpoints/")
  if not checkpoint_lib.has_checkpoint(config.source):
    raise ValueError(f"config.source={config.source!r} holds no checkpoint "
                     f"(expected {checkpoint_lib.CKPT_SUBDIR}/<step>)")
  g = config.grid
  methods, sparsities = tuple(g.prune_methods), tuple(g.sparsities)
  for m in methods:
    if m not in sparsity.PRUNE_METHODS:
      raise ValueError(f"config.grid.prune_methods: unknown pruning method {m!r}; valid: "
                       f"{sorted(sparsity.PRUNE_METHODS)}")
  if methods and not sparsities:
    raise ValueError(f"config.grid.sparsities=() is empty but prune_methods={methods!r}")
  _unique(methods, "prune_methods")
  _unique(sparsities, "sparsities")
  prunes = [(NONE, NONE, 0.0)] if g.dense else []
  for m in methods:
    for s in sparsities:
      if not isinstance(s, (int, float)) or isinstance(s, bool):
        raise ValueError(f"config.grid.sparsities: {s!r} is not a number in [0, 1)")
      recipe = f"{m}:{float(s):g}"
      try:
        sparsity.parse_recipe(recipe)
      except ValueError as e:
        raise ValueError(f"config.grid.sparsities: {e}") from None
      prunes.append((recipe, m, float(s)))
    for nm in g.nm:
      recipe = f"{m}:{nm}"
      try:
        _, kw = sparsity.parse_recipe(recipe)
      except ValueError as e:
        raise ValueError(f"config.grid.nm: {e}") from None
      if "n" not in kw:
        raise ValueError(f"config.grid.nm: {nm!r} is not N:M (e.g. '2:4')")
      prunes.append((recipe, f"{m} N:M", 1.0 - kw["n"] / kw["m"]))
  if not prunes:
    raise ValueError("config.grid has no prune settings (dense=False and no prune_methods)")
  if not g.quant_recipes:
    raise ValueError("config.grid.quant_recipes=() is empty; use ('none',) for float only")
  try:
    quants = [q if q == NONE else _canonical(q) for q in g.quant_recipes]
  except ValueError as e:
    raise ValueError(f"config.grid.quant_recipes: {e}") from None
  _unique(quants, "quant_recipes (canonical names)")
  if config.eval.split not in data_lib.SPLITS:
    raise ValueError(f"config.eval.split={config.eval.split!r}; valid: {data_lib.SPLITS}")
  mb = config.eval.max_batches
  if not isinstance(mb, int) or isinstance(mb, bool) or mb < 0:
    raise ValueError(f"config.eval.max_batches={mb!r} must be an int >= 0 (0: the whole split)")
  if not isinstance(config.calib_seqs, int) or config.calib_seqs < 1:
    raise ValueError(f"config.calib_seqs={config.calib_seqs!r} must be an int >= 1")
  if not isinstance(config.seed, int):
    raise ValueError(f"config.seed={config.seed!r} must be an int")
  points = [dict(prune=p, method=m, sparsity=s, quant=q) for p, m, s in prunes for q in quants]
  for entry in config.get("extra", ()):
    label, eq, path = str(entry).partition("=")
    if not eq or not label or not checkpoint_lib.has_checkpoint(path):
      raise ValueError(f"config.extra entry {entry!r} must be LABEL=RUN_FOLDER (a folder with "
                       "checkpoints/), e.g. 'qat:int4=runs/qat_int4/quantized'")
    points.append(dict(prune=NONE, method=NONE, sparsity=0.0, quant=label, source=path))
  return points


def _canonical(recipe: str) -> str:
  base, mixed = quant.mixed.split_mixed(recipe)
  return quant.parse_recipe(base).name + (f"@{mixed}" if mixed else "")


def quant_method(recipe: str) -> str:
  """The plotted method of a quant column: rtn / gptq / awq / w8a8 smoothquant / nf4 rtn ...

  An extra checkpoint's label ("qat:int4") is its own method ("qat").
  """
  if recipe == NONE:
    return "float"
  try:
    base, mixed = quant.mixed.split_mixed(recipe)
    spec = quant.parse_recipe(base)
  except ValueError:
    return recipe.split(":")[0]
  name = spec.method + (f"+{spec.sparse[0]}:{spec.sparse[1]}" if spec.sparse else "")
  if spec.act_bits:
    name = f"w8a8 {name}"
  elif spec.fmt != "int":
    name = f"{fmt_name(spec.fmt, spec.bits)} {name}"
  return name + (f"@{mixed}" if mixed else "")


def _check_resume(workdir: str, settings: dict) -> None:
  """A workdir that already holds results must come from the same source, data and eval."""
  path = os.path.join(workdir, "config.json")
  if not (os.path.exists(path) and os.path.exists(os.path.join(workdir, "results.jsonl"))):
    return
  with open(path) as f:
    old = json.load(f)
  new = json.loads(json.dumps(settings))
  diff = [k for k in RESUME_FIELDS if old.get(k) != new[k]]
  if diff:
    raise ValueError(f"--workdir={workdir!r} holds a sweep with different {diff} (was "
                     f"{ {k: old.get(k) for k in diff} }, now { {k: new[k] for k in diff} }); "
                     "use a new --workdir")


def _evaluator(config, params, model_cfg, data, points):
  key = jax.random.key(config.seed)
  calib = None
  if any((p["prune"] != NONE and prune_lib.needs_calibration(p["prune"]))
         or (p["quant"] != NONE and "source" not in p and quantize_lib.needs_calibration(
             *quant.mixed.split_mixed(p["quant"]))) for p in points):
    calib = Calibration(model_cfg, data_lib.calibration_batches(
        data, config.calib_seqs, data.seq_len, seed=config.seed))
  float_bits = np.dtype(model_cfg.param_dtype).itemsize * 8

  def evaluate(point: dict) -> dict:
    t0 = time.perf_counter()
    pruned, achieved = params, 0.0
    if point["prune"] != NONE:
      pruned, report = sparsity.prune(params, point["prune"], key=key, calib=calib,
                                      cfg=model_cfg)
      achieved = report["totals"]["masked_sparsity"]
    final, bits = pruned, float_bits
    if "source" in point:  # a checkpoint trained elsewhere (QAT, MatQuant) evaluated alike
      final = checkpoint_lib.load_params(point["source"])[0]
      bits = _mean_bits(final, float_bits)
    elif point["quant"] != NONE:
      base, rules = quant.mixed.mixed_rules(point["quant"], pruned, model_cfg.n_layers, calib)
      final, _ = quant.quantize(pruned, base, rules=rules, calib=calib)
      bits = _mean_bits(final, float_bits)
    ev = eval_lib.evaluate(model_cfg, final, data, split=config.eval.split,
                           max_batches=config.eval.max_batches or None)
    # Counted on the final (dequantized) weights: low-bit rounding zeroes weights too.
    totals = sparsity.sparsity_report(final)["totals"]
    return dict(bits=bits, quant_method=quant_method(point["quant"]),
                bpb=ev["bpb"], loss=ev["loss"], param_bytes=model.tree_nbytes(final),
                params=totals["params"], nonzeros=totals["nonzeros"],
                sparsity_achieved=achieved, eval_targets=ev["targets"],
                seconds=time.perf_counter() - t0)

  return evaluate


def _mean_bits(params, float_bits: int) -> float:
  """Weight bits per logical weight over the quantized kernels (mixed rule sets average)."""
  leaves = [x for x in jax.tree.leaves(params, is_leaf=quant.is_qarray) if quant.is_qarray(x)]
  if not leaves:
    return float(float_bits)
  return sum(q.bits * q.size for q in leaves) / sum(q.size for q in leaves)


def _report(rows: list[dict], settings: dict, workdir: str) -> dict:
  """results.md and the two PNGs; returns the written paths."""
  dense = next((r["bpb"] for r in rows if r["prune"] == NONE and r["quant"] == NONE), None)
  table_rows = [dict(r, bpb_delta=None if dense is None else r["bpb"] - dense) for r in rows]
  src, ev = settings["source"], settings["eval"]
  table = sweep_lib.markdown_table(table_rows, COLUMNS, formats=FORMATS,
                                   headers=dict(HEADERS, bpb=f"{ev['split']} bits/byte"))
  md = (f"# Compression sweep\n\nsource: `{src['path']}` (step {src['step']}); "
        f"{ev['split']} split, max_batches={ev['max_batches'] or 'all'} "
        f"({int(rows[0]['eval_targets'])} target bytes); bits = weight bits of the "
        "quantized kernels (float: the param dtype's).\n\n" + table)
  files = {"results": os.path.join(workdir, "results.jsonl"),
           "table": os.path.join(workdir, "results.md")}
  with open(files["table"], "w") as f:
    f.write(md)
  refs = {"dense float": dense} if dense is not None else None
  pruned_float = [r for r in rows if r["quant"] == NONE and r["prune"] != NONE]
  if pruned_float:  # absent when quant_recipes lacks "none"
    files["bpb_vs_sparsity"] = sweep_lib.plot(
        pruned_float, x="sparsity", y="bpb", series="method", references=refs,
        path=os.path.join(workdir, "bpb_vs_sparsity.png"), xlabel="sparsity (pruned kernels)",
        ylabel=f"{ev['split']} bits/byte", title="Pruning, float weights")
  if all(r["prune"] == NONE for r in rows):  # a quantization sweep: one line per method
    rows = [dict(r, quant_method=r.get("quant_method") or quant_method(r["quant"]),
                 param_mb=r["param_bytes"] / 2**20) for r in rows]
    files["bpb_vs_bits"] = sweep_lib.plot(
        rows, x="bits", y="bpb", series="quant_method", references=refs, xscale="log2",
        path=os.path.join(workdir, "bpb_vs_bits.png"), xlabel="weight bits (mean over kernels)",
        ylabel=f"{ev['split']} bits/byte", title="Quantization methods")
    files["bpb_vs_bytes"] = sweep_lib.plot(
        rows, x="param_mb", y="bpb", series="quant_method", references=refs,
        path=os.path.join(workdir, "bpb_vs_bytes.png"), xlabel="model bytes (MiB, all params)",
        ylabel=f"{ev['split']} bits/byte", title="Quantization methods: quality vs size")
    return dict(files=files, table=md, dense_bpb=dense)
  files["bpb_vs_bits"] = sweep_lib.plot(
      rows, x="bits", y="bpb", series="prune", style="method", references=refs, xscale="log2",
      path=os.path.join(workdir, "bpb_vs_bits.png"), xlabel="weight bits",
      ylabel=f"{ev['split']} bits/byte", title="Prune -> quantize")
  return dict(files=files, table=md, dense_bpb=dense)


def run(config, workdir: str) -> dict:
  """Runs (or resumes) the sweep of `config` into `workdir`; returns rows, table and paths."""
  points = validate(config)
  out = checkpoint_lib.check_writable_dir(workdir, "--workdir")
  if out == os.path.abspath(config.source):
    raise ValueError(f"--workdir={workdir!r} must differ from config.source (the checkpoint)")
  workdir = out
  data = eval_lib.data_config_for(config.source)
  data_lib.load_split(data, config.eval.split)  # an empty split fails before any compute
  params, model_cfg, step = checkpoint_lib.load_params(config.source)
  if data.seq_len > model_cfg.max_seq_len:
    raise ValueError(f"data.seq_len={data.seq_len} of config.source exceeds the checkpoint's "
                     f"max_seq_len={model_cfg.max_seq_len}")
  settings = {"source": {"path": os.path.abspath(config.source), "step": step},
              "data": data.to_dict(), "eval": config.eval.to_dict(), "seed": config.seed,
              "calib_seqs": config.calib_seqs,
              "config": config.to_dict()}
  _check_resume(workdir, settings)
  os.makedirs(workdir, exist_ok=True)
  with open(os.path.join(workdir, "config.json"), "w") as f:
    json.dump(settings, f, indent=2)
  calls = []
  evaluate = _evaluator(config, params, model_cfg, data, points)
  counted = lambda point: calls.append(point) or evaluate(point)
  rows = sweep_lib.run_grid(points, counted, os.path.join(workdir, "results.jsonl"),
                            key_fields=KEY_FIELDS)
  return dict(rows=rows, evaluated=len(calls), **_report(rows, settings, workdir))

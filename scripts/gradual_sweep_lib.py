"""Large-sparse vs small-dense at equal non-zeros (Zhu & Gupta): one training run per point.

Points are either the base model trained with gradual magnitude pruning to a
sparsity (`sparse_train_lib`, cubic schedule) or a dense model of a smaller width
trained for the same steps; each is evaluated on the test split and counted in
non-zero weights, so bits/byte can be compared at equal non-zeros. Runs live in
WORKDIR/runs/<point> (each resumes), results in WORKDIR/results.jsonl (resumable).
"""

from __future__ import annotations

import copy
import json
import os

import ml_collections

import sparsity
from scripts import checkpoint_lib, eval_lib, sparse_train_lib, sweep_lib, train_lib

KEY_FIELDS = ("kind", "value")
COLUMNS = ("kind", "value", "params", "nonzeros", "bpb", "val_bpb", "sparsity_achieved")
FORMATS = {"bpb": ".4f", "val_bpb": ".4f", "sparsity_achieved": ".4f"}


def points(config) -> list[dict]:
  """Sparse points (kind "gradual", value = sparsity), dense ones (kind "dense", value = width)."""
  out = []
  for s in config.grid.sparsities:
    sparsity.check_sparsity(s, "config.grid.sparsities")
    out.append(dict(kind="gradual", value=float(s)))
  for d in config.grid.dense_widths:
    if not isinstance(d, int) or d < 8 or d % config.grid.heads:
      raise ValueError(f"config.grid.dense_widths: {d!r} must be an int >= 8 divisible by "
                       f"grid.heads={config.grid.heads}")
    out.append(dict(kind="dense", value=int(d)))
  if not out:
    raise ValueError("config.grid has no points (sparsities and dense_widths are empty)")
  return out


def _train_config(config, point: dict):
  c = copy.deepcopy(config.train_config)
  with c.unlocked():
    c.sparsity = sparse_train_lib.default_config("gradual" if point["kind"] == "gradual"
                                                 else "none")
    if point["kind"] == "gradual":
      steps = c.train.steps
      c.sparsity.update(sparsity=point["value"], begin_step=int(config.begin * steps),
                        end_step=int(config.end * steps) // 10 * 10, update_every=10)
    else:
      d = point["value"]
      c.model.update(d_model=d, ffn_dim=config.grid.ffn_ratio * d, n_heads=config.grid.heads,
                     n_kv_heads=max(1, config.grid.heads // 2))
  return c


def _evaluate(config, workdir: str):
  def evaluate(point: dict) -> dict:
    c = _train_config(config, point)
    run_dir = os.path.join(workdir, "runs", f"{point['kind']}_{point['value']:g}")
    res = sparse_train_lib.train(c, run_dir)
    params, cfg, _ = checkpoint_lib.load_params(run_dir)
    ev = eval_lib.evaluate(cfg, params, c.data, split="test",
                           max_batches=config.eval_batches or None)
    rep = sparsity.sparsity_report(params)["totals"]
    masked = sparsity.sparsity_report(params, sparsity.magnitude_masks(params, 0.0))["totals"]
    return dict(params=rep["params"], nonzeros=rep["nonzeros"], bpb=ev["bpb"],
                val_bpb=res.summary["val_bpb"], run=run_dir,
                sparsity_achieved=1 - masked["masked_nonzeros"] / masked["masked_params"])
  return evaluate


def run(config, workdir: str) -> dict:
  """Trains / evaluates every point not yet in WORKDIR/results.jsonl; writes table + PNG."""
  pts = points(config)
  train_lib.validate_config(config.train_config, workdir)
  workdir = checkpoint_lib.check_writable_dir(workdir, "--workdir")
  os.makedirs(workdir, exist_ok=True)
  with open(os.path.join(workdir, "config.json"), "w") as f:
    json.dump(config.to_dict(), f, indent=2)
  rows = sweep_lib.run_grid(pts, _evaluate(config, workdir),
                            os.path.join(workdir, "results.jsonl"), key_fields=KEY_FIELDS)
  label = {"gradual": f"{config.train_config.model.preset} + gradual pruning",
           "dense": "smaller dense"}
  rows_plot = [dict(r, series=label[r["kind"]]) for r in rows]
  png = sweep_lib.plot(rows_plot, x="nonzeros", y="bpb", series="series", xscale="log",
                       path=os.path.join(workdir, "bpb_vs_nonzeros.png"),
                       xlabel="non-zero weights (all params)", ylabel="test bits/byte",
                       title=f"Large-sparse vs small-dense ({config.train_config.train.steps} "
                             "steps each)")
  md = ("# Large-sparse vs small-dense at equal non-zeros\n\n"
        + sweep_lib.markdown_table(rows, COLUMNS, formats=FORMATS) + "\n")
  with open(os.path.join(workdir, "results.md"), "w") as f:
    f.write(md)
  return dict(rows=rows, table=md, files=[png, os.path.join(workdir, "results.md")])


def default_config(smoke: bool = False) -> ml_collections.ConfigDict:
  """The sweep's config; `smoke`: two tiny points of the test preset."""
  c = ml_collections.ConfigDict()
  tc = train_lib.default_config("test" if smoke else "tiny")
  tc.data.update(seq_len=32 if smoke else 128, batch_size=4 if smoke else 16)
  tc.train.update(steps=4 if smoke else 600, eval_every=0, eval_batches=2 if smoke else 16,
                  log_every=50)
  tc.opt.update(lr=3e-3, warmup_steps=2 if smoke else 50)
  tc.ckpt.update(every=4 if smoke else 600, keep=1)
  c.train_config = tc
  c.grid = ml_collections.ConfigDict(dict(
      sparsities=(0.5,) if smoke else (0.5, 0.75, 0.9),
      dense_widths=(32,) if smoke else (48, 64, 96, 128),
      heads=4, ffn_ratio=3))
  c.begin, c.end = 0.1, 0.6  # pruning window as fractions of the training steps
  c.eval_batches = 2 if smoke else 32
  return c

"""Post-training quantization of a checkpoint: load, `quant.quantize`, save with its report."""

from __future__ import annotations

import json
import os

import quant
from scripts import checkpoint_lib, prune_lib

REPORT_FILE = "quant_report.json"


def quantize_checkpoint(workdir: str, out: str, spec, *, step: int | None = None,
                        calib_seqs: int = 128) -> dict:
  """Quantizes the checkpoint in `workdir` (latest step by default) into a checkpoint in `out`.

  `spec` is a recipe string ("int8", "int4:g128", ...), a QuantSpec or a rule list. The
  quantized params go to `out/checkpoints/<step>` (loadable by `checkpoint_lib.load_params`
  and `eval_lib.evaluate_checkpoint`); the report goes to `out/quant_report.json`.
  Returns {"checkpoint", "report_path", "report"}.
  """
  if isinstance(spec, str):
    quant.parse_recipe(spec)  # bad recipes fail before anything is read or written
  out = checkpoint_lib.check_writable_dir(out, "--out", differ_from=workdir)
  params, model_cfg, step = checkpoint_lib.load_params(workdir, step)
  calib = None
  if isinstance(spec, str) and quant.parse_recipe(spec).method == "gptq":
    # Data-aware methods calibrate on train-split windows, as the prune script does.
    calib = prune_lib.calibration(workdir, model_cfg, n_seqs=calib_seqs, seq_len=None,
                                  seed=0, sequential=True)
  qparams, report = quant.quantize(params, spec, calib=calib)
  recipe = report["recipe"]
  report = dict(report, source=os.path.abspath(workdir), source_step=step)
  ckpt = checkpoint_lib.save_params(out, qparams, model_cfg, step=step,
                                    meta={"quant_recipe": recipe, "quant_source": report["source"]})
  report_path = os.path.join(out, REPORT_FILE)
  with open(report_path, "w") as f:
    json.dump(report, f, indent=1)
  return {"checkpoint": ckpt, "report_path": report_path, "report": report}

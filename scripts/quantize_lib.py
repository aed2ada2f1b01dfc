"""Post-training quantization of a checkpoint: load, `quant.quantize`, save with its report."""

from __future__ import annotations

import json
import os

import quant
from scripts import checkpoint_lib, prune_lib

REPORT_FILE = "quant_report.json"


def needs_calibration(spec, mixed: str | None = None) -> bool:
  """Whether a recipe (or rule set) reads calibration data: GPTQ, AWQ, SmoothQuant, sensitivity."""
  if mixed is not None and mixed.startswith("sensitive"):
    return True
  if isinstance(spec, str):
    return quant.parse_recipe(spec).method != "rtn"
  if isinstance(spec, (list, tuple)):
    return any(s is not None and quant.recipes.as_spec(s).method != "rtn" for _, s in spec)
  return spec is not None and spec.method != "rtn"


def quantize_checkpoint(workdir: str, out: str, spec, *, step: int | None = None,
                        calib_seqs: int = 128) -> dict:
  """Quantizes the checkpoint in `workdir` (latest step by default) into a checkpoint in `out`.

  `spec` is a recipe string ("int8", "int4:g128:gptq", "w8a8:smoothquant", "int4:g128:awq",
  "int4:g128:gptq+2:4", "int4:g128@first_last", ...), a QuantSpec or a rule list. The
  quantized params go to `out/checkpoints/<step>` (loadable by `checkpoint_lib.load_params`
  and `eval_lib.evaluate_checkpoint`); the report goes to `out/quant_report.json`.
  Returns {"checkpoint", "report_path", "report"}.
  """
  mixed = None
  if isinstance(spec, str):
    # Bad recipes fail before anything is read or written.
    spec, mixed = quant.mixed.split_mixed(spec)
  out = prune_lib.check_out(out, workdir)
  params, model_cfg, step = checkpoint_lib.load_params(workdir, step)
  calib = None
  if needs_calibration(spec, mixed):
    # Data-aware methods calibrate on train-split windows, as the prune script does.
    calib = prune_lib.calibration(workdir, model_cfg, n_seqs=calib_seqs, seq_len=None,
                                  seed=0, sequential=True)
  rules = []
  if mixed is not None:
    spec, rules = quant.mixed.mixed_rules(f"{spec}@{mixed}", params, model_cfg.n_layers, calib)
  qparams, report = quant.quantize(params, spec, rules=rules, calib=calib)
  recipe = report["recipe"]
  report = dict(report, source=os.path.abspath(workdir), source_step=step)
  ckpt = checkpoint_lib.save_params(out, qparams, model_cfg, step=step,
                                    meta={"quant_recipe": recipe, "quant_source": report["source"]})
  report["disk_bytes"] = _disk_bytes(ckpt)
  report_path = os.path.join(out, REPORT_FILE)
  with open(report_path, "w") as f:
    json.dump(report, f, indent=1)
  return {"checkpoint": ckpt, "report_path": report_path, "report": report}


def _disk_bytes(path: str) -> int:
  """Bytes of every file under a checkpoint folder (what the quantized model costs on disk)."""
  return sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(path) for f in fs)

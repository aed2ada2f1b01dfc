"""Post-training quantization of a checkpoint: load, `quant.quantize`, save with its report."""

from __future__ import annotations

import json
import os

import quant
from scripts import checkpoint_lib

REPORT_FILE = "quant_report.json"


def check_out_dir(out: str, src: str) -> str:
  """Raises ValueError unless `out` is a creatable / writable folder other than `src`."""
  if not out:
    raise ValueError("--out must be a folder path (got an empty string)")
  path = os.path.abspath(out)
  if path == os.path.abspath(src):
    raise ValueError(f"--out={out!r} must differ from --workdir (the float checkpoint's folder)")
  if os.path.exists(path) and not os.path.isdir(path):
    raise ValueError(f"--out={out!r} exists and is not a folder")
  probe = path
  while not os.path.exists(probe):
    probe = os.path.dirname(probe)
  if not os.access(probe, os.W_OK | os.X_OK):
    raise ValueError(f"--out={out!r} is not writable ({probe!r} denies writes)")
  return path


def quantize_checkpoint(workdir: str, out: str, spec, *, step: int | None = None) -> dict:
  """Quantizes the checkpoint in `workdir` (latest step by default) into a checkpoint in `out`.

  `spec` is a recipe string ("int8", "int4:g128", ...), a QuantSpec or a rule list. The
  quantized params go to `out/checkpoints/<step>` (loadable by `checkpoint_lib.load_params`
  and `eval_lib.evaluate_checkpoint`); the report goes to `out/quant_report.json`.
  Returns {"checkpoint", "report_path", "report"}.
  """
  if isinstance(spec, str):
    quant.parse_recipe(spec)  # bad recipes fail before anything is read or written
  out = check_out_dir(out, workdir)
  params, model_cfg, step = checkpoint_lib.load_params(workdir, step)
  qparams, report = quant.quantize(params, spec)
  recipe = report["recipe"]
  report = dict(report, source=os.path.abspath(workdir), source_step=step)
  ckpt = checkpoint_lib.save_params(out, qparams, model_cfg, step=step,
                                    meta={"quant_recipe": recipe, "quant_source": report["source"]})
  report_path = os.path.join(out, REPORT_FILE)
  with open(report_path, "w") as f:
    json.dump(report, f, indent=1)
  return {"checkpoint": ckpt, "report_path": report_path, "report": report}

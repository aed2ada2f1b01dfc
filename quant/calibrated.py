"""Data-aware PTQ of a whole model: GPTQ kernel by kernel, calibrated block by block.

`quant.quantize(params, "int4:g128:gptq", calib=Calibration(cfg, batches))` lands
here for every leaf whose spec has method "gptq": the decoder blocks are
calibrated in order on the outputs of the already-quantized blocks (as the
official GPTQ code does; `calib.sequential=False`: one pass over the float
model), each kernel is quantized by `quant.gptq_layer` from its Hessian
`2 X^T X / n`, and kernels outside the blocks are calibrated afterwards.
"""

from __future__ import annotations

from collections.abc import Mapping

from model import calibration as calib_lib
from model.qarray import QArray
from model.tree import get_path, is_weight_leaf, replace_path
from quant.gptq import gptq_layer
from quant.recipes import QuantSpec


def _gptq(kernel, stats: calib_lib.KernelStats, spec: QuantSpec, path: str) -> QArray:
  if is_weight_leaf(kernel):
    raise ValueError(f"gptq on {path}: the leaf is already {type(kernel).__name__}; GPTQ "
                     "needs a float kernel")
  try:
    return gptq_layer(kernel, stats.hessian(), bits=spec.bits, group_size=spec.group_size,
                      sym=spec.symmetric)
  except ValueError as e:
    raise ValueError(f"gptq on {path}: {e}") from None


def gptq_quantize(params, specs: Mapping[str, QuantSpec], calib) -> dict[str, QArray]:
  """{path: QArray} for every path in `specs` (all GPTQ specs), calibrated as described above."""
  calib = calib_lib.check_calibration(calib, what="GPTQ")
  out: dict[str, QArray] = {}
  in_blocks = [p for p in specs if p.startswith("layers_")]
  others = [p for p in specs if not p.startswith("layers_")]

  def quantize_paths(tree, stats, paths, prefix=""):
    calib_lib.check_stats(stats, paths, hessian=True)
    for p in paths:
      local = p[len(prefix):]
      out[p] = _gptq(get_path(tree, local), stats[p], specs[p], p)
      tree = replace_path(tree, local, out[p])
    return tree

  if calib.sequential:
    def update(layer, block, stats):
      prefix = f"layers_{layer}/"
      return quantize_paths(block, stats, [p for p in in_blocks if p.startswith(prefix)],
                            prefix)
    params = calib_lib.calibrate_sequential(calib.cfg, params, calib.batches, update,
                                            paths=list(specs))
    if others:
      stats = calib_lib.calibrate(calib.cfg, params, calib.batches, paths=others)
      quantize_paths(params, stats, others)
  else:
    stats = calib_lib.calibrate(calib.cfg, params, calib.batches, paths=list(specs))
    quantize_paths(params, stats, list(specs))
  return out

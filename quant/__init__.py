"""Quantization: QArray leaves (defined in `model.qarray`), formats, PTQ and QAT transforms."""

from model.checkpoint import from_state_dict, qarray_manifest, to_state_dict
from model.qarray import QArray, codes, dequantize, is_qarray, pack, unpack
from quant.awq import awq_layer
from quant.checkpoint import restore, save
from quant.gptq import gptq_layer
from quant.recipes import FORMATS, QuantSpec, default_rules, parse_recipe
from quant.rtn import quantize_tensor
from quant.transform import abstract_quantize, format_report, plan, quantize

__all__ = [
    "FORMATS", "QArray", "QuantSpec", "abstract_quantize", "awq_layer", "codes", "default_rules",
    "dequantize", "format_report", "from_state_dict", "gptq_layer", "is_qarray", "pack",
    "parse_recipe", "plan", "qarray_manifest", "quantize", "quantize_tensor", "restore", "save",
    "to_state_dict", "unpack",
]

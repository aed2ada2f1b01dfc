"""Quantization: QArray leaves (defined in `model.qarray`), formats, PTQ and QAT transforms."""

from model.checkpoint import from_state_dict, qarray_manifest, to_state_dict
from model.qarray import QArray, codes, dequantize, is_qarray, pack, unpack
from quant import mixed, smooth
from quant.awq import awq_layer
from quant.checkpoint import restore, save
from quant.gptq import gptq_layer, gptq_nm_layer
from quant.mixed import mostly_low_bit_rules, sensitivity
from quant.recipes import FORMATS, QuantSpec, default_rules, parse_recipe
from quant.rtn import quantize_tensor
from quant.transform import abstract_quantize, format_report, plan, quantize

__all__ = [
    "FORMATS", "QArray", "QuantSpec", "abstract_quantize", "awq_layer", "codes", "default_rules",
    "dequantize", "format_report", "from_state_dict", "gptq_layer", "gptq_nm_layer", "is_qarray",
    "mixed", "mostly_low_bit_rules", "pack", "parse_recipe", "plan", "qarray_manifest",
    "quantize", "quantize_tensor", "restore", "save", "sensitivity", "smooth", "to_state_dict",
    "unpack",
]

"""Quantization: QArray leaves, formats, PTQ and QAT transforms."""

from quant.checkpoint import from_state_dict, qarray_metadata, restore, save, to_state_dict
from quant.qarray import QArray, codes, dequantize, is_qarray, pack, unpack
from quant.recipes import FORMATS, QuantSpec, default_rules, parse_recipe
from quant.rtn import quantize_tensor
from quant.transform import abstract_quantize, format_report, param_bytes, plan, quantize

__all__ = [
    "FORMATS", "QArray", "QuantSpec", "abstract_quantize", "codes", "default_rules", "dequantize",
    "format_report", "from_state_dict", "is_qarray", "pack", "param_bytes",
    "parse_recipe", "plan", "qarray_metadata", "quantize", "quantize_tensor", "restore", "save",
    "to_state_dict", "unpack",
]

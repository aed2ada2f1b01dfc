"""Quantization: QArray leaves (defined in `model.qarray`), formats, PTQ and QAT transforms."""

from model.checkpoint import from_state_dict, qarray_manifest, to_state_dict
from model.qarray import QArray, codes, dequantize, is_qarray, pack, unpack
from quant import mixed, smooth
from quant.awq import awq_layer
from quant.checkpoint import restore, save
from quant.cost import bit_ops
from quant.gptq import gptq_layer, gptq_nm_layer
from quant.matryoshka import matryoshka_quantize, slice_codes
from quant.matryoshka import quantize_kernel as matryoshka_kernel
from quant.mixed import mostly_low_bit_rules, sensitivity
from quant.qat import (
    act_quant_interceptor,
    act_ranges,
    fake_quant,
    fake_quant_params,
    first_last_rules,
    qat_plan,
    straight_through,
)
from quant.recipes import FORMATS, QuantSpec, default_rules, parse_recipe
from quant.rtn import quantize_tensor
from quant.transform import abstract_quantize, format_report, plan, quantize

__all__ = [
    "FORMATS", "QArray", "QuantSpec", "abstract_quantize", "act_quant_interceptor", "act_ranges",
    "awq_layer", "bit_ops", "codes", "default_rules", "dequantize", "fake_quant",
    "fake_quant_params", "first_last_rules", "format_report", "from_state_dict", "gptq_layer",
    "gptq_nm_layer", "is_qarray", "matryoshka_kernel", "matryoshka_quantize", "mixed",
    "mostly_low_bit_rules", "pack", "parse_recipe", "plan", "qarray_manifest", "qat_plan",
    "quantize", "quantize_tensor", "restore", "save", "sensitivity", "slice_codes", "smooth",
    "straight_through", "to_state_dict", "unpack",
]

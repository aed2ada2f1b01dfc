"""Quantization: QArray leaves, formats, PTQ and QAT transforms."""

from quant.qarray import QArray, codes, dequantize, is_qarray, pack, unpack

__all__ = ["QArray", "codes", "dequantize", "is_qarray", "pack", "unpack"]

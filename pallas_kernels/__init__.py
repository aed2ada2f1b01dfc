"""sparq Pallas kernels, each with a pure-jnp reference of the same signature.

Public entry points (`api`): `block_sparse_attention` (flash attention over a
`model.BlockLayout`'s active blocks, forward and backward) and `lowbit_matmul` (int8 / int4
weight-only and W8A8), with `block_sparse_attention_reference` / `lowbit_matmul_reference`;
`plan` says which kernel (TPU Mosaic, GPU Triton, interpreted, or the XLA fallback) a call
runs. This package imports no other sparq package.
"""

from pallas_kernels.api import (
    block_sparse_attention,
    block_sparse_attention_reference,
    lowbit_matmul,
    lowbit_matmul_reference,
    plan,
)
from pallas_kernels.block_sparse import Mask
from pallas_kernels.lowbit import w8a8_matmul, w8a8_reference

__all__ = ["Mask", "block_sparse_attention", "block_sparse_attention_reference",
           "lowbit_matmul", "lowbit_matmul_reference", "plan", "w8a8_matmul", "w8a8_reference"]

"""N:M export: prune 2:4 -> compress -> int4 composes, model.apply consumes it, bytes honest."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import model
import quant
import sparsity
from model import nm_array

CFG = model.get_preset("test")
_apply = jax.jit(lambda params, tokens: model.apply(CFG, params, tokens)[0])


def test_two_four_compress_then_int4(params):
  pruned, _ = sparsity.prune(params, "magnitude:2:4")
  packed, report = sparsity.compress(pruned, n=2, m=4)
  assert report["n_compressed"] == 7 * CFG.n_layers
  k = packed["layers_0"]["mlp"]["up"]["kernel"]
  assert nm_array.is_nmarray(k) and k.shape == (CFG.d_model, CFG.ffn_dim)
  kernel_bytes = sum(v["bytes_before"] for v in report["layers"].values())
  after = sum(v["bytes_after"] for v in report["layers"].values())
  assert after == pytest.approx(kernel_bytes * (0.5 + 1 / 32))  # f32 values + 2-bit indices
  tokens = jnp.arange(12)[None] % CFG.vocab_size
  np.testing.assert_allclose(_apply(packed, tokens), _apply(pruned, tokens), atol=1e-5)

  q, qrep = quant.quantize(packed, "int4")
  qk = q["layers_0"]["mlp"]["up"]["kernel"]
  assert nm_array.is_nmarray(qk) and quant.is_qarray(qk.values)
  assert qrep["quantized_bytes_after"] < qrep["quantized_bytes_before"] / 4
  dense = jax.tree.map(lambda x: nm_array.decompress(x) if nm_array.is_nmarray(x) else x, q,
                       is_leaf=model.is_weight_leaf)
  np.testing.assert_allclose(_apply(q, tokens), _apply(dense, tokens), atol=1e-5)
  rep = sparsity.sparsity_report(q)
  assert rep["layers"]["layers_0/mlp/up/kernel"]["sparsity"] >= 0.5
  assert qrep["n_quantized"] == report["n_compressed"]


def test_compress_rejects_what_is_not_nm(params):
  with pytest.raises(ValueError, match="layers_0/attn/k/kernel: .*not 2:4 sparse"):
    sparsity.compress(params, n=2, m=4)
  pruned, _ = sparsity.prune(params, "magnitude:2:4")
  with pytest.raises(ValueError, match="N=3 must be <= M=2"):
    sparsity.compress(pruned, n=3, m=2)
  q, _ = quant.quantize(pruned, "int8")
  with pytest.raises(ValueError, match="already QArray"):
    sparsity.compress(q, n=2, m=4)
  packed, _ = sparsity.compress(pruned, n=2, m=4)
  with pytest.raises(ValueError, match="already quantized or N:M compressed"):
    sparsity.prune(packed, "magnitude:0.5")

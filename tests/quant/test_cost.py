"""The AQT bit-ops cost model against a hand count on the "test" preset."""

import jax
import pytest

import model
import quant
from quant import cost

CFG = model.get_preset("test")  # d 64, 2 layers, 4 heads / 2 kv of 16, ffn 128, vocab 259, tied


@pytest.fixture(scope="module")
def p():
  return model.init(CFG, jax.random.key(0))


# Per token and layer: q 64x64, k 64x32, v 64x32, o 64x64, gate / up 64x128, down 128x64.
LAYER = 64 * 64 + 64 * 32 + 64 * 32 + 64 * 64 + 64 * 128 + 64 * 128 + 128 * 64
HEAD = 64 * 259


def _attn(tokens, context):  # q.k and p.v: sum over queries of keys seen, x 4 heads x 16
  keys = sum(context + i + 1 for i in range(tokens))
  return 2 * 2 * keys * 4 * 16  # 2 layers x (scores + pv)


def test_float_hand_count(p):
  r = cost.bit_ops(CFG, p, tokens=3)
  assert r["kernels"]["layers_1/mlp/down/kernel"] == dict(mults=3 * 128 * 64, w_bits=32,
                                                          a_bits=32, bit_ops=3 * 8192 * 1024)
  assert r["kernel_bit_ops"] == 3 * (2 * LAYER + HEAD) * 32 * 32
  assert r["attention_bit_ops"] == _attn(3, 0) * 32 * 32
  assert r["total_mults"] == 3 * (2 * LAYER + HEAD) + _attn(3, 0)
  assert r["total_bit_ops"] == r["kernel_bit_ops"] + r["attention_bit_ops"]


def test_quantized_hand_count(p):
  q4, _ = quant.quantize(p, "int4")
  r = cost.bit_ops(CFG, q4, tokens=2, context=5, act_bits=8)
  assert r["kernel_bit_ops"] == 2 * (2 * LAYER * 4 * 8 + HEAD * 32 * 32)
  assert r["attention_bit_ops"] == _attn(2, 5) * 32 * 32
  w8a8, _ = quant.quantize(p, "w8a8")
  r = cost.bit_ops(CFG, w8a8)  # W8A8 leaves carry act_bits=8 themselves
  assert r["kernel_bit_ops"] == 2 * LAYER * 8 * 8 + HEAD * 32 * 32
  assert cost.bit_ops(CFG, q4)["kernel_bit_ops"] == 2 * LAYER * 4 * 32 + HEAD * 32 * 32


def test_bad_inputs(p):
  for kw, match in [(dict(tokens=0), "tokens=0; valid: an int >= 1"),
                    (dict(context=-1), "context=-1; valid: an int >= 0"),
                    (dict(act_bits=1), "act_bits=1; valid: None or an int in 2..32")]:
    with pytest.raises(ValueError, match=match):
      cost.bit_ops(CFG, p, **kw)

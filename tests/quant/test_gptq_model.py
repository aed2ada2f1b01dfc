"""quant.quantize with GPTQ specs: calibrated block by block, beats RTN on the model's outputs."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import model
import quant
from model.calibration import Calibration

CFG = model.get_preset("test")


@pytest.fixture(scope="module")
def setup():
  params = model.init(CFG, jax.random.key(0))
  toks = jax.random.randint(jax.random.key(1), (4, 32), 0, CFG.vocab_size)
  return params, Calibration(CFG, [toks[:2], toks[2:]]), toks


def _err(params, q, toks):
  ref = model.apply(CFG, params, toks)[0]
  return float(jnp.linalg.norm(model.apply(CFG, q, toks)[0] - ref) / jnp.linalg.norm(ref))


@pytest.mark.parametrize("recipe", ["int4:g16:gptq", "int4:gptq:asym"])
def test_gptq_recipe_beats_rtn_on_the_logits(setup, recipe):
  params, calib, toks = setup
  q, report = quant.quantize(params, recipe, calib=calib)
  assert report["method"] == "gptq" and report["n_quantized"] == 7 * CFG.n_layers
  k = q["layers_1"]["mlp"]["down"]["kernel"]
  assert quant.is_qarray(k) and k.bits == 4
  rtn, _ = quant.quantize(params, recipe.replace(":gptq", ""))
  assert _err(params, q, toks) < _err(params, rtn, toks)
  one, _ = quant.quantize(params, recipe, calib=calib.__class__(CFG, calib.batches,
                                                                sequential=False))
  np.testing.assert_array_equal(one["layers_0"]["attn"]["q"]["kernel"].values,
                                q["layers_0"]["attn"]["q"]["kernel"].values)


def test_gptq_needs_calibration(setup):
  params, _, _ = setup
  with pytest.raises(ValueError, match="GPTQ needs calib="):
    quant.quantize(params, "int4:gptq")
  assert quant.parse_recipe("int4:g128:gptq").name == "int4:g128:gptq"

"""SPARQ_PALLAS_INTERPRET, the low-bit entry point's CPU fallback, and an int8 model forward."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental.pallas import tpu as pltpu

import model
import pallas_kernels
from model.qarray import QArray
from pallas_kernels import api
from tests.pallas_kernels.jaxpr_util import count_pallas_calls, pallas_calls_in


@pytest.fixture(autouse=True)
def _no_env(monkeypatch):
  monkeypatch.delenv(api.ENV_INTERPRET, raising=False)
  yield
  pltpu.reset_tpu_interpret_mode_state()


@pytest.mark.parametrize("value,expected", [
    ("1", True), ("true", True), ("0", False), ("", False), ("tpu", pltpu.InterpretParams())])
def test_env_var_requests_interpret(monkeypatch, value, expected):
  monkeypatch.setenv(api.ENV_INTERPRET, value)
  assert api.env_interpret() == expected


def test_bad_env_var(monkeypatch):
  monkeypatch.setenv(api.ENV_INTERPRET, "maybe")
  with pytest.raises(ValueError, match="SPARQ_PALLAS_INTERPRET='maybe'"):
    api.env_interpret()


def test_lowbit_on_cpu_runs_reference_unless_interpreting():
  if jax.default_backend() != "cpu":
    pytest.skip("CPU fallback")
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=(1, 40)), jnp.float32)
  w = jnp.asarray(rng.integers(-128, 128, size=(40, 24)), jnp.int8)
  s = jnp.asarray(rng.uniform(0.01, 0.1, size=(1, 24)), jnp.float32)
  call = lambda **kw: (lambda *a: pallas_kernels.lowbit_matmul(*a, bits=8, group_size=None,
                                                               **kw))
  assert pallas_calls_in(call(), x, w, s) == 0
  ref = pallas_kernels.lowbit_matmul_reference(x, w, s, bits=8, group_size=None)
  np.testing.assert_array_equal(call()(x, w, s), ref)
  assert pallas_calls_in(call(interpret=True), x, w, s) == 1
  np.testing.assert_allclose(call(interpret=True)(x, w, s), ref, rtol=1e-5, atol=1e-5)
  with pytest.raises(ValueError, match="impl='fast'"):
    call(impl="fast")(x, w, s)


def quantize_per_channel(w_KN):
  """Symmetric int8 with one scale per output column (independent of quant/)."""
  w = np.asarray(w_KN, np.float32)
  scale = np.maximum(np.abs(w).max(axis=0, keepdims=True), 1e-12) / 127.0
  codes = np.clip(np.round(w / scale), -127, 127).astype(np.int8)
  return QArray(values=jnp.asarray(codes), scale=jnp.asarray(scale), shape=w.shape, bits=8,
                fmt="int", dtype=jnp.float32)


def test_model_int8_pallas_interpret_matches_xla(monkeypatch):
  # Untied: the lm_head (N=259, not a multiple of anything) goes through the kernel too.
  cfg = model.get_preset("test").replace(tie_embeddings=False, n_layers=1)
  params = jax.tree_util.tree_map_with_path(
      lambda p, l: quantize_per_channel(l) if "kernel" in jax.tree_util.keystr(p) else l,
      model.init(cfg, jax.random.key(0)))
  n_kernels = sum(isinstance(l, QArray) for l in jax.tree.leaves(
      params, is_leaf=lambda l: isinstance(l, QArray)))
  assert n_kernels == 7 * cfg.n_layers + 1
  tokens = jax.random.randint(jax.random.key(1), (2, 7), 0, cfg.vocab_size)
  monkeypatch.setenv(api.ENV_INTERPRET, "1")

  def traced(impl):
    c = cfg.replace(matmul_impl=impl)
    return jax.jit(lambda p, t: model.apply(c, p, t)[0]).trace(params, tokens)

  pallas, xla = traced("pallas"), traced("xla")
  assert count_pallas_calls(pallas.jaxpr) == n_kernels
  assert count_pallas_calls(xla.jaxpr) == 0
  got = pallas.lower().compile()(params, tokens)
  want = xla.lower().compile()(params, tokens)
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)

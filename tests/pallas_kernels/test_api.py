"""Backend picker and the model's impl="pallas" path end to end."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental.pallas import tpu as pltpu

import model
from model.qarray import QArray
from pallas_kernels import api
from pallas_kernels import int8_matmul as k


@pytest.fixture(autouse=True)
def _no_env(monkeypatch):
  monkeypatch.delenv(api.ENV_INTERPRET, raising=False)


@pytest.mark.parametrize("backend,impl,interpret,expected", [
    ("cpu", None, None, ("reference", None)),
    ("cpu", None, False, ("reference", None)),
    ("cpu", None, True, ("pallas", True)),
    ("cpu", "pallas", None, ("pallas", True)),
    ("cpu", "reference", True, ("reference", None)),
    ("gpu", None, None, ("reference", None)),
    ("gpu", None, True, ("pallas", True)),
    ("tpu", None, None, ("pallas", False)),
    ("tpu", "reference", None, ("reference", None)),
])
def test_pick_impl(backend, impl, interpret, expected):
  assert api.pick_impl(impl, interpret, backend) == expected


@pytest.mark.parametrize("value,expected", [
    ("1", True), ("true", True), ("0", False), ("", False), ("tpu", pltpu.InterpretParams())])
def test_env_var_requests_interpret(monkeypatch, value, expected):
  monkeypatch.setenv(api.ENV_INTERPRET, value)
  assert api.env_interpret() == expected
  impl = "pallas" if expected else "reference"
  assert api.pick_impl(backend="cpu") == (impl, expected if expected else None)
  # An explicit argument wins over the environment.
  assert api.pick_impl(interpret=False, backend="cpu") == ("reference", None)


@pytest.mark.parametrize("kwargs,match", [
    (dict(impl="triton"), "impl='triton'"),
    (dict(interpret="yes"), "interpret='yes'"),
    (dict(impl="pallas", backend="gpu"), "no compiled kernel for backend 'gpu'"),
])
def test_pick_impl_bad_input(kwargs, match):
  with pytest.raises(ValueError, match=match):
    api.pick_impl(**kwargs)


def test_bad_env_var(monkeypatch):
  monkeypatch.setenv(api.ENV_INTERPRET, "maybe")
  with pytest.raises(ValueError, match="SPARQ_PALLAS_INTERPRET='maybe'"):
    api.pick_impl(backend="cpu")


def _count_pallas_calls(jaxpr) -> int:
  """pallas_call equations executed by a (closed) jaxpr, counting inside nested calls."""
  jaxpr = getattr(jaxpr, "jaxpr", jaxpr)
  n = 0
  for eqn in jaxpr.eqns:
    n += eqn.primitive.name == "pallas_call"
    for v in eqn.params.values():
      for sub in v if isinstance(v, (tuple, list)) else (v,):
        if hasattr(sub, "eqns") or hasattr(getattr(sub, "jaxpr", None), "eqns"):
          n += _count_pallas_calls(sub)
  return n


def _pallas_calls_in(fn, *args) -> int:
  return _count_pallas_calls(jax.make_jaxpr(fn)(*args))


def test_api_on_cpu_runs_reference_unless_interpret_requested(monkeypatch):
  if jax.default_backend() != "cpu":
    pytest.skip("CPU picker behaviour")
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=(1, 40)), jnp.float32)
  w = jnp.asarray(rng.integers(-128, 128, size=(40, 24)), jnp.int8)
  s = jnp.asarray(rng.uniform(0.01, 0.1, size=(1, 24)), jnp.float32)
  assert _pallas_calls_in(lambda *a: api.int8_matmul(*a), x, w, s) == 0
  np.testing.assert_array_equal(api.int8_matmul(x, w, s), k.reference(x, w, s))
  monkeypatch.setenv(api.ENV_INTERPRET, "1")
  assert _pallas_calls_in(lambda *a: api.int8_matmul(*a, bk=16, bn=16), x, w, s) == 1
  out = api.int8_matmul(x, w, s, bk=16, bn=16)
  np.testing.assert_allclose(out, k.reference(x, w, s), rtol=1e-5, atol=1e-5)


def quantize_per_channel(w_KN):
  """Symmetric int8 with one scale per output column (independent of quant/)."""
  w = np.asarray(w_KN, np.float32)
  scale = np.maximum(np.abs(w).max(axis=0, keepdims=True), 1e-12) / 127.0
  codes = np.clip(np.round(w / scale), -127, 127).astype(np.int8)
  return QArray(values=jnp.asarray(codes), scale=jnp.asarray(scale), shape=w.shape, bits=8,
                fmt="int", dtype=jnp.float32)


def quantize_kernels(params):
  def q(path, leaf):
    name = jax.tree_util.keystr(path)
    return quantize_per_channel(leaf) if "kernel" in name and leaf.ndim == 2 else leaf
  return jax.tree_util.tree_map_with_path(q, params)


def test_model_pallas_interpret_matches_xla(monkeypatch):
  # Untied: the lm_head (N=259, not a multiple of anything) goes through the kernel too.
  # One layer keeps the two compiles small.
  cfg = model.get_preset("test").replace(tie_embeddings=False, n_layers=1)
  params = quantize_kernels(model.init(cfg, jax.random.key(0)))
  n_kernels = sum(isinstance(l, QArray) for l in jax.tree.leaves(
      params, is_leaf=lambda l: isinstance(l, QArray)))
  assert n_kernels == 7 * cfg.n_layers + 1
  tokens = jax.random.randint(jax.random.key(1), (2, 7), 0, cfg.vocab_size)
  monkeypatch.setenv(api.ENV_INTERPRET, "1")

  def traced(impl):
    c = cfg.replace(matmul_impl=impl)
    return jax.jit(lambda p, t: model.apply(c, p, t)[0]).trace(params, tokens)

  pallas, xla = traced("pallas"), traced("xla")
  assert _count_pallas_calls(pallas.jaxpr) == n_kernels
  assert _count_pallas_calls(xla.jaxpr) == 0
  got = pallas.lower().compile()(params, tokens)
  want = xla.lower().compile()(params, tokens)
  assert np.isfinite(np.asarray(got)).all()
  # Same f32 math, different summation order: logits are O(1).
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)

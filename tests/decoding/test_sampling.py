"""Sampler filters against NumPy oracles, and sampling frequencies against process_logits."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from decoding import Sampler, process_logits, sample

V = 12
LOGITS = np.random.RandomState(0).randn(6, V).astype(np.float32) * 2.0
_process = jax.jit(process_logits)
_sample = jax.jit(sample)


def _kept(s, logits=LOGITS, seen=None):
  out = np.asarray(_process(jnp.asarray(logits), s, None if seen is None else jnp.asarray(seen)))
  return np.isfinite(out), out


def _softmax(x):
  e = np.exp(x - x.max(-1, keepdims=True))
  return e / e.sum(-1, keepdims=True)


def test_top_k_keeps_the_k_largest():
  ks = [1, 2, 3, 5, 0, 12]
  kept, _ = _kept(Sampler.create(6, temperature=1.0, top_k=ks))
  for row, k in enumerate(ks):
    want = np.zeros(V, bool)
    want[np.argsort(-LOGITS[row])[: k or V]] = True
    np.testing.assert_array_equal(kept[row], want)


def test_top_p_keeps_smallest_prefix_with_mass_at_least_p():
  ps = [0.05, 0.3, 0.5, 0.8, 0.95, 1.0]
  kept, _ = _kept(Sampler.create(6, temperature=1.0, top_p=ps))
  probs = _softmax(LOGITS)
  for row, p in enumerate(ps):
    order = np.argsort(-probs[row])
    m = int(np.searchsorted(np.cumsum(probs[row, order]), p - 1e-6)) + 1  # smallest m: mass >= p
    want = np.zeros(V, bool)
    want[order[:m]] = True
    np.testing.assert_array_equal(kept[row], want)
    assert probs[row, kept[row]].sum() >= p - 1e-6


def test_min_p_on_probabilities_after_temperature():
  mins, temps = [0.0, 0.05, 0.2, 0.5, 0.9, 1.0], [1.0, 0.5, 1.0, 2.0, 1.0, 0.7]
  kept, out = _kept(Sampler.create(6, temperature=temps, min_p=mins))
  for row, (mp, t) in enumerate(zip(mins, temps)):
    probs = _softmax(LOGITS[row] / t)
    np.testing.assert_array_equal(kept[row], probs >= mp * probs.max())
    np.testing.assert_allclose(out[row, kept[row]], LOGITS[row, kept[row]] / t, rtol=1e-5)


def test_order_penalty_temperature_top_k_then_top_p():
  seen = np.zeros((6, V), bool)
  seen[:, :4] = True
  s = Sampler.create(6, temperature=0.8, top_k=4, top_p=0.7, repetition_penalty=1.5)
  kept, _ = _kept(s, seen=seen)
  for row in range(6):
    x = LOGITS[row].copy()
    x[:4] = np.where(x[:4] > 0, x[:4] / 1.5, x[:4] * 1.5)
    x = x / 0.8
    order = np.argsort(-x)[:4]
    p = _softmax(x[order])  # top-p sees the top-k distribution renormalised
    m = int(np.searchsorted(np.cumsum(p), 0.7 - 1e-6)) + 1
    want = np.zeros(V, bool)
    want[order[:m]] = True
    np.testing.assert_array_equal(kept[row], want)


def test_greedy_rows_take_the_argmax_in_a_mixed_batch():
  s = Sampler.create(6, temperature=[0, 1, 0, 2, 0, 1], top_k=[0, 0, 3, 0, 0, 0])
  keys = jax.random.split(jax.random.key(0), 6)
  for i in range(3):
    tok = np.asarray(_sample(jnp.asarray(LOGITS), s, jax.random.split(keys[i], 6), None))
    np.testing.assert_array_equal(tok[::2], LOGITS[::2].argmax(-1))
  kept, _ = _kept(s)
  assert (kept[::2].sum(-1) == 1).all()


def test_sampled_frequencies_match_processed_distribution():
  """Many draws per row: top-k never leaves the top k, frequencies match softmax(processed)."""
  s = Sampler.create(6, temperature=[1.0, 0.7, 1.5, 1.0, 1.0, 1.0], top_k=[3, 0, 5, 0, 0, 2],
                     top_p=[1, 0.8, 1, 1, 0.6, 1], min_p=[0, 0, 0, 0.1, 0, 0])
  n = 5000
  keys = jax.random.split(jax.random.key(1), n)
  draw = jax.jit(jax.vmap(lambda k: sample(jnp.asarray(LOGITS), s, jax.random.split(k, 6))))
  toks = np.asarray(draw(keys))  # [n, 6]
  kept, out = _kept(s)
  want = _softmax(out)
  for row in range(6):
    assert kept[row, toks[:, row]].all()
    freq = np.bincount(toks[:, row], minlength=V) / n
    np.testing.assert_allclose(freq, want[row], atol=4 * np.sqrt(0.25 / n))
  assert set(np.unique(toks[:, 0])) == set(np.argsort(-LOGITS[0])[:3])


@pytest.mark.parametrize("kw, match", [
    (dict(temperature=-0.1), r"temperature=-0.1 is outside the valid range \[0, inf\)"),
    (dict(top_p=0.0), r"top_p=0.0 is outside the valid range \(0, 1\]"),
    (dict(top_p=1.5), r"top_p=1.5 is outside the valid range \(0, 1\]"),
    (dict(top_k=-1), r"top_k=-1 is outside the valid range"),
    (dict(top_k=2.5), r"top_k=2.5 is outside the valid range"),
    (dict(min_p=1.2), r"min_p=1.2 is outside the valid range \[0, 1\]"),
    (dict(repetition_penalty=0), r"repetition_penalty=0 is outside the valid range \(0, inf\)"),
    (dict(temperature=[1, 2]), r"temperature must be a scalar or have one value per row \(3\)"),
])
def test_bad_settings_are_rejected(kw, match):
  with pytest.raises(ValueError, match=match):
    Sampler.create(3, **kw)

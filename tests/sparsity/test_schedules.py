"""Sparsity schedules: cubic values by hand, every-dt stepping, clamping, traced == static."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sparsity import schedules

KW = dict(initial=0.1, final=0.9, begin_step=10, end_step=50, every=10)


def test_cubic_matches_hand_computation():
  # s_t = s_f + (s_i - s_f) * (1 - (t - t0) / (n dt))^3 with t0=10, n dt=40.
  for t, frac in [(10, 0.0), (20, 0.25), (30, 0.5), (40, 0.75), (50, 1.0)]:
    want = 0.9 + (0.1 - 0.9) * (1 - frac) ** 3
    assert math.isclose(schedules.cubic_sparsity(t, **KW), want, rel_tol=1e-12)
  assert math.isclose(schedules.cubic_sparsity(30, **KW), 0.9 - 0.8 / 8)


def test_steps_round_down_to_the_last_update_and_clamp():
  s = lambda t: schedules.cubic_sparsity(t, **KW)
  assert s(0) == s(9) == 0.1  # before t0: the initial sparsity
  assert s(20) == s(21) == s(29) and s(29) < s(30)  # held between mask updates
  assert s(50) == s(51) == s(10_000) == pytest.approx(0.9)  # after the end: the final one
  assert all(s(a) <= s(b) for a, b in zip(range(0, 60), range(1, 61)))


def test_traced_matches_static_and_jits():
  steps = jnp.arange(0, 70)
  traced = jax.jit(lambda t: schedules.cubic_sparsity(t, **KW))(steps)
  static = [schedules.cubic_sparsity(int(t), **KW) for t in steps]
  np.testing.assert_allclose(np.asarray(traced), static, rtol=1e-6, atol=1e-7)


def test_power_and_constant():
  p1 = schedules.polynomial_sparsity(30, **KW, power=1)
  assert math.isclose(p1, 0.5)  # linear: halfway
  assert schedules.constant(7, value=0.3) == 0.3
  assert float(schedules.constant(jnp.int32(7), value=0.3)) == pytest.approx(0.3)
  kw0 = dict(KW, end_step=10)  # a one-shot schedule: begin == end
  assert schedules.cubic_sparsity(9, **kw0) == 0.1 and schedules.cubic_sparsity(10, **kw0) == 0.9


def test_update_steps_and_drop_fraction():
  assert schedules.update_steps(begin_step=10, end_step=50, every=10) == [10, 20, 30, 40, 50]
  on = [t for t in range(70) if schedules.is_update_step(t, begin_step=10, end_step=50, every=10)]
  assert on == [10, 20, 30, 40, 50]
  traced = jax.jit(lambda t: schedules.is_update_step(t, begin_step=10, end_step=50, every=10))
  assert [t for t in range(70) if bool(traced(t))] == on
  f = lambda t: schedules.cosine_drop_fraction(t, initial=0.3, end_step=100)
  assert f(0) == pytest.approx(0.3) and f(50) == pytest.approx(0.15) and f(100) == 0.0
  assert f(500) == 0.0 and float(jax.jit(f)(jnp.int32(50))) == pytest.approx(0.15)


@pytest.mark.parametrize("kw,match", [
    (dict(KW, end_step=45), "end_step=45 must be begin_step=10 plus a multiple of every=10"),
    (dict(KW, every=0), "every=0 must be an integer >= 1"),
    (dict(KW, final=1.0), "final=1.0 is outside the valid range"),
    (dict(KW, initial=0.95), "initial=0.95 must not exceed final=0.9"),
    (dict(KW, end_step=5), "end_step=5 must be an integer >= 10"),
])
def test_bad_arguments(kw, match):
  with pytest.raises(ValueError, match=match):
    schedules.cubic_sparsity(0, **kw)

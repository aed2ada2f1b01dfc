"""Sparsity and drop-fraction schedules for training-time pruning, traceable in `step`.

`step` is the optimizer's update count: 0 at the first update (the trainer's state
step before that update). With a Python int `step` the functions return Python
floats computed in float64 (the training wrappers precompute exact per-step
prune counts this way); with a traced or array `step` they return jnp values.

Gradual pruning (Zhu & Gupta, 2017): with masks updated every `every` steps from
`begin_step` t0 to `end_step` t0 + n*every,

  s_t = s_f + (s_i - s_f) * (1 - (t - t0) / (n * every)) ** power,   power = 3,

where t is rounded down to the last update step, held at s_i before t0 and at s_f
after the end. The dynamic-sparse-training drop fraction (RigL) decays as
`alpha / 2 * (1 + cos(pi * t / T_end))`, and is 0 after T_end.
"""

from __future__ import annotations

import math

import jax.numpy as jnp
import numpy as np

from sparsity import rules as rules_lib


def _static(step) -> bool:
  return isinstance(step, (int, np.integer)) and not isinstance(step, bool)


def _check_int(name: str, value, low: int) -> int:
  if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low:
    raise ValueError(f"{name}={value!r} must be an integer >= {low}")
  return int(value)


def check_steps(*, begin_step: int, end_step: int, every: int,
                aligned: bool = True) -> tuple[int, int, int]:
  """Validates a mask-update window; `aligned`: end_step - begin_step divides by every."""
  begin_step = _check_int("begin_step", begin_step, 0)
  every = _check_int("every", every, 1)
  end_step = _check_int("end_step", end_step, begin_step)
  if aligned and (end_step - begin_step) % every:
    raise ValueError(f"end_step={end_step} must be begin_step={begin_step} plus a multiple of "
                     f"every={every} (valid: {begin_step} + k * {every}, k >= 0)")
  return begin_step, end_step, every


def polynomial_sparsity(step, *, initial: float, final: float, begin_step: int, end_step: int,
                        every: int = 1, power: float = 3.0):
  """Sparsity at `step` on the Zhu & Gupta schedule with exponent `power` (3: cubic)."""
  initial = rules_lib.check_sparsity(initial, "initial")
  final = rules_lib.check_sparsity(final, "final")
  if initial > final:
    raise ValueError(f"initial={initial} must not exceed final={final} (valid: [0, {final}])")
  if isinstance(power, bool) or not isinstance(power, (int, float)) or not power > 0:
    raise ValueError(f"power={power!r} must be a number > 0")
  begin_step, end_step, every = check_steps(begin_step=begin_step, end_step=end_step,
                                            every=every)
  span = end_step - begin_step
  if _static(step):
    t = min(max(int(step), begin_step), end_step)
    t = begin_step + (t - begin_step) // every * every
    frac = (t - begin_step) / span if span else float(step >= begin_step)
    r = (1.0 - frac) ** power
    return final * (1.0 - r) + initial * r  # exact at both ends
  step = jnp.asarray(step)
  t = jnp.clip(step, begin_step, end_step)
  t = begin_step + (t - begin_step) // every * every
  if span:
    frac = (t - begin_step).astype(jnp.float32) / span
  else:
    frac = (step >= begin_step).astype(jnp.float32)
  r = (1.0 - frac) ** power
  return final * (1.0 - r) + initial * r


def cubic_sparsity(step, *, initial: float, final: float, begin_step: int, end_step: int,
                   every: int = 1):
  """Zhu & Gupta's cubic gradual-pruning sparsity at `step` (`polynomial_sparsity`, power 3)."""
  return polynomial_sparsity(step, initial=initial, final=final, begin_step=begin_step,
                             end_step=end_step, every=every, power=3.0)


def constant(step, *, value: float):
  """A constant sparsity `value` at every step (the same type rule as the other schedules)."""
  value = rules_lib.check_sparsity(value, "value")
  return value if _static(step) else jnp.full(jnp.shape(step), value, jnp.float32)


def is_update_step(step, *, begin_step: int, end_step: int, every: int):
  """Whether masks change at `step`: begin_step <= step <= end_step, on the every-grid."""
  begin_step, end_step, every = check_steps(begin_step=begin_step, end_step=end_step,
                                            every=every, aligned=False)
  if _static(step):
    return begin_step <= step <= end_step and (step - begin_step) % every == 0
  step = jnp.asarray(step)
  return (step >= begin_step) & (step <= end_step) & ((step - begin_step) % every == 0)


def update_steps(*, begin_step: int, end_step: int, every: int) -> list[int]:
  """The steps at which `is_update_step` holds, in order."""
  begin_step, end_step, every = check_steps(begin_step=begin_step, end_step=end_step,
                                            every=every, aligned=False)
  return list(range(begin_step, end_step + 1, every))


def cosine_drop_fraction(step, *, initial: float, end_step: int):
  """RigL's drop fraction: initial / 2 * (1 + cos(pi * min(step, end_step) / end_step))."""
  if isinstance(initial, bool) or not isinstance(initial, (int, float)) or not (
      0.0 <= initial <= 1.0):
    raise ValueError(f"drop_fraction={initial!r} must be a number in [0, 1]")
  end_step = _check_int("end_step", end_step, 1)
  if _static(step):
    t = min(max(int(step), 0), end_step)
    return initial / 2 * (1 + math.cos(math.pi * t / end_step))
  t = jnp.clip(jnp.asarray(step), 0, end_step).astype(jnp.float32)
  return initial / 2 * (1 + jnp.cos(jnp.pi * t / end_step))

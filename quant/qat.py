"""Quantization-aware training (AQT-style): fake quantization with a straight-through estimator.

The forward of `fake_quant` is the value a deployed kernel has: for weights (no
`bounds`) the symmetric RTN grid of `quant.rtn.quantize_tensor` (scale = absmax /
qmax along `axis`, or per group of `group_size` rows), bit for bit what
`dequantize(quantize_tensor(w))` gives. The backward is the straight-through
estimator: the identity where x lies inside the representable range and zero where
it was clipped. Weights are never clipped (the range is their absmax); activations
use calibrated `bounds` (absmax; `signed=False` for ReLU-like, non-negative inputs,
which then get the full unsigned grid [0, 2^bits - 1]).

Weights: `fake_quant_params(params, spec, rules=...)` selects kernels with the same
matcher as PTQ (`quant.transform.plan`), so after training `quant.quantize(params,
spec, rules=...)` exports exactly the kernels the loss saw. Activations:
`act_quant_interceptor(ranges, bits)` is a Linen method interceptor (the mechanism
of `model.calibration`) that fake-quantizes the input of every selected `Dense`;
`act_ranges` calibrates the per-kernel input absmax in one pass. Ranges are fixed
after calibration (no EMA).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float

from model.calibration import calibrate
from model.config import ModelConfig
from model.layers import Dense
from model.tree import is_weight_leaf
from quant.recipes import QuantSpec
from quant.rtn import _safe_scale
from quant.transform import plan

BITS = tuple(range(2, 9))


@jax.custom_vjp
def straight_through(x: Array, q: Array, lo: Array, hi: Array) -> Array:
  """Returns `q` (the quantized x); its gradient is g where lo <= x <= hi, else 0 (STE)."""
  del x, lo, hi
  return q


def _st_fwd(x, q, lo, hi):
  return q, (x, lo, hi)


def _st_bwd(res, g):
  x, lo, hi = res
  inside = (x >= lo) & (x <= hi)
  return (jnp.where(inside, g, 0).astype(x.dtype), jnp.zeros_like(g), jnp.zeros_like(lo),
          jnp.zeros_like(hi))


straight_through.defvjp(_st_fwd, _st_bwd)


def _check(x, bits, axis, group_size, bounds, signed) -> None:
  if isinstance(bits, bool) or bits not in BITS:
    raise ValueError(f"fake_quant: bits={bits!r}; valid: {list(BITS)}")
  if not jnp.issubdtype(x.dtype, jnp.floating):
    raise ValueError(f"fake_quant: x must be floating, got dtype {x.dtype}")
  if bounds is None:
    if not signed:
      raise ValueError("fake_quant: signed=False needs bounds= (weights are symmetric)")
    if group_size is not None:
      if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 1:
        raise ValueError(f"fake_quant: group_size={group_size!r}; valid: a positive int")
      if axis != 0 or x.ndim < 1 or x.shape[0] % group_size:
        raise ValueError(f"fake_quant: group_size={group_size} needs axis=0 and must divide "
                         f"axis 0 of shape {tuple(x.shape)} (axis={axis!r})")
    elif axis is not None and not all(-x.ndim <= a < x.ndim
                                      for a in ((axis,) if isinstance(axis, int) else axis)):
      raise ValueError(f"fake_quant: axis={axis!r} out of range for rank {x.ndim}")


def fake_quant(x: Float[Array, "..."], *, bits: int, axis=0, group_size: int | None = None,
               bounds=None, signed: bool = True) -> Float[Array, "..."]:
  """x on the `bits`-bit grid (forward) with the straight-through gradient (backward).

  Args:
    bits: 2..8.
    axis: the axis (or axes; None = all) a weight scale is shared along (0: per output
      channel of an `[in, out]` kernel); ignored with `bounds`.
    group_size: rows of axis 0 sharing one weight scale.
    bounds: activation range, the absmax (a scalar or an array broadcasting against x);
      None: weights, the range is x's own absmax per `axis` / group.
    signed: False: unsigned grid [0, bounds] for non-negative (ReLU-like) inputs.
  """
  _check(x, bits, axis, group_size, bounds, signed)
  x32 = jax.lax.stop_gradient(x).astype(jnp.float32)
  if bounds is None:
    shape = x.shape
    if group_size:  # [in, ...] -> [G, g, ...]: the scale is shared by the g rows of a group.
      x32, axis = x32.reshape(shape[0] // group_size, group_size, *shape[1:]), 1
    qmax = 2 ** (bits - 1) - 1
    absmax = jnp.max(jnp.abs(x32), axis=axis, keepdims=True)
    scale = _safe_scale(absmax, qmax)
    q = (jnp.clip(jnp.round(x32 / scale), -qmax, qmax) * scale).reshape(shape)
    hi = jnp.broadcast_to(absmax, x32.shape).reshape(shape)
    lo = -hi
  else:
    b = jnp.maximum(jnp.asarray(bounds, jnp.float32), 0.0)
    qmin, qmax = (-(2 ** (bits - 1) - 1), 2 ** (bits - 1) - 1) if signed else (0, 2 ** bits - 1)
    scale = _safe_scale(b, qmax)
    q = jnp.clip(jnp.round(x32 / scale), qmin, qmax) * scale
    hi = jnp.broadcast_to(b, x.shape)
    lo = -hi if signed else jnp.zeros_like(hi)
  return straight_through(x, q.astype(x.dtype), lo.astype(x.dtype), hi.astype(x.dtype))


def _check_qat_spec(path: str, s: QuantSpec) -> None:
  """QAT emulates symmetric absmax RTN int kernels; other specs would not export exactly."""
  if (s.fmt != "int" or not s.symmetric or s.method != "rtn" or s.clip != "absmax"
      or s.act_bits or s.sparse):
    raise ValueError(f"QAT spec {s.name!r} (for {path!r}): QAT fake-quantizes symmetric "
                     "absmax RTN int kernels; valid: int8 / int4 / int2 with optional gN, "
                     "channel or tensor (activations: the qat act_bits setting)")


def qat_plan(params, spec, *, rules=()) -> tuple[tuple[str, QuantSpec], ...]:
  """((path, spec), ...) of the kernels QAT fake-quantizes: exactly what PTQ would quantize."""
  paths, specs, leaves = plan(params, spec, rules=rules)
  out = []
  for path, s, leaf in zip(paths, specs, leaves, strict=True):
    if s is None:
      continue
    if is_weight_leaf(leaf):
      raise ValueError(f"QAT selects {path!r}, which is not a float kernel ({leaf!r}); "
                       "QAT trains float params")
    _check_qat_spec(path, s)
    out.append((path, s))
  return tuple(out)


def _map_paths(params, fn: dict) -> dict:
  """params with the leaf at each path in `fn` replaced by `fn[path](leaf)`."""
  def go(tree, prefix):
    if isinstance(tree, Mapping):
      return {k: go(v, f"{prefix}{k}/") for k, v in tree.items()}
    f = fn.get(prefix[:-1])
    return tree if f is None else f(tree)
  return go(params, "")


def fake_quant_params(params, spec, *, rules=()) -> dict:
  """Params with every kernel PTQ's `plan(params, spec, rules)` selects fake-quantized (STE)."""
  selected = spec if _is_plan(spec) else qat_plan(params, spec, rules=rules)
  fn = {p: (lambda w, s=s: fake_quant(w, bits=s.bits, axis=s.axis, group_size=s.group_size))
        for p, s in selected}
  return _map_paths(params, fn)


def _is_plan(spec) -> bool:
  return (isinstance(spec, tuple) and bool(spec)
          and all(isinstance(e, tuple) and len(e) == 2 and isinstance(e[1], QuantSpec)
                  for e in spec))


def first_last_rules(n_layers: int, spec: str = "int8") -> list[tuple[str, str]]:
  """Rules putting the first and last decoder blocks' kernels at `spec` ("mostly 4-bit")."""
  if isinstance(n_layers, bool) or not isinstance(n_layers, int) or n_layers < 1:
    raise ValueError(f"first_last_rules: n_layers={n_layers!r}; valid: a positive int")
  layers = sorted({0, n_layers - 1})
  return [(rf"^layers_{i}/.*kernel$", spec) for i in layers]


def _kernel_path(module: nn.Module) -> str:
  return "/".join(module.scope.path) + "/kernel"


def act_quant_interceptor(ranges: Mapping[str, float], bits: int, *, signed: bool = True):
  """A Linen interceptor fake-quantizing each `Dense` input whose kernel path is in `ranges`.

  ranges: {kernel path: calibrated input absmax}. Every Dense input of a Llama is
  signed (RMSNorm outputs, attention outputs, silu(gate) * up), hence `signed=True`.
  """
  if isinstance(bits, bool) or bits not in BITS:
    raise ValueError(f"act_quant_interceptor: bits={bits!r}; valid: {list(BITS)}")

  def interceptor(next_fun, args, kwargs, ctx):
    if isinstance(ctx.module, Dense) and ctx.method_name == "__call__":
      bound = ranges.get(_kernel_path(ctx.module))
      if bound is not None:
        args = (fake_quant(args[0], bits=bits, bounds=bound, signed=signed), *args[1:])
    return next_fun(*args, **kwargs)

  return interceptor


def act_ranges(cfg: ModelConfig, params, batches: Iterable, paths: Iterable[str]
               ) -> dict[str, float]:
  """{kernel path: max |input| over the calibration batches} for the Dense kernels at `paths`.

  batches: token arrays [B, T] or dicts with "tokens" (and "segment_ids"; padding is
  excluded). The maxima are the calibration pass's per-channel `abs_max`, reduced.
  """
  paths = frozenset(paths)
  if not paths:
    raise ValueError("act_ranges: paths is empty; pass the kernel paths to calibrate")
  stats = calibrate(cfg, params, batches, paths=sorted(paths), hessian=False)
  missing = sorted(paths - set(stats))
  if missing:
    raise ValueError(f"act_ranges: paths {missing[:3]} are not Dense kernels of the model")
  return {p: float(np.asarray(jnp.max(stats[p].abs_max))) for p in sorted(paths)}

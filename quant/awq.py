"""AWQ (activation-aware weight quantization) of one linear layer, after llm-awq.

For a kernel `W[in, out]` and calibration inputs `x[n, in]`:

1. Scale search: `x_max[c] = mean_t |x[t, c]|`; for each ratio `r = i / n_grid` the input
   scale is `s = clamp(x_max ** r, 1e-4)`, normalised by `sqrt(max(s) * min(s))`. The
   scaled kernel `W * s[:, None]` is pseudo-quantized (asymmetric min-max with an integer
   zero point, one scale per group of `group_size` consecutive input rows per output
   column) and the ratio minimising `mean((x @ W - (x / s) @ Q(W * s)) ** 2)` is kept
   (first best on ties; ratio 0 is plain round-to-nearest).
2. Clip search: per group and output column, the max |w| of the scaled kernel is shrunk by
   `1 - i / n_grid` (i < max_shrink * n_grid); the factor minimising that group's output
   error on a token subsample of `x / s` is kept and the kernel clamped to it.
3. The scaled, clipped kernel is quantized into a QArray; the caller divides its inputs by
   the returned `in_scale`: `x @ W ~= (x / in_scale) @ dequantize(q)`.

Codes follow upstream's unsigned grid `[0, 2^bits - 1]` shifted by `2^(bits-1)` into the
signed int8 codes QArray stores, so `dequantize` reproduces the pseudo-quantizer exactly.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float

from model.qarray import INT_BITS, QArray, pack

_HI = jax.lax.Precision.HIGHEST


@dataclasses.dataclass(frozen=True)
class AwqReport:
  """What the searches chose: the scale ratio, its loss curve and the clip thresholds."""

  ratio: float
  ratio_index: int
  scale_losses: np.ndarray  # [n_grid] output MSE per ratio
  clip_max_val: Array  # [groups, out] clamp threshold of the scaled kernel
  clip_index: Array  # [groups, out] chosen shrink step i (factor 1 - i / n_grid)


# ----------------------------------------------------------------------------- validation


def _check(fn, kernel, x, bits, group_size, n_grid=20, max_shrink=0.5, n_sample_token=512):
  """Validates user arguments before any compute."""
  kshape, xshape = tuple(np.shape(kernel)), tuple(np.shape(x))
  if len(kshape) != 2:
    raise ValueError(f"{fn}: kernel must be 2-D [in, out], got shape {kshape}")
  if len(xshape) != 2:
    raise ValueError(f"{fn}: x must be 2-D [n, in], got shape {xshape}")
  for name, a in (("kernel", kernel), ("x", x)):
    if not jnp.issubdtype(jnp.asarray(a).dtype, jnp.floating):
      raise ValueError(f"{fn}: {name} must be floating, got dtype {jnp.asarray(a).dtype}")
  n_in = kshape[0]
  if xshape[1] != n_in or xshape[0] < 1:
    raise ValueError(f"{fn}: x shape {xshape} must be [n >= 1, {n_in}] (kernel in-dim {n_in})")
  if bits not in INT_BITS:
    raise ValueError(f"{fn}: bits={bits!r}; valid: {INT_BITS}")
  if group_size is not None:
    if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 1:
      raise ValueError(f"{fn}: group_size={group_size!r} must be a positive int or None")
    if n_in % group_size:
      raise ValueError(f"{fn}: group_size={group_size} must divide the kernel in-dim {n_in}")
  per = 8 // bits
  if n_in % per:
    raise ValueError(f"{fn}: int{bits} packs {per} codes per byte along the input axis, so "
                     f"kernel in-dim {n_in} must be divisible by {per}")
  if not isinstance(n_grid, int) or n_grid < 1:
    raise ValueError(f"{fn}: n_grid={n_grid!r} must be a positive int")
  if not 0.0 < max_shrink < 1.0:
    raise ValueError(f"{fn}: max_shrink={max_shrink!r} must lie in (0, 1)")
  if not isinstance(n_sample_token, int) or n_sample_token < 1:
    raise ValueError(f"{fn}: n_sample_token={n_sample_token!r} must be a positive int")
  for name, a in (("kernel", kernel), ("x", x)):
    if not isinstance(a, jax.core.Tracer) and not bool(jnp.all(jnp.isfinite(a))):
      raise ValueError(f"{fn}: {name} contains NaN or Inf; all values must be finite")


# ------------------------------------------------------------------------ pseudo-quantizer


def _groups(w, group_size):
  """[in, out] -> [G, g, out]: runs of `group_size` input rows per output column."""
  g = group_size or w.shape[0]
  return w.reshape(w.shape[0] // g, g, w.shape[1])


def _minmax_codes(wg, bits):
  """Unsigned codes, scale, zero of the asymmetric min-max quantizer over axis 1."""
  max_int = 2**bits - 1
  hi = jnp.max(wg, axis=1, keepdims=True)
  lo = jnp.min(wg, axis=1, keepdims=True)
  scale = jnp.maximum(hi - lo, 1e-5) / max_int
  zero = jnp.clip(-jnp.round(lo / scale), 0, max_int)
  c = jnp.clip(jnp.round(wg / scale) + zero, 0, max_int)
  return c, scale, zero


def _fake_quant_groups(wg, bits):
  c, scale, zero = _minmax_codes(wg, bits)
  return (c - zero) * scale


def _fake_quant(w, bits, group_size):
  return _fake_quant_groups(_groups(w, group_size), bits).reshape(w.shape)


@functools.partial(jax.jit, static_argnames=("bits", "group_size"))
def _pseudo_quantize(kernel, *, bits, group_size):
  return _fake_quant(kernel.astype(jnp.float32), bits, group_size)


def pseudo_quantize(kernel: Float[Array, "In Out"], *, bits: int,
                    group_size: int | None = 128) -> Float[Array, "In Out"]:
  """The dequantized asymmetric min-max fake quantization of a kernel (f32), as upstream."""
  n_in = np.shape(kernel)[0] if np.ndim(kernel) else 1
  _check("pseudo_quantize", kernel, np.zeros((1, n_in), np.float32), bits, group_size)
  return _pseudo_quantize(jnp.asarray(kernel), bits=bits, group_size=group_size)


# ---------------------------------------------------------------------------- scale search


def _ratio_scale(x_max, r):
  s = jnp.maximum(x_max**r, 1e-4)
  return s / jnp.sqrt(jnp.max(s) * jnp.min(s))


@functools.partial(jax.jit, static_argnames=("bits", "group_size", "n_grid"))
def _scale_search(kernel, x, *, bits, group_size, n_grid):
  w = kernel.astype(jnp.float32)
  x = x.astype(jnp.float32)
  org = jnp.dot(x, w, precision=_HI)
  x_max = jnp.mean(jnp.abs(x), axis=0)
  ratios = jnp.arange(n_grid, dtype=jnp.float32) / n_grid

  def loss(r):
    s = _ratio_scale(x_max, r)
    wq = _fake_quant(w * s[:, None], bits, group_size) / s[:, None]
    return jnp.mean((org - jnp.dot(x, wq, precision=_HI)) ** 2)

  losses = jax.lax.map(loss, ratios)  # one ratio at a time: memory stays O(in * out)
  best = jnp.argmin(losses)  # first minimum, as upstream's strict `<`
  return _ratio_scale(x_max, ratios[best]), best, losses


def awq_scale_search(kernel: Float[Array, "In Out"], x: Float[Array, "N In"], *, bits: int,
                     group_size: int | None = 128, n_grid: int = 20):
  """AWQ input-scale search: returns (in_scale f32[in], ratio, losses f32[n_grid])."""
  _check("awq_scale_search", kernel, x, bits, group_size, n_grid=n_grid)
  s, best, losses = _scale_search(jnp.asarray(kernel), jnp.asarray(x), bits=bits,
                                  group_size=group_size, n_grid=n_grid)
  return s, int(best) / n_grid, losses


# ----------------------------------------------------------------------------- clip search


@functools.partial(jax.jit,
                   static_argnames=("bits", "group_size", "n_grid", "n_shrink", "step"))
def _clip_search(kernel, x, *, bits, group_size, n_grid, n_shrink, step):
  wg = _groups(kernel.astype(jnp.float32), group_size)  # [G, g, out]
  xs = x.astype(jnp.float32)[::step]
  xg = xs.reshape(xs.shape[0], wg.shape[0], wg.shape[1]).transpose(1, 0, 2)  # [G, n, g]
  org = jnp.einsum("gnk,gko->gno", xg, wg, precision=_HI)
  org_max = jnp.max(jnp.abs(wg), axis=1, keepdims=True)  # [G, 1, out]
  factors = 1.0 - jnp.arange(n_shrink, dtype=jnp.float32) / n_grid

  def err(f):
    mv = org_max * f
    q = _fake_quant_groups(jnp.clip(wg, -mv, mv), bits)
    out = jnp.einsum("gnk,gko->gno", xg, q, precision=_HI)
    return jnp.mean((out - org) ** 2, axis=1)  # [G, out]

  errs = jax.lax.map(err, factors)  # [F, G, out]
  best = jnp.argmin(errs, axis=0)
  return org_max[:, 0, :] * factors[best], best


def awq_clip_search(kernel: Float[Array, "In Out"], x: Float[Array, "N In"], *, bits: int,
                    group_size: int | None = 128, n_grid: int = 20, max_shrink: float = 0.5,
                    n_sample_token: int = 512):
  """AWQ clip search on an (already scaled) kernel and inputs: (max_val [G, out], index).

  Tokens are subsampled as upstream, every `max(1, n // n_sample_token)`-th one.
  """
  _check("awq_clip_search", kernel, x, bits, group_size, n_grid, max_shrink, n_sample_token)
  step = max(1, np.shape(x)[0] // n_sample_token)
  return _clip_search(jnp.asarray(kernel), jnp.asarray(x), bits=bits, group_size=group_size,
                      n_grid=n_grid, n_shrink=int(max_shrink * n_grid), step=step)


# ------------------------------------------------------------------------------ full layer


@functools.partial(jax.jit, static_argnames=("bits", "group_size", "dtype"))
def _clip_and_quantize(kernel, max_val, *, bits, group_size, dtype):
  shape = tuple(kernel.shape)
  wg = _groups(kernel.astype(jnp.float32), group_size)
  mv = max_val[:, None, :]
  c, scale, zero = _minmax_codes(jnp.clip(wg, -mv, mv), bits)
  off = 2 ** (bits - 1)  # unsigned [0, 2^bits) -> signed int8 codes; zero shifts alike
  codes = (c - off).astype(jnp.int8).reshape(shape)
  scale = scale.reshape(wg.shape[0], shape[1])
  zero = (zero - off).astype(jnp.int8).reshape(scale.shape)
  return QArray(values=pack(codes, bits), scale=scale, zero=zero, shape=shape, bits=bits,
                fmt="int", group_size=group_size, dtype=dtype)


def awq_layer_with_report(kernel: Float[Array, "In Out"], x: Float[Array, "N In"], *,
                          bits: int, group_size: int | None = 128, n_grid: int = 20,
                          max_shrink: float = 0.5, n_sample_token: int = 512):
  """`awq_layer` plus an `AwqReport` of the chosen ratio and clip thresholds."""
  _check("awq_layer", kernel, x, bits, group_size, n_grid, max_shrink, n_sample_token)
  kernel, x = jnp.asarray(kernel), jnp.asarray(x)
  s, best, losses = _scale_search(kernel, x, bits=bits, group_size=group_size, n_grid=n_grid)
  w_s = kernel.astype(jnp.float32) * s[:, None]
  x_s = x.astype(jnp.float32) / s
  step = max(1, x.shape[0] // n_sample_token)
  max_val, idx = _clip_search(w_s, x_s, bits=bits, group_size=group_size, n_grid=n_grid,
                              n_shrink=int(max_shrink * n_grid), step=step)
  q = _clip_and_quantize(w_s, max_val, bits=bits, group_size=group_size, dtype=kernel.dtype)
  report = AwqReport(ratio=int(best) / n_grid, ratio_index=int(best),
                     scale_losses=np.asarray(losses), clip_max_val=max_val, clip_index=idx)
  return q, s, report


def awq_layer(kernel: Float[Array, "In Out"], x: Float[Array, "N In"], *, bits: int,
              group_size: int | None = 128, n_grid: int = 20, max_shrink: float = 0.5,
              n_sample_token: int = 512) -> tuple[QArray, Float[Array, " In"]]:
  """AWQ-quantizes one kernel on inputs `x`: (q, in_scale), x @ W ~= (x / in_scale) @ deq(q)."""
  q, s, _ = awq_layer_with_report(kernel, x, bits=bits, group_size=group_size, n_grid=n_grid,
                                  max_shrink=max_shrink, n_sample_token=n_sample_token)
  return q, s


# ---------------------------------------------------------------- from calibration statistics
#
# The model-level recipe (`quant.quantize(params, "int4:g128:awq", calib=...)`) does not keep
# activations: both searches' losses are quadratic forms of the weight error, so they are
# computed exactly from X^T X (model.calibration.KernelStats): for an error E = W - W_hat,
# mean((x @ E) ** 2) = trace(E^T X^T X E) / (n * out). Two differences from upstream follow:
# the clip search sees every calibration token (no `n_sample_token` subsample), and a group of
# kernels sharing one input (q / k / v, gate / up) is scored on their concatenated outputs
# rather than on the attention / MLP module output.


@functools.partial(jax.jit, static_argnames=("bits", "group_size", "n_grid"))
def _scale_search_xtx(kernel, xtx, x_max, count, *, bits, group_size, n_grid):
  w = kernel.astype(jnp.float32)
  ratios = jnp.arange(n_grid, dtype=jnp.float32) / n_grid
  norm = count.astype(jnp.float32) * w.shape[1]

  def loss(r):
    s = _ratio_scale(x_max, r)
    e = w - _fake_quant(w * s[:, None], bits, group_size) / s[:, None]
    return jnp.sum(jnp.dot(xtx, e, precision=_HI) * e) / norm

  losses = jax.lax.map(loss, ratios)
  best = jnp.argmin(losses)
  return _ratio_scale(x_max, ratios[best]), best, losses


def awq_scale_search_stats(kernel: Float[Array, "In Out"], xtx: Float[Array, "In In"],
                           x_max: Float[Array, " In"], count, *, bits: int,
                           group_size: int | None = 128, n_grid: int = 20):
  """`awq_scale_search` from statistics: X^T X, mean |x| per channel and the token count.

  `kernel` may be several kernels sharing the input, concatenated along the output axis.
  Returns (in_scale f32[in], ratio, losses f32[n_grid]); the losses equal
  `awq_scale_search`'s on the same tokens.
  """
  n_in = np.shape(kernel)[0]
  _check("awq_scale_search_stats", kernel, np.zeros((1, n_in), np.float32), bits, group_size,
         n_grid=n_grid)
  _check_stats("awq_scale_search_stats", n_in, xtx, x_max)
  s, best, losses = _scale_search_xtx(jnp.asarray(kernel), jnp.asarray(xtx), jnp.asarray(x_max),
                                      jnp.asarray(count), bits=bits, group_size=group_size,
                                      n_grid=n_grid)
  return s, int(best) / n_grid, losses


@functools.partial(jax.jit, static_argnames=("bits", "group_size", "n_grid", "n_shrink"))
def _clip_search_xtx(kernel, xtx, *, bits, group_size, n_grid, n_shrink):
  wg = _groups(kernel.astype(jnp.float32), group_size)  # [G, g, out]
  n_groups, g = wg.shape[:2]
  blocks = xtx.reshape(n_groups, g, n_groups, g)[jnp.arange(n_groups), :, jnp.arange(n_groups)]
  org_max = jnp.max(jnp.abs(wg), axis=1, keepdims=True)
  factors = 1.0 - jnp.arange(n_shrink, dtype=jnp.float32) / n_grid

  def err(f):
    mv = org_max * f
    e = wg - _fake_quant_groups(jnp.clip(wg, -mv, mv), bits)
    return jnp.sum(jnp.einsum("gij,gjo->gio", blocks, e, precision=_HI) * e, axis=1)

  errs = jax.lax.map(err, factors)  # [F, G, out]
  best = jnp.argmin(errs, axis=0)
  return org_max[:, 0, :] * factors[best], best


def awq_clip_search_stats(kernel: Float[Array, "In Out"], xtx: Float[Array, "In In"], *,
                          bits: int, group_size: int | None = 128, n_grid: int = 20,
                          max_shrink: float = 0.5):
  """`awq_clip_search` from X^T X of the (already scaled) inputs: (max_val [G, out], index).

  Each group's error is `e^T (X^T X)_gg e` over every token, so the choice equals
  `awq_clip_search` on those tokens without subsampling.
  """
  n_in = np.shape(kernel)[0]
  _check("awq_clip_search_stats", kernel, np.zeros((1, n_in), np.float32), bits, group_size,
         n_grid, max_shrink)
  _check_stats("awq_clip_search_stats", n_in, xtx)
  return _clip_search_xtx(jnp.asarray(kernel), jnp.asarray(xtx), bits=bits,
                          group_size=group_size, n_grid=n_grid, n_shrink=int(max_shrink * n_grid))


def clip_and_quantize(kernel: Float[Array, "In Out"], max_val: Float[Array, "G Out"] | None, *,
                      bits: int, group_size: int | None = 128) -> QArray:
  """The asymmetric grouped QArray of `kernel` clamped to ±max_val (None: no clamp)."""
  kernel = jnp.asarray(kernel)
  if max_val is None:
    max_val = jnp.max(jnp.abs(_groups(kernel.astype(jnp.float32), group_size)), axis=1)
  return _clip_and_quantize(kernel, jnp.asarray(max_val), bits=bits, group_size=group_size,
                            dtype=kernel.dtype)


def _check_stats(fn, n_in, xtx, x_max=None):
  if tuple(np.shape(xtx)) != (n_in, n_in):
    raise ValueError(f"{fn}: xtx shape {tuple(np.shape(xtx))} must be ({n_in}, {n_in})")
  if x_max is not None and tuple(np.shape(x_max)) != (n_in,):
    raise ValueError(f"{fn}: x_max shape {tuple(np.shape(x_max))} must be ({n_in},)")
  for name, a in (("xtx", xtx), ("x_max", x_max)):
    if a is not None and not isinstance(a, jax.core.Tracer) and not bool(
        jnp.all(jnp.isfinite(jnp.asarray(a)))):
      raise ValueError(f"{fn}: {name} contains NaN or Inf; all values must be finite")

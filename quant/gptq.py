"""GPTQ: one layer quantized column by column with OBS error feedback, into a QArray.

`gptq_layer(kernel, hessian, bits=...)` follows the reference GPTQ
(`GPTQ.fasterquant` with its min-max `Quantizer`, per output channel) on an
`[in, out]` kernel (the transpose of the torch `[out, in]` weight): the input
rows are quantized in order, blocks of `blocksize` rows at a time, each row's
error spread over the later rows through the upper Cholesky factor of the damped
inverse Hessian (`quant.obs.damped_inverse_cholesky`), with lazy batched updates
of the rows after each block.

Quantizer (per output channel, or per group of `group_size` consecutive input
rows): `xmin = min(w, 0)`, `xmax = max(w, 0)`; symmetric: `xmax = max(|xmin|,
xmax)` and `xmin = -xmax` where `xmin < 0`; an all-zero channel gets [-1, 1];
`scale = (xmax - xmin) / maxq` (`maxq = 2^bits - 1`), `zero = round(-xmin /
scale)` (symmetric: `(maxq + 1) / 2`), `u = clip(round(w / scale) + zero, 0,
maxq)`, `q = scale * (u - zero)`. The QArray stores the signed codes
`c = u - 2^(bits-1)` and zero `z = zero - 2^(bits-1)` (None when symmetric,
where z is exactly 0), so `dequantize` gives `(u - zero) * scale` bit for bit.

Groups and orderings:
  * per channel (no group_size): parameters fitted once on the original kernel
    (before dead rows are zeroed, as upstream), scale / zero shaped `[1, out]`.
  * dynamic groups (group_size, no act_order, static_groups=False): parameters
    are refitted at each group start inside the sweep from the group's rows as
    the sweep has updated them, exactly as upstream: it reads the full kernel,
    which holds every update up to the start of the current block (the in-block
    updates live in the block copy), so a group starting mid-block sees the
    block-start state. Scales are `[in / group_size, out]`.
  * static groups (static_groups=True, or act_order with group_size):
    parameters fitted before the sweep on the consecutive groups of the original
    kernel (dead rows zeroed), and each row uses its original group's parameters.
    The QArray format only holds consecutive groups, so act_order + group_size
    always runs as upstream's `actorder=True, static_groups=True`.
  * act_order: inputs are permuted by descending Hessian diagonal (stable), the
    sweep runs in that order, and the result is unpermuted.

Dead input channels (zero Hessian diagonal) get a zero kernel row and a unit
diagonal, as upstream. Computation is float32.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float

from model.nm_array import NMArray, compress_nm, with_values
from model.qarray import INT_BITS, QArray, pack
from quant import obs


class GPTQResult(NamedTuple):
  """Output of `gptq_sweep`: the QArray, the swept float weights and the OBS loss."""
  qarray: QArray
  weights: Float[Array, "in out"]  # the sweep's quantized weights (float32, original order)
  loss: Float[Array, ""]  # sum of (w - q)^2 / (2 d^2), as upstream's `error`


def gptq_layer(kernel: Float[Array, "in out"], hessian: Float[Array, "in in"], *, bits: int,
               group_size: int | None = None, sym: bool = False, act_order: bool = False,
               blocksize: int = 128, percdamp: float = 0.01,
               static_groups: bool = False) -> QArray:
  """Quantizes an `[in, out]` kernel with GPTQ given `hessian` ∝ X^T X; returns a QArray.

  Args:
    kernel: `[in, out]` floating, finite.
    hessian: `[in, in]`, proportional to X^T X, finite.
    bits: code width, one of `model.qarray.INT_BITS`.
    group_size: consecutive input rows sharing a scale / zero (must divide in);
      None = per output channel.
    sym: symmetric grid (no zero point) instead of min-max with an integer zero.
    act_order: process inputs in descending order of the Hessian diagonal.
    blocksize: rows per lazy-update block (>= 1).
    percdamp: relative damping of the Hessian diagonal (> 0).
    static_groups: fit group parameters before the sweep (implied by act_order
      with group_size); needs group_size.
  """
  return gptq_sweep(kernel, hessian, bits=bits, group_size=group_size, sym=sym,
                    act_order=act_order, blocksize=blocksize, percdamp=percdamp,
                    static_groups=static_groups).qarray


def gptq_sweep(kernel: Float[Array, "in out"], hessian: Float[Array, "in in"], *, bits: int,
               group_size: int | None = None, sym: bool = False, act_order: bool = False,
               blocksize: int = 128, percdamp: float = 0.01,
               static_groups: bool = False) -> GPTQResult:
  """`gptq_layer`, also returning the sweep's float weights and loss (same arguments)."""
  kernel = _check_kernel(kernel)
  in_dim, out_dim = kernel.shape
  if isinstance(bits, bool) or bits not in INT_BITS:
    raise ValueError(f"bits={bits!r} is not supported; valid: {INT_BITS}")
  per = 8 // bits
  if in_dim % per:
    raise ValueError(f"kernel input dim {in_dim} must be divisible by {per}: int{bits} codes "
                     f"are packed {per} per byte along the input axis")
  if group_size is not None:
    if not _is_int(group_size) or not 1 <= group_size <= in_dim or in_dim % group_size:
      raise ValueError(f"group_size={group_size!r} must be None or a positive int dividing the "
                       f"kernel's input dim {in_dim}")
    group_size = int(group_size)
  for name, flag in (("sym", sym), ("act_order", act_order), ("static_groups", static_groups)):
    if not isinstance(flag, (bool, np.bool_)):
      raise ValueError(f"{name}={flag!r} must be a bool")
  if static_groups and group_size is None:
    raise ValueError("static_groups=True needs group_size (static groups are groups of inputs)")
  if not _is_int(blocksize) or blocksize < 1:
    raise ValueError(f"blocksize={blocksize!r} must be an int >= 1")
  percdamp = obs.check_percdamp(percdamp)
  hessian = obs.check_hessian(hessian, in_dim)

  w = kernel.astype(jnp.float32)
  maxq = jnp.float32(2 ** bits - 1)
  symj = jnp.asarray(bool(sym))
  dead = jnp.diagonal(hessian) == 0
  w_live = jnp.where(dead[:, None], 0.0, w)
  static = group_size is not None and (static_groups or act_order)
  dynamic = group_size is not None and not static
  n_groups = 1 if group_size is None else in_dim // group_size
  if group_size is None:  # upstream fits the channel params before zeroing dead rows
    scale, zero = _fit(w, maxq, symj)
    scale, zero = scale[None], zero[None]
    gidx = np.zeros(in_dim, np.int32)
  elif static:
    scale, zero = jax.vmap(lambda g: _fit(g, maxq, symj))(
        w_live.reshape(n_groups, group_size, out_dim))
    gidx = np.arange(in_dim, dtype=np.int32) // group_size
  else:  # initial values only: the sweep refits each group at its first row
    scale = jnp.ones((n_groups, out_dim), jnp.float32)
    zero = jnp.zeros((n_groups, out_dim), jnp.float32)
    gidx = np.zeros(in_dim, np.int32)

  if act_order:
    diag = jnp.where(dead, 1.0, jnp.diagonal(hessian))
    perm = jnp.argsort(-diag, stable=True)
    w, hessian, gidx = w[perm], hessian[perm][:, perm], jnp.asarray(gidx)[perm]
  fac = obs.damped_inverse_cholesky(hessian, percdamp=percdamp)
  bs = min(int(blocksize), in_dim)
  u, q, scale, zero, loss = _sweep(w, fac.hinv_upper, fac.dead, jnp.asarray(gidx), scale, zero,
                                   maxq, symj, bs=bs, group=group_size if dynamic else None)
  if act_order:
    inv = jnp.argsort(perm)
    u, q = u[inv], q[inv]

  half = 2 ** (bits - 1)
  codes = (u - half).astype(jnp.int8)
  zq = None if sym else (zero - half).astype(jnp.int8)
  qa = QArray(values=pack(codes, bits), scale=scale, zero=zq, shape=(in_dim, out_dim),
              bits=bits, fmt="int", group_size=group_size, dtype=kernel.dtype)
  return GPTQResult(qa, q, loss)


def _check_kernel(kernel) -> Array:
  kernel = jnp.asarray(kernel)
  if not jnp.issubdtype(kernel.dtype, jnp.floating):
    raise ValueError(f"kernel must be a floating array, got dtype {kernel.dtype}")
  if kernel.ndim != 2 or 0 in kernel.shape:
    raise ValueError(f"kernel must be a non-empty 2-D [in, out] array, got shape "
                     f"{tuple(kernel.shape)}")
  if not bool(jnp.all(jnp.isfinite(kernel))):
    raise ValueError("kernel contains NaN or Inf values; it must be finite")
  return kernel


def _is_int(value) -> bool:
  return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def _fit(w: Float[Array, "n out"], maxq: Array, sym: Array) -> tuple[Array, Array]:
  """Upstream `Quantizer.find_params` per output channel: (scale[out], zero[out])."""
  xmin = jnp.minimum(jnp.min(w, axis=0), 0.0)
  xmax = jnp.maximum(jnp.max(w, axis=0), 0.0)
  xmax = jnp.where(sym, jnp.maximum(jnp.abs(xmin), xmax), xmax)
  xmin = jnp.where(sym & (xmin < 0), -xmax, xmin)
  both = (xmin == 0) & (xmax == 0)
  xmin = jnp.where(both, -1.0, xmin)
  xmax = jnp.where(both, 1.0, xmax)
  # Floored at the smallest normal float so w / scale stays finite for subnormal ranges.
  scale = jnp.maximum((xmax - xmin) / maxq, jnp.finfo(jnp.float32).tiny)
  zero = jnp.where(sym, (maxq + 1) / 2, jnp.round(-xmin / scale))
  return scale, zero


@functools.partial(jax.jit, static_argnames=("bs", "group"))
def _sweep(kernel, hinv, dead, gidx, scale, zero, maxq, sym, *, bs: int, group: int | None):
  """(u codes int32, q, scale, zero, loss): the blocked GPTQ sweep in the kernel's row order."""
  in_dim, out_dim = kernel.shape
  nblocks = -(-in_dim // bs)
  w_all, hinv, pad = obs.pad_to_blocks(kernel, hinv, dead, bs)
  gidx = jnp.pad(gidx, (0, pad))
  u_all = jnp.zeros(w_all.shape, jnp.int32)
  hi = jax.lax.Precision.HIGHEST

  def block(b, carry):
    w_all, u_all, scale, zero, loss = carry
    i1 = b * bs
    w1 = jax.lax.dynamic_slice_in_dim(w_all, i1, bs, 0)
    rows = jax.lax.dynamic_slice_in_dim(hinv, i1, bs, 0)  # [bs, in_pad]
    h1 = jax.lax.dynamic_slice_in_dim(rows, i1, bs, 1)  # [bs, bs]

    def column(i, inner):
      w1, u1, err1, scale, zero, loss = inner
      r = i1 + i
      if group is not None:  # refit from the block-start weights (upstream reads W, not W1)

        def refit(sz):
          s, z = _fit(jax.lax.dynamic_slice_in_dim(w_all, r, group, 0), maxq, sym)
          g = r // group
          return (jax.lax.dynamic_update_index_in_dim(sz[0], s, g, 0),
                  jax.lax.dynamic_update_index_in_dim(sz[1], z, g, 0))

        scale, zero = jax.lax.cond((r % group == 0) & (r < in_dim), refit, lambda sz: sz,
                                   (scale, zero))
        g = jnp.minimum(r // group, scale.shape[0] - 1)
      else:
        g = gidx[r]
      s, z = scale[g], zero[g]
      w = w1[i]
      u = jnp.clip(jnp.round(w / s) + z, 0.0, maxq)
      valid = r < in_dim  # padded rows stay exactly 0
      q = jnp.where(valid, s * (u - z), 0.0)
      d = h1[i, i]
      e = (w - q) / d
      loss = loss + 0.5 * jnp.sum(e ** 2)
      w1 = w1 - h1[i][:, None] * e[None, :]  # h1 is upper triangular: earlier rows unchanged
      w1 = jax.lax.dynamic_update_index_in_dim(w1, q, i, 0)
      u1 = jax.lax.dynamic_update_index_in_dim(u1, jnp.where(valid, u, 0).astype(jnp.int32), i, 0)
      err1 = jax.lax.dynamic_update_index_in_dim(err1, e, i, 0)
      return w1, u1, err1, scale, zero, loss

    init = (w1, jnp.zeros(w1.shape, jnp.int32), jnp.zeros_like(w1), scale, zero, loss)
    w1, u1, err1, scale, zero, loss = jax.lax.fori_loop(0, bs, column, init)
    w_all = w_all - jnp.matmul(rows.T, err1, precision=hi)
    w_all = jax.lax.dynamic_update_slice_in_dim(w_all, w1, i1, 0)
    u_all = jax.lax.dynamic_update_slice_in_dim(u_all, u1, i1, 0)
    return w_all, u_all, scale, zero, loss

  init = (w_all, u_all, scale, zero, jnp.zeros((), jnp.float32))
  w_all, u_all, scale, zero, loss = jax.lax.fori_loop(0, nblocks, block, init)
  return u_all[:in_dim], w_all[:in_dim], scale, zero, loss


def _grid_row(scale, zero, gidx, maxq, row, index):
  """One row fake-quantized on its group's (scale, zero) grid (the OBS sweep's hook)."""
  g = gidx[index]
  s, z = scale[g], zero[g]
  return s * (jnp.clip(jnp.round(row / s) + z, 0.0, maxq) - z)


def gptq_nm_layer(kernel: Float[Array, "in out"], hessian: Float[Array, "in in"], *, bits: int,
                  n: int, m: int, group_size: int | None = None, sym: bool = False,
                  blocksize: int = 128, percdamp: float = 0.01) -> NMArray:
  """N:M pruning and GPTQ quantization in one OBS sweep (SparseGPT's joint mode).

  Each input row's N:M mask is chosen by the OBS saliency `w^2 / U_ii^2` over its group
  of m rows (as `sparsity.sparsegpt_layer`), its kept weights are rounded onto GPTQ's
  min-max grid, and the error of both is spread over the later rows. The grids are
  fitted before the sweep on the dense kernel (dead rows zeroed): one per output channel,
  or per group of `group_size` consecutive input rows (`group_size` a multiple of m), as
  upstream SparseGPT fits its quantizer on the dense weights. Returns an NMArray whose
  kept values are a QArray (groups of `group_size * n / m` compressed rows, the same
  dense groups); pruned entries are exact zeros.
  """
  kernel = _check_kernel(kernel)
  in_dim, out_dim = kernel.shape
  if isinstance(bits, bool) or bits not in INT_BITS:
    raise ValueError(f"bits={bits!r} is not supported; valid: {INT_BITS}")
  if not (_is_int(n) and _is_int(m) and 1 <= n < m):
    raise ValueError(f"n:m = {n!r}:{m!r} must satisfy 1 <= n < m (n kept of every m inputs)")
  if group_size is not None and (not _is_int(group_size) or group_size < 1
                                 or in_dim % group_size or group_size % m):
    raise ValueError(f"group_size={group_size!r} must be None or a positive multiple of m={m} "
                     f"dividing the kernel's input dim {in_dim}")
  rows_c = in_dim // m * n
  per = 8 // bits
  if in_dim % m or rows_c % per:
    raise ValueError(f"kernel input dim {in_dim} must be divisible by m={m}, and the {rows_c} "
                     f"kept rows by {per} (int{bits} packing)")
  if not isinstance(sym, (bool, np.bool_)):
    raise ValueError(f"sym={sym!r} must be a bool")
  if not _is_int(blocksize) or blocksize < 1:
    raise ValueError(f"blocksize={blocksize!r} must be an int >= 1")
  obs.check_nm_fits(n, m, in_dim, blocksize)
  percdamp = obs.check_percdamp(percdamp)
  hessian = obs.check_hessian(hessian, in_dim)

  w = kernel.astype(jnp.float32)
  maxq, symj = jnp.float32(2 ** bits - 1), jnp.asarray(bool(sym))
  dead = jnp.diagonal(hessian) == 0
  if group_size is None:
    scale, zero = _fit(w, maxq, symj)
    scale, zero = scale[None], zero[None]
    gidx = jnp.zeros(in_dim, jnp.int32)
  else:
    w_live = jnp.where(dead[:, None], 0.0, w)
    scale, zero = jax.vmap(lambda g: _fit(g, maxq, symj))(
        w_live.reshape(in_dim // group_size, group_size, out_dim))
    gidx = jnp.arange(in_dim, dtype=jnp.int32) // group_size
  fac = obs.damped_inverse_cholesky(hessian, percdamp=percdamp)
  hook = jax.tree_util.Partial(_grid_row, scale, zero, gidx, maxq)
  res = obs.obs_sweep(w, fac.hinv_upper, blocksize=blocksize, prune=obs.Prune.nm(n, m),
                      quantize=hook, dead=fac.dead)
  sparse = compress_nm(res.kernel, n, m, mask=res.keep)
  gc = None if group_size is None else group_size // m * n
  rows = jnp.zeros(rows_c, jnp.int32) if gc is None else jnp.arange(rows_c) // gc
  s_r, z_r = scale[rows], zero[rows]
  u = jnp.clip(jnp.round(sparse.values.astype(jnp.float32) / s_r) + z_r, 0.0, maxq)
  half = 2 ** (bits - 1)
  q = QArray(values=pack((u - half).astype(jnp.int8), bits), scale=scale,
             zero=None if sym else (zero - half).astype(jnp.int8), shape=(rows_c, out_dim),
             bits=bits, fmt="int", group_size=gc, dtype=kernel.dtype)
  return with_values(sparse, q)

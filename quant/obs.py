"""The Optimal Brain Surgeon (OBS) column solver shared by SparseGPT and GPTQ.

A layer `y = x @ kernel` with an `[in, out]` kernel W and calibration inputs X
(`[tokens, in]`) has the per-output objective `||(W - What)^T X^T||^2`, whose
Hessian is `H = X^T X` (`[in, in]`, any positive scale). Both solvers walk the
INPUT rows of the kernel (the columns of the `[out, in]` torch weight in the
SparseGPT / GPTQ papers) in order: each row is fixed (pruned and / or
quantized), and its error is spread over the not-yet-fixed rows through the
upper Cholesky factor U of the damped inverse Hessian (`U^T U = (H + damp I)^-1`).

`damped_inverse_cholesky` builds U, retrying with 10x damping while the
factorisation fails; `obs_sweep` runs the blocked sweep with lazy batched
updates: inside a block of `blocksize` rows the update is row by row, and the
rest of the kernel is updated once per block with the block's accumulated
errors. Pruning is optional (`Prune.unstructured(s)` or `Prune.nm(n, m)`), as
is a traced `quantize(row, index)` function (GPTQ passes only `quantize`; joint
SparseGPT prune + quantize passes both). Computation is float32 throughout.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Bool, Float

Quantize = Callable[[Array, Array], Array]


class DampedInverse(NamedTuple):
  """Upper Cholesky factor of the damped inverse Hessian and how it was obtained."""
  hinv_upper: Float[Array, "in in"]  # U, upper triangular, U^T U = (H + damp I)^-1
  dead: Bool[Array, "in"]  # input channels with a zero Hessian diagonal (or given as dead)
  damp: float  # absolute value added to the diagonal
  percdamp: float  # relative damping actually used (damp = percdamp * mean(diag(H)))


class SweepResult(NamedTuple):
  """Output of `obs_sweep`."""
  kernel: Array  # updated kernel, the input dtype; pruned entries are exactly 0
  keep: Bool[Array, "in out"]  # True = kept
  loss: Float[Array, ""]  # sum over entries of (w - q)^2 / (2 d^2), as in SparseGPT / GPTQ


@dataclasses.dataclass(frozen=True)
class Prune:
  """What `obs_sweep` prunes: an unstructured fraction or an N:M pattern.

  Unstructured (`sparsity` in [0, 1)): at the start of each block, the
  `int(rows * out * sparsity)` entries of the block with the lowest
  `w^2 / U_ii^2` are pruned (one threshold over all outputs of the block, as
  SparseGPT does). N:M (`1 <= n <= m`): at the start of every group of m
  consecutive input rows, each output keeps its n entries with the highest
  `w^2 / U_ii^2` and prunes the other m - n (the paper convention: 2:4 keeps 2
  of 4; n == m prunes nothing). Ties go to the lower index (it is pruned first).
  """
  sparsity: float | None = None
  n: int | None = None
  m: int | None = None

  def __post_init__(self):
    if (self.sparsity is None) == (self.n is None and self.m is None):
      raise ValueError(f"Prune needs exactly one of sparsity or (n, m); got sparsity="
                       f"{self.sparsity!r}, n={self.n!r}, m={self.m!r}")
    if self.sparsity is not None:
      _check_fraction(self.sparsity, "sparsity")
    else:
      _check_nm(self.n, self.m)

  @classmethod
  def unstructured(cls, sparsity: float) -> Prune:
    """Prunes `int(numel * sparsity)` entries of every block (block-wide threshold)."""
    return cls(sparsity=sparsity)

  @classmethod
  def nm(cls, n: int, m: int) -> Prune:
    """Keeps at most n of every m consecutive inputs, per output."""
    return cls(n=n, m=m)

  @property
  def is_nm(self) -> bool:
    """True for an N:M pattern, False for unstructured."""
    return self.sparsity is None


def _check_fraction(value, name: str) -> float:
  if isinstance(value, bool) or not isinstance(value, (int, float, np.floating, np.integer)):
    raise ValueError(f"{name}={value!r} must be a number in the range [0, 1)")
  if math.isnan(value) or not 0.0 <= value < 1.0:
    raise ValueError(f"{name}={value!r} is outside the valid range [0, 1)")
  return float(value)


def _is_int(value) -> bool:
  return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def _check_nm(n, m) -> None:
  if not _is_int(m) or m < 1:
    raise ValueError(f"m={m!r} must be a positive int (the N:M group size)")
  if not _is_int(n) or not 1 <= n <= m:
    raise ValueError(f"n={n!r} must be an int in the range [1, m={m}] (entries kept per group)")


@jax.jit
def _all_finite(x: Array) -> Array:
  return jnp.all(jnp.isfinite(x))


def _check_finite(x: Array, name: str) -> None:
  if not bool(_all_finite(x)):
    raise ValueError(f"{name} contains NaN or Inf values; it must be finite")


def _as_float(x, name: str) -> Array:
  x = jnp.asarray(x)
  if not (jnp.issubdtype(x.dtype, jnp.floating) or jnp.issubdtype(x.dtype, jnp.integer)):
    raise ValueError(f"{name} must be a real numeric array, got dtype {x.dtype}")
  return x


def check_hessian(hessian, in_dim: int | None = None) -> Array:
  """Returns `hessian` as float32, or raises ValueError unless square, [in, in] and finite."""
  hessian = _as_float(hessian, "hessian")
  if hessian.ndim != 2 or hessian.shape[0] != hessian.shape[1]:
    raise ValueError(f"hessian must be a square 2-D [in, in] array, got shape "
                     f"{tuple(hessian.shape)}")
  if in_dim is not None and hessian.shape[0] != in_dim:
    raise ValueError(f"hessian shape {tuple(hessian.shape)} does not match the kernel's input "
                     f"dim {in_dim}; expected ({in_dim}, {in_dim})")
  _check_finite(hessian, "hessian")
  return hessian.astype(jnp.float32)


def _check_dead(dead, in_dim: int) -> Array | None:
  if dead is None:
    return None
  dead = jnp.asarray(dead)
  if dead.shape != (in_dim,) or dead.dtype != jnp.bool_:
    raise ValueError(f"dead must be a boolean [in]=({in_dim},) array, got shape "
                     f"{tuple(dead.shape)} dtype {dead.dtype}")
  return dead


def check_percdamp(percdamp) -> float:
  """Returns `percdamp` as a float, or raises ValueError unless it is a finite number > 0."""
  if (isinstance(percdamp, bool) or not isinstance(percdamp, (int, float, np.floating))
      or not math.isfinite(percdamp) or percdamp <= 0):
    raise ValueError(f"percdamp={percdamp!r} must be a finite number > 0")
  return float(percdamp)


def damped_inverse_cholesky(hessian: Float[Array, "in in"], *, percdamp: float = 0.01,
                            max_retries: int = 4, dead: Bool[Array, "in"] | None = None
                            ) -> DampedInverse:
  """Upper Cholesky factor of `(H + percdamp * mean(diag H) I)^-1`, retrying with 10x damping.

  Dead input channels (zero diagonal, plus any marked in `dead`) are decoupled:
  their Hessian row and column are zeroed and the diagonal entry set to 1 (for a
  PSD Hessian a zero diagonal already implies a zero row, so this matches
  SparseGPT's `H[dead, dead] = 1`); the caller zeroes those kernel rows
  (`obs_sweep(..., dead=...)` does). The damping is relative to the mean
  diagonal after that fix. If a factorisation yields non-finite values or a
  non-positive diagonal, `percdamp` is multiplied by 10, up to `max_retries`
  times, then ValueError is raised.

  Args:
    hessian: `[in, in]`, proportional to X^T X; finite.
    percdamp: relative damping, > 0.
    max_retries: extra attempts with 10x, 100x, ... the damping (>= 0).
    dead: optional boolean `[in]` of channels to treat as dead as well.
  """
  hessian = check_hessian(hessian)
  check_percdamp(percdamp)
  if not _is_int(max_retries) or max_retries < 0:
    raise ValueError(f"max_retries={max_retries!r} must be an int >= 0")
  n = hessian.shape[0]
  dead = jnp.zeros((n,), jnp.bool_) if dead is None else _check_dead(dead, n)
  pd = float(percdamp)
  for _ in range(max_retries + 1):
    u, dead_out, mean_diag, ok = _factor(hessian, jnp.float32(pd), dead)
    if bool(ok):
      return DampedInverse(u, dead_out, pd * float(mean_diag), pd)
    pd_last, pd = pd, pd * 10.0
  raise ValueError(f"hessian ({n}x{n}) stays singular after {max_retries} damping retries "
                   f"(percdamp up to {pd_last:g}, mean diagonal {float(mean_diag):g}); it must "
                   f"be symmetric positive semi-definite, e.g. proportional to X^T X")


@jax.jit
def _factor(h: Array, percdamp: Array, dead: Array) -> tuple[Array, Array, Array, Array]:
  """(U, dead, mean diag, ok) for one damping attempt."""
  n = h.shape[0]
  diag = jnp.diagonal(h)
  dead = dead | (diag == 0)
  h = jnp.where(dead[:, None] | dead[None, :], 0.0, h)
  diag = jnp.where(dead, 1.0, diag)
  mean_diag = jnp.mean(diag)
  eye = jnp.eye(n, dtype=h.dtype)
  h = h * (1 - eye) + jnp.diag(diag + percdamp * mean_diag)
  lower = jnp.linalg.cholesky(h)
  hinv = jax.scipy.linalg.cho_solve((lower, True), eye)
  upper = jnp.linalg.cholesky(hinv, upper=True)
  ok = jnp.all(jnp.isfinite(upper)) & jnp.all(jnp.diagonal(upper) > 0)
  return upper, dead, mean_diag, ok


def obs_sweep(kernel: Float[Array, "in out"], hinv_upper: Float[Array, "in in"], *,
              blocksize: int = 128, prune: Prune | None = None, quantize: Quantize | None = None,
              dead: Bool[Array, "in"] | None = None) -> SweepResult:
  """Blocked OBS sweep over the input rows of `kernel`; returns (kernel, keep, loss).

  For each input row i (in order, blocks of `blocksize` rows): the row's keep
  mask is taken from `prune` (see `Prune`; all kept when None), then
  `q = where(keep, quantize(where(keep, w, 0), i), 0)` (no quantize: the masked
  row), `err = (w - q) / U_ii`, and later rows of the block get
  `-= U[i, j] * err`; after the block the remaining rows get
  `-= U[block, rest]^T @ errors` at once (SparseGPT's lazy batch update).

  Args:
    kernel: `[in, out]`, finite.
    hinv_upper: `[in, in]` upper Cholesky factor of the damped inverse Hessian
      (`damped_inverse_cholesky(...).hinv_upper`); entries below the diagonal
      are ignored.
    blocksize: rows per block (>= 1); with N:M pruning, m must divide
      `min(blocksize, in)`.
    prune: None (no pruning), `Prune.unstructured(s)` or `Prune.nm(n, m)`.
    quantize: optional traced `quantize(row[out], index) -> row[out]` returning
      fake-quantized values (its parameters fixed before the sweep). Pass a
      `jax.tree_util.Partial(fn, *arrays)` (called as `fn(*arrays, row, index)`)
      to reuse the compiled sweep across layers with different quantizer
      parameters; a plain function is a compile-cache key by identity.
    dead: optional boolean `[in]`; those kernel rows are zeroed before the sweep.
  """
  kernel = jnp.asarray(kernel)
  if not jnp.issubdtype(kernel.dtype, jnp.floating):
    raise ValueError(f"kernel must be a floating array, got dtype {kernel.dtype}")
  if kernel.ndim != 2:
    raise ValueError(f"kernel must be a 2-D [in, out] array, got shape {tuple(kernel.shape)}")
  in_dim, out_dim = kernel.shape
  if not _is_int(blocksize) or blocksize < 1:
    raise ValueError(f"blocksize={blocksize!r} must be an int >= 1")
  if prune is not None and not isinstance(prune, Prune):
    raise ValueError(f"prune={prune!r} must be None or a quant.obs.Prune")
  if quantize is not None and not callable(quantize):
    raise ValueError(f"quantize={quantize!r} must be None or a callable (row, index) -> row")
  bs = min(int(blocksize), in_dim)
  if prune is not None and prune.is_nm:
    check_nm_fits(prune.n, prune.m, in_dim, blocksize)
  hinv_upper = _as_float(hinv_upper, "hinv_upper")
  if hinv_upper.shape != (in_dim, in_dim):
    raise ValueError(f"hinv_upper shape {tuple(hinv_upper.shape)} does not match the kernel's "
                     f"input dim; expected ({in_dim}, {in_dim})")
  dead = _check_dead(dead, in_dim)
  _check_finite(kernel, "kernel")
  _check_finite(hinv_upper, "hinv_upper")

  nblocks = -(-in_dim // bs)
  if prune is not None and not prune.is_nm:
    counts = [min(bs, in_dim - b * bs) for b in range(nblocks)]
    k_blocks = jnp.asarray([int(c * out_dim * prune.sparsity) for c in counts], jnp.int32)
  else:
    k_blocks = jnp.zeros((nblocks,), jnp.int32)
  mode = "none" if prune is None else ("nm" if prune.is_nm else "unstructured")
  # Only m is static (it sets the group shape): n is traced, so every n:m shares a compile.
  m = prune.m if mode == "nm" else None
  n = jnp.int32(prune.n if mode == "nm" else 0)
  dead = jnp.zeros((in_dim,), jnp.bool_) if dead is None else dead
  if quantize is not None and not isinstance(quantize, jax.tree_util.Partial):
    quantize = jax.tree_util.Partial(quantize)
  w, keep, loss = _sweep(kernel.astype(jnp.float32), hinv_upper.astype(jnp.float32), k_blocks,
                         n, quantize, dead, bs=bs, mode=mode, m=m)
  return SweepResult(w.astype(kernel.dtype), keep, loss)


def check_nm_fits(n: int, m: int, in_dim: int, blocksize: int) -> None:
  """Raises ValueError unless n:m is valid and m divides both `in_dim` and `min(blocksize, in)`."""
  _check_nm(n, m)
  if in_dim % m:
    raise ValueError(f"m={m} must divide the kernel's input dim {in_dim}")
  if min(blocksize, in_dim) % m:
    raise ValueError(f"blocksize={blocksize} must be a multiple of m={m} (or >= the input dim "
                     f"{in_dim}) so that N:M groups do not straddle blocks")


def _stable_rank(x: Array) -> Array:
  """Position of each entry (along the last axis) in a stable ascending sort."""
  order = jnp.argsort(x, axis=-1, stable=True)
  return jnp.argsort(order, axis=-1, stable=True)


def _lowest(x: Array, k: Array) -> Array:
  """True for the k lowest entries of 1-D `x`; ties at the threshold go to the lower index.

  Same result as `_stable_rank(x) < k`, with one value sort and a cumsum instead of two
  argsorts.
  """
  t = jnp.sort(x)[jnp.maximum(k - 1, 0)]
  less, eq = x < t, x == t
  ties = eq & (jnp.cumsum(eq, dtype=jnp.int32) <= k - jnp.sum(less, dtype=jnp.int32))
  return (less | ties) & (k > 0)


def pad_to_blocks(kernel: Array, hinv: Array, dead: Array, bs: int) -> tuple[Array, Array, int]:
  """(kernel with dead rows zeroed, upper factor, padding): both padded to whole blocks.

  Padded rows are zero weights with an identity factor, so they never change real
  rows and every block of a sweep shares one compiled body.
  """
  in_dim = kernel.shape[0]
  pad = -(-in_dim // bs) * bs - in_dim
  kernel = jnp.pad(jnp.where(dead[:, None], 0.0, kernel), ((0, pad), (0, 0)))
  hinv = jnp.pad(jnp.triu(hinv), ((0, pad), (0, pad)))
  hinv = hinv + jnp.diag((jnp.arange(in_dim + pad) >= in_dim).astype(hinv.dtype))
  return kernel, hinv, pad


@functools.partial(jax.jit, static_argnames=("bs", "mode", "m"))
def _sweep(kernel: Array, hinv: Array, k_blocks: Array, n: Array, quantize, dead: Array, *,
           bs: int, mode: str, m: int | None) -> tuple[Array, Array, Array]:
  in_dim, out_dim = kernel.shape
  nblocks = k_blocks.shape[0]
  w_all, hinv, pad = pad_to_blocks(kernel, hinv, dead, bs)
  valid = jnp.arange(in_dim + pad) < in_dim
  keep_all = jnp.ones(w_all.shape, jnp.bool_)
  hi = jax.lax.Precision.HIGHEST

  def block(b, carry):
    w_all, keep_all, loss = carry
    i1 = b * bs
    w1 = jax.lax.dynamic_slice_in_dim(w_all, i1, bs, 0)
    rows = jax.lax.dynamic_slice_in_dim(hinv, i1, bs, 0)  # [bs, in_pad]
    h1 = jax.lax.dynamic_slice_in_dim(rows, i1, bs, 1)  # [bs, bs]
    d = jnp.diagonal(h1)
    if mode == "unstructured":
      score = w1 ** 2 / (d ** 2)[:, None]
      score = jnp.where(jax.lax.dynamic_slice_in_dim(valid, i1, bs)[:, None], score, jnp.inf)
      keep1 = ~_lowest(score.reshape(-1), k_blocks[b]).reshape(w1.shape)
    else:
      keep1 = jnp.ones(w1.shape, jnp.bool_)

    def column(i, inner):
      w1, keep1, err1, loss = inner
      if mode == "nm":

        def choose(keep1):
          grp = jax.lax.dynamic_slice_in_dim(w1, i, m, 0)
          dg = jax.lax.dynamic_slice_in_dim(d, i, m)
          score = (grp ** 2 / (dg ** 2)[:, None]).T  # [out, m]
          gk = (_stable_rank(score) >= m - n).T
          return jax.lax.dynamic_update_slice_in_dim(keep1, gk, i, 0)

        keep1 = jax.lax.cond(i % m == 0, choose, lambda k: k, keep1)
      w = w1[i]
      kr = keep1[i]
      q = jnp.where(kr, w, 0.0)
      if quantize is not None:  # padded rows (index >= in) stay exactly 0
        q = jnp.where(kr & (i1 + i < in_dim), quantize(q, i1 + i).astype(jnp.float32), 0.0)
      e = (w - q) / d[i]
      loss = loss + 0.5 * jnp.sum(e ** 2)
      # h1 is upper triangular: rows before i are untouched; row i is then set to q exactly.
      w1 = w1 - h1[i][:, None] * e[None, :]
      w1 = jax.lax.dynamic_update_index_in_dim(w1, q, i, 0)
      err1 = jax.lax.dynamic_update_index_in_dim(err1, e, i, 0)
      return w1, keep1, err1, loss

    init = (w1, keep1, jnp.zeros_like(w1), loss)
    w1, keep1, err1, loss = jax.lax.fori_loop(0, bs, column, init)
    # Lazy batch update of every later row (rows up to the block end get zero or are
    # overwritten: `rows` is zero left of the block).
    w_all = w_all - jnp.matmul(rows.T, err1, precision=hi)
    w_all = jax.lax.dynamic_update_slice_in_dim(w_all, w1, i1, 0)
    keep_all = jax.lax.dynamic_update_slice_in_dim(keep_all, keep1, i1, 0)
    return w_all, keep_all, loss

  w_all, keep_all, loss = jax.lax.fori_loop(0, nblocks, block,
                                            (w_all, keep_all, jnp.zeros((), jnp.float32)))
  return w_all[:in_dim], keep_all[:in_dim], loss

"""One-shot, one-layer pruning from calibration statistics: Wanda and SparseGPT.

Kernels are `[in, out]` (`y = x @ kernel`); the papers' torch weight is
`kernel.T`, so their "per output row" is a column here and their N:M groups
of consecutive input columns are runs of m consecutive ROWS of our kernel.

Patterns: `sparsity=s` (unstructured) or `n=, m=` (N:M, the paper convention:
at most n NON-ZEROS kept in every group of m consecutive inputs per output;
2:4 keeps 2 of 4, 1:4 keeps 1 of 4, 4:8 keeps 4 of 8; n == m is a no-op).
Exactly one of the two must be given.

* Wanda (Sun et al. 2023): score `|W_ij| * ||X_i||_2`; unstructured prunes
  exactly `int(in * s)` entries of every output column (lowest score, stable
  sort: ties prune the lower input index first, like the official
  `torch.sort(stable=True)`); N:M keeps the n highest scores per group
  (`sparsity.structures.nm_mask`). No weight update.
* SparseGPT (Frantar & Alistarh 2023): the OBS sweep of `quant.obs` with a
  relative-damped inverse Hessian; unstructured masks are chosen per block of
  `blocksize` inputs with one threshold over all outputs (as upstream), N:M per
  group. Kept weights are updated to compensate; pruned entries are exactly 0.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from jaxtyping import Array, Bool, Float

from quant import obs
from sparsity import rules as rules_lib
from sparsity import structures


class Pruned(NamedTuple):
  """A pruned (and possibly updated) kernel and its keep mask (True = keep)."""
  kernel: Array
  keep: Bool[Array, "in out"]


@jax.jit
def _all_finite(x: Array) -> Array:
  return jnp.all(jnp.isfinite(x))


@jax.jit
def _finite_nonneg(x: Array) -> tuple[Array, Array]:
  return jnp.all(jnp.isfinite(x)), jnp.all(x >= 0)


def _check_kernel(kernel) -> Array:
  kernel = jnp.asarray(kernel)
  if not jnp.issubdtype(kernel.dtype, jnp.floating):
    raise ValueError(f"kernel must be a floating array, got dtype {kernel.dtype}")
  if kernel.ndim != 2:
    raise ValueError(f"kernel must be a 2-D [in, out] array, got shape {tuple(kernel.shape)}")
  if not bool(_all_finite(kernel)):
    raise ValueError("kernel contains NaN or Inf values; it must be finite")
  return kernel


def _check_pattern(in_dim: int, sparsity, n, m) -> tuple[float | None, tuple[int, int] | None]:
  """(sparsity, None) or (None, (n, m)) after validation."""
  if sparsity is not None and (n is not None or m is not None):
    raise ValueError(f"give either sparsity= or n=, m= (not both); got sparsity={sparsity!r}, "
                     f"n={n!r}, m={m!r}")
  if sparsity is None and n is None and m is None:
    raise ValueError("give one of sparsity= (in [0, 1)) or n=, m= (N:M); got neither")
  if sparsity is not None:
    return rules_lib.check_sparsity(sparsity), None
  return None, structures.check_nm(n, m, in_dim, what="the kernel's input dim")


def _check_x_norm(x_norm, in_dim: int) -> Array:
  x_norm = jnp.asarray(x_norm)
  if not (jnp.issubdtype(x_norm.dtype, jnp.floating) or jnp.issubdtype(x_norm.dtype, jnp.integer)):
    raise ValueError(f"x_norm must be a real numeric array, got dtype {x_norm.dtype}")
  if x_norm.shape != (in_dim,):
    raise ValueError(f"x_norm shape {tuple(x_norm.shape)} must be [in]=({in_dim},)")
  finite, nonneg = _finite_nonneg(x_norm)
  if not bool(finite):
    raise ValueError("x_norm contains NaN or Inf values; it must be finite")
  if not bool(nonneg):
    raise ValueError("x_norm has negative entries; it must be the L2 norms (>= 0) of the inputs")
  return x_norm.astype(jnp.float32)


def wanda_score(kernel: Float[Array, "in out"], x_norm: Float[Array, "in"]) -> Array:
  """Wanda importance `|W_ij| * x_norm_i` (float32, `[in, out]`)."""
  kernel = _check_kernel(kernel)
  return _score(kernel, _check_x_norm(x_norm, kernel.shape[0]))


@jax.jit
def _score(kernel: Array, x_norm: Array) -> Array:
  return jnp.abs(kernel.astype(jnp.float32)) * x_norm[:, None]


@jax.jit
def _per_column_keep(kernel: Array, x_norm: Array, k: Array) -> Array:
  # k is traced: one compile per shape serves every sparsity.
  return structures.stable_rank(_score(kernel, x_norm).T).T >= k


def wanda_mask(kernel: Float[Array, "in out"], x_norm: Float[Array, "in"], *,
               sparsity: float | None = None, n: int | None = None, m: int | None = None
               ) -> Bool[Array, "in out"]:
  """Wanda keep mask: per output column, `int(in * sparsity)` lowest scores pruned, or N:M."""
  kernel = _check_kernel(kernel)
  s, nm = _check_pattern(kernel.shape[0], sparsity, n, m)
  x_norm = _check_x_norm(x_norm, kernel.shape[0])
  if nm is not None:
    return structures.nm_mask(_score(kernel, x_norm), *nm, axis=0)
  return _per_column_keep(kernel, x_norm, jnp.int32(int(kernel.shape[0] * s)))


def wanda_layer(kernel: Float[Array, "in out"], x_norm: Float[Array, "in"], *,
                sparsity: float | None = None, n: int | None = None, m: int | None = None
                ) -> Array:
  """Wanda-pruned kernel (pruned entries exactly 0, kept ones unchanged); see `wanda_mask`."""
  keep = wanda_mask(kernel, x_norm, sparsity=sparsity, n=n, m=m)
  kernel = jnp.asarray(kernel)
  return jnp.where(keep, kernel, jnp.zeros((), kernel.dtype))


def sparsegpt_prune(kernel: Float[Array, "in out"], hessian: Float[Array, "in in"], *,
                    sparsity: float | None = None, n: int | None = None, m: int | None = None,
                    blocksize: int = 128, percdamp: float = 0.01,
                    quantize: obs.Quantize | None = None) -> Pruned:
  """SparseGPT on one layer: (updated kernel, keep mask); `quantize` enables joint mode.

  Args:
    kernel: `[in, out]`, finite.
    hessian: `[in, in]`, proportional to X^T X (any positive scale), finite.
    sparsity / n, m: unstructured fraction in [0, 1), or N:M (1 <= n <= m, m
      divides `in`; m must also divide `min(blocksize, in)`).
    blocksize: inputs per lazy-update block (>= 1); unstructured masks are
      chosen per block.
    percdamp: relative damping (> 0), raised 10x on a failed factorisation.
    quantize: optional traced `quantize(row[out], index) -> row[out]` applied to
      kept weights during the sweep (its parameters fixed beforehand).
  """
  kernel = _check_kernel(kernel)
  in_dim = kernel.shape[0]
  s, nm = _check_pattern(in_dim, sparsity, n, m)
  if isinstance(blocksize, bool) or not isinstance(blocksize, int) or blocksize < 1:
    raise ValueError(f"blocksize={blocksize!r} must be an int >= 1")
  if nm is not None:
    obs.check_nm_fits(*nm, in_dim, blocksize)
  obs.check_percdamp(percdamp)
  if quantize is not None and not callable(quantize):
    raise ValueError(f"quantize={quantize!r} must be None or a callable (row, index) -> row")
  hessian = obs.check_hessian(hessian, in_dim)
  spec = obs.Prune.nm(*nm) if nm is not None else obs.Prune.unstructured(s)
  fac = obs.damped_inverse_cholesky(hessian, percdamp=percdamp)
  res = obs.obs_sweep(kernel, fac.hinv_upper, blocksize=blocksize, prune=spec,
                      quantize=quantize, dead=fac.dead)
  return Pruned(res.kernel, res.keep)


def sparsegpt_layer(kernel: Float[Array, "in out"], hessian: Float[Array, "in in"], *,
                    sparsity: float | None = None, n: int | None = None, m: int | None = None,
                    blocksize: int = 128, percdamp: float = 0.01) -> Array:
  """SparseGPT-pruned and updated kernel (pruned entries exactly 0); see `sparsegpt_prune`."""
  return sparsegpt_prune(kernel, hessian, sparsity=sparsity, n=n, m=m, blocksize=blocksize,
                         percdamp=percdamp).kernel

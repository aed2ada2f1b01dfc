"""Int8 weight-only matmul: x[M, K] float @ (w int8[K, N] * scale[1, N]) -> [M, N].

TPU-style Pallas kernel: a grid over (M / bm, N / bn, K / bk) with the K axis
innermost and sequential, an f32 accumulator in VMEM scratch that is zeroed on
the first K step and scaled, cast and written on the last. The int8 tile is
converted to x.dtype inside the kernel (exact: |code| <= 128 fits bf16/f16), and
because the scale is per output channel it factors out of the K sum, so it is
applied once to the f32 accumulator. HBM traffic for W is therefore one byte
per weight.

Shapes need not divide the block sizes. A block larger than its dimension is
shrunk to the full dimension (always a legal TPU block); otherwise the grid is
`cdiv` and edge blocks are partial: rows of M and columns of N past the end only
produce output elements that are dropped on write, and the K tail is masked to
zero in-kernel (out-of-bounds reads are unspecified, NaN under the
interpreters). Nothing is padded or copied in HBM.

`reference` has the same signature and computes the same math with one XLA dot.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu
from jaxtyping import Array, Float, Int8

X_DTYPES = ("float32", "bfloat16", "float16")
DEFAULT_BLOCKS = dict(bm=256, bk=512, bn=512)
# Mosaic TPU tiling: the last two block dims must be multiples of (8, 128)
# unless they span the whole array dimension.
TPU_ALIGN = dict(bm=8, bk=128, bn=128)


def check_args(x, w_int8, scale, bm, bk, bn) -> None:
  """Raises ValueError naming the bad argument; shared by kernel, reference and api."""
  if getattr(x, "ndim", None) != 2 or jnp.dtype(x.dtype).name not in X_DTYPES:
    raise ValueError(
        f"x must be a 2-D array with dtype in {X_DTYPES}; got shape "
        f"{getattr(x, 'shape', None)} dtype {getattr(x, 'dtype', None)}")
  if getattr(w_int8, "ndim", None) != 2 or w_int8.dtype != jnp.int8:
    raise ValueError(
        f"w_int8 must be a 2-D int8 array [K, N]; got shape {getattr(w_int8, 'shape', None)} "
        f"dtype {getattr(w_int8, 'dtype', None)}")
  if x.shape[1] != w_int8.shape[0]:
    raise ValueError(
        f"x.shape[1]={x.shape[1]} must equal w_int8.shape[0]={w_int8.shape[0]} (K)")
  if tuple(getattr(scale, "shape", ())) != (1, w_int8.shape[1]):
    raise ValueError(
        f"scale must have shape (1, N)=(1, {w_int8.shape[1]}) (per output channel); got "
        f"{getattr(scale, 'shape', None)}")
  if not jnp.issubdtype(scale.dtype, jnp.floating):
    raise ValueError(f"scale must be floating point; got dtype {scale.dtype}")
  for name, b in (("bm", bm), ("bk", bk), ("bn", bn)):
    if b is not None and (not isinstance(b, int) or isinstance(b, bool) or b < 1):
      raise ValueError(f"{name}={b!r} must be a positive integer (or None for the default)")


def fit_blocks(M: int, K: int, N: int, bm=None, bk=None, bn=None) -> tuple[int, int, int]:
  """Block sizes actually used: the defaults for None, shrunk to the dimension when larger."""
  dims = dict(bm=M, bk=K, bn=N)
  given = dict(bm=bm, bk=bk, bn=bn)
  out = []
  for name in ("bm", "bk", "bn"):
    b = given[name] if given[name] is not None else DEFAULT_BLOCKS[name]
    out.append(min(b, max(dims[name], 1)))
  return tuple(out)


def check_tpu_alignment(M: int, K: int, N: int, blocks: tuple[int, int, int]) -> None:
  """Raises ValueError if a block violates Mosaic TPU tiling (needed only when compiling)."""
  for name, b, dim in zip(("bm", "bk", "bn"), blocks, (M, K, N), strict=True):
    align = TPU_ALIGN[name]
    if b != dim and b % align:
      raise ValueError(
          f"{name}={b} must be a multiple of {align} or equal the full dimension ({dim}) "
          "for the compiled TPU kernel")


def reference(x: Float[Array, "M K"], w_int8: Int8[Array, "K N"], scale: Float[Array, "1 N"],
              *, bm=None, bk=None, bn=None, interpret=None) -> Float[Array, "M N"]:
  """Pure-jnp int8 weight-only matmul (block and interpret arguments are accepted, unused)."""
  del interpret
  check_args(x, w_int8, scale, bm, bk, bn)
  acc = jnp.matmul(x, w_int8.astype(x.dtype), preferred_element_type=jnp.float32)
  return (acc * scale.astype(jnp.float32)).astype(x.dtype)


def _kernel(x_ref, w_ref, s_ref, o_ref, acc_ref, *, k_size: int, bk: int):
  k = pl.program_id(2)
  n_k = pl.num_programs(2)

  @pl.when(k == 0)
  def _init():
    acc_ref[...] = jnp.zeros_like(acc_ref)

  def accumulate(mask_tail: bool):
    x = x_ref[...]
    w = w_ref[...].astype(x.dtype)
    if mask_tail:
      # The last K block reads past the end; zero both operands there (a product
      # with unspecified data could be NaN, so multiplying by a 0/1 mask is not enough).
      col = k * bk + jax.lax.broadcasted_iota(jnp.int32, x.shape, 1)
      row = k * bk + jax.lax.broadcasted_iota(jnp.int32, w.shape, 0)
      x = jnp.where(col < k_size, x, jnp.zeros_like(x))
      w = jnp.where(row < k_size, w, jnp.zeros_like(w))
    acc_ref[...] += jnp.dot(x, w, preferred_element_type=jnp.float32)

  if k_size % bk:
    pl.when(k < n_k - 1)(lambda: accumulate(False))
    pl.when(k == n_k - 1)(lambda: accumulate(True))
  else:
    accumulate(False)

  @pl.when(k == n_k - 1)
  def _finalize():
    o_ref[...] = (acc_ref[...] * s_ref[...].astype(jnp.float32)).astype(o_ref.dtype)


@functools.partial(jax.jit, static_argnames=("bm", "bk", "bn", "interpret"))
def _call(x, w_int8, scale, *, bm: int, bk: int, bn: int, interpret):
  M, K = x.shape
  N = w_int8.shape[1]
  grid = (pl.cdiv(M, bm), pl.cdiv(N, bn), pl.cdiv(K, bk))
  cost = pl.CostEstimate(
      flops=2 * M * N * K, transcendentals=0,
      bytes_accessed=K * N + 4 * N + (M * K + M * N) * jnp.dtype(x.dtype).itemsize)
  return pl.pallas_call(
      functools.partial(_kernel, k_size=K, bk=bk),
      out_shape=jax.ShapeDtypeStruct((M, N), x.dtype),
      grid=grid,
      in_specs=[
          pl.BlockSpec((bm, bk), lambda i, j, k: (i, k)),
          pl.BlockSpec((bk, bn), lambda i, j, k: (k, j)),
          pl.BlockSpec((1, bn), lambda i, j, k: (0, j)),
      ],
      out_specs=pl.BlockSpec((bm, bn), lambda i, j, k: (i, j)),
      scratch_shapes=[pltpu.VMEM((bm, bn), jnp.float32)],
      compiler_params=pltpu.CompilerParams(
          dimension_semantics=("parallel", "parallel", "arbitrary")),
      cost_estimate=cost,
      interpret=interpret,
      name="int8_matmul",
  )(x, w_int8, scale)


def int8_matmul(x: Float[Array, "M K"], w_int8: Int8[Array, "K N"], scale: Float[Array, "1 N"],
                *, bm: int | None = None, bk: int | None = None, bn: int | None = None,
                interpret=False) -> Float[Array, "M N"]:
  """Pallas int8 weight-only matmul; `interpret` is False, True or `pltpu.InterpretParams()`."""
  check_args(x, w_int8, scale, bm, bk, bn)
  M, K = x.shape
  N = w_int8.shape[1]
  blocks = fit_blocks(M, K, N, bm, bk, bn)
  if not interpret:
    check_tpu_alignment(M, K, N, blocks)
    if jax.default_backend() != "tpu":
      raise ValueError(
          f"interpret=False compiles the Mosaic TPU kernel, but the backend is "
          f"{jax.default_backend()!r}; pass interpret=True or pltpu.InterpretParams(), or use "
          "pallas_kernels.api.int8_matmul, which picks a path per backend")
  if 0 in (M, K, N):  # an empty grid would leave the output unwritten
    return jnp.zeros((M, N), x.dtype)
  bm_, bk_, bn_ = blocks
  return _call(x, w_int8, scale, bm=bm_, bk=bk_, bn=bn_, interpret=interpret)

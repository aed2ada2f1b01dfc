"""Low-bit matmul kernels for TPU (Mosaic): weight-only int8 / int4 and W8A8.

Called by `pallas_kernels.lowbit` with checked arguments and fitted blocks (see there for
the semantics and the block rules). Grid (cdiv(M, bm), cdiv(N, bn), K / bk) with the K axis
innermost and "arbitrary"; an f32 (W8A8: int32) accumulator in VMEM is zeroed on the first
K step and scaled, cast and written on the last.

Weight-only: each code tile is dequantized in VMEM to x.dtype and fed to the MXU; W never
exists dequantized in HBM. Per channel, the scale factors out of the K sum and is applied
once to the accumulator (the tile is just `code - zero`, exact in bf16); per group, the
[bk / g, bn] scale (and zero) tile is expanded to the tile's rows with a broadcast and
reshape and applied before the dot. The grouped scales are passed reshaped (free) to
[K / bk, bk / g, N] so their block spans whole trailing dimensions whatever bk / g is.

int4: rather than interleaving unpacked nibbles into rows in-kernel, the wrapper splits x
into its even and odd K columns (x[:, 0::2], x[:, 1::2], each [M, K / 2]), and a step
computes acc += x_even @ dequant(low nibbles) + x_odd @ dequant(high nibbles) on one
[bk / 2, bn] byte tile. Nibbles are sign-extended in int32: low = (v << 28) >> 28,
high = v >> 4.

Tails: M and N edge blocks are partial (rows / columns past the end only feed output
elements that are dropped on write). The per-channel K tail is masked to zero in-kernel
on both operands (out-of-bounds reads are unspecified, NaN under the interpreters); a
grouped K is tiled exactly (bk divides K).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu
from jaxtyping import Array, Float, Int8

DIMS = ("parallel", "parallel", "arbitrary")


def unpack_tile(v: Int8[Array, "r n"]) -> tuple[Array, Array]:
  """(low, high) signed nibbles of an int8 tile, as int32."""
  v = v.astype(jnp.int32)
  return (v << 28) >> 28, v >> 4


def expand_rows(t: Array, rep: int) -> Array:
  """[tg, n] -> [tg * rep, n], row j repeated `rep` times (per-group values to rows)."""
  if rep == 1:
    return t
  tg, n = t.shape
  return jnp.broadcast_to(t[:, None, :], (tg, rep, n)).reshape(tg * rep, n)


def _precision(dtype):
  return jax.lax.Precision.HIGHEST if jnp.dtype(dtype) == jnp.float32 else None


def _mask_k(x, c, k, bkc: int, kc: int):
  """Zeros the K tail: columns of x and rows of the code tile at or past kc."""
  col = k * bkc + jax.lax.broadcasted_iota(jnp.int32, x.shape, 1)
  row = k * bkc + jax.lax.broadcasted_iota(jnp.int32, c.shape, 0)
  return jnp.where(col < kc, x, jnp.zeros_like(x)), jnp.where(row < kc, c, jnp.zeros_like(c))


def _weight_only_kernel(*refs, bits: int, grouped: bool, has_zeros: bool, kc: int, bkc: int,
                        rep: int):
  n_x = 2 if bits == 4 else 1
  x_refs = refs[:n_x]
  v_ref, s_ref = refs[n_x], refs[n_x + 1]
  z_ref = refs[n_x + 2] if has_zeros else None
  o_ref, acc_ref = refs[-2], refs[-1]
  dtype = x_refs[0].dtype
  precision = _precision(dtype)
  k = pl.program_id(2)
  n_k = pl.num_programs(2)

  @pl.when(k == 0)
  def _init():
    acc_ref[...] = jnp.zeros_like(acc_ref)

  plain = bits == 8 and not grouped and not has_zeros  # the tile is just the codes

  def accumulate(mask_tail: bool):
    v = v_ref[...]
    xs = [r[...] for r in x_refs]
    # Codes widened first (int8 -> x.dtype or int32), so any masking selects on 16 / 32-bit
    # vectors rather than int8 ones.
    if bits == 4:
      parts = unpack_tile(v)
    else:
      parts = (v.astype(dtype) if plain else v.astype(jnp.int32),)
    if mask_tail:
      masked = [_mask_k(x, c, k, bkc, kc) for x, c in zip(xs, parts, strict=True)]
      xs, parts = [m[0] for m in masked], [m[1] for m in masked]
    if grouped:
      s = expand_rows(s_ref[...].astype(jnp.float32), rep)
      z = expand_rows(z_ref[...].astype(jnp.float32), rep) if has_zeros else None
    else:
      s, z = None, (z_ref[...].astype(jnp.float32) if has_zeros else None)
    acc = acc_ref[...]
    for x, c in zip(xs, parts, strict=True):
      if plain:
        w = c
      elif z is None and s is None:
        w = c.astype(jnp.float32).astype(dtype)
      else:
        w = c.astype(jnp.float32)
        w = w - z if z is not None else w
        w = w * s if s is not None else w
        w = w.astype(dtype)
      acc += jnp.dot(x, w, preferred_element_type=jnp.float32, precision=precision)
    acc_ref[...] = acc

  if kc % bkc:
    pl.when(k < n_k - 1)(lambda: accumulate(False))
    pl.when(k == n_k - 1)(lambda: accumulate(True))
  else:
    accumulate(False)

  @pl.when(k == n_k - 1)
  def _finalize():
    acc = acc_ref[...]
    if not grouped:
      acc = acc * s_ref[...].astype(jnp.float32)
    o_ref[...] = acc.astype(o_ref.dtype)


@functools.partial(jax.jit, static_argnames=("bits", "group_size", "bm", "bn", "bk",
                                             "interpret"))
def weight_only(x: Float[Array, "M K"], values: Int8[Array, "Kc N"],
                scales: Float[Array, "G N"], zeros: Array | None, *, bits: int,
                group_size: int | None, bm: int, bn: int, bk: int, interpret
                ) -> Float[Array, "M N"]:
  """The weight-only TPU kernel (arguments checked and blocks fitted by `lowbit`)."""
  M, K = x.shape
  N = values.shape[1]
  g = group_size
  if bits == 4:
    xs = [x[:, 0::2], x[:, 1::2]]
    kc, bkc = K // 2, bk // 2
  else:
    xs = [x]
    kc, bkc = K, bk
  grid = (pl.cdiv(M, bm), pl.cdiv(N, bn), pl.cdiv(kc, bkc))
  x_spec = pl.BlockSpec((bm, bkc), lambda i, j, k: (i, k))
  v_spec = pl.BlockSpec((bkc, bn), lambda i, j, k: (k, j))
  params = [scales] + ([zeros] if zeros is not None else [])
  if g is None:
    p_specs = [pl.BlockSpec((1, bn), lambda i, j, k: (0, j))] * len(params)
    rep = 1
  else:
    tg = bk // g
    params = [p.reshape(K // bk, tg, N) for p in params]
    p_specs = [pl.BlockSpec((pl.Squeezed(), tg, bn), lambda i, j, k: (k, 0, j))] * len(params)
    rep = g // 2 if bits == 4 else g
  itemsize = jnp.dtype(x.dtype).itemsize
  cost = pl.CostEstimate(
      flops=2 * M * N * K, transcendentals=0,
      bytes_accessed=values.size + sum(p.size * p.dtype.itemsize for p in params)
      + (M * K + M * N) * itemsize)
  kernel = functools.partial(_weight_only_kernel, bits=bits, grouped=g is not None,
                             has_zeros=zeros is not None, kc=kc, bkc=bkc, rep=rep)
  return pl.pallas_call(
      kernel,
      out_shape=jax.ShapeDtypeStruct((M, N), x.dtype),
      grid=grid,
      in_specs=[x_spec] * len(xs) + [v_spec] + p_specs,
      out_specs=pl.BlockSpec((bm, bn), lambda i, j, k: (i, j)),
      scratch_shapes=[pltpu.VMEM((bm, bn), jnp.float32)],
      compiler_params=pltpu.CompilerParams(dimension_semantics=DIMS),
      cost_estimate=cost,
      interpret=interpret,
      name=f"lowbit_int{bits}_matmul",
  )(*xs, values, *params)


def _w8a8_kernel(x_ref, xs_ref, w_ref, ws_ref, o_ref, acc_ref, *, k_size: int, bk: int):
  k = pl.program_id(2)
  n_k = pl.num_programs(2)

  @pl.when(k == 0)
  def _init():
    acc_ref[...] = jnp.zeros_like(acc_ref)

  def accumulate(mask_tail: bool):
    x, w = x_ref[...], w_ref[...]
    if mask_tail:  # select in int32 (int8 vector selects are not on every TPU), then narrow
      x, w = _mask_k(x.astype(jnp.int32), w.astype(jnp.int32), k, bk, k_size)
      x, w = x.astype(jnp.int8), w.astype(jnp.int8)
    acc_ref[...] += jnp.dot(x, w, preferred_element_type=jnp.int32)

  if k_size % bk:
    pl.when(k < n_k - 1)(lambda: accumulate(False))
    pl.when(k == n_k - 1)(lambda: accumulate(True))
  else:
    accumulate(False)

  @pl.when(k == n_k - 1)
  def _finalize():
    y = acc_ref[...].astype(jnp.float32) * xs_ref[...] * ws_ref[...]
    o_ref[...] = y.astype(o_ref.dtype)


@functools.partial(jax.jit, static_argnames=("out_dtype", "bm", "bn", "bk", "interpret"))
def w8a8(x_codes: Int8[Array, "M K"], x_scales: Float[Array, "M 1"],
         w_codes: Int8[Array, "K N"], w_scales: Float[Array, "1 N"], *, out_dtype, bm: int,
         bn: int, bk: int, interpret) -> Float[Array, "M N"]:
  """The W8A8 TPU kernel: int8 x int8 -> int32 accumulator, scales applied on finalize."""
  M, K = x_codes.shape
  N = w_codes.shape[1]
  cost = pl.CostEstimate(
      flops=2 * M * N * K, transcendentals=0,
      bytes_accessed=M * K + K * N + 4 * (M + N) + M * N * jnp.dtype(out_dtype).itemsize)
  return pl.pallas_call(
      functools.partial(_w8a8_kernel, k_size=K, bk=bk),
      out_shape=jax.ShapeDtypeStruct((M, N), out_dtype),
      grid=(pl.cdiv(M, bm), pl.cdiv(N, bn), pl.cdiv(K, bk)),
      in_specs=[
          pl.BlockSpec((bm, bk), lambda i, j, k: (i, k)),
          pl.BlockSpec((bm, 1), lambda i, j, k: (i, 0)),
          pl.BlockSpec((bk, bn), lambda i, j, k: (k, j)),
          pl.BlockSpec((1, bn), lambda i, j, k: (0, j)),
      ],
      out_specs=pl.BlockSpec((bm, bn), lambda i, j, k: (i, j)),
      scratch_shapes=[pltpu.VMEM((bm, bn), jnp.int32)],
      compiler_params=pltpu.CompilerParams(dimension_semantics=DIMS),
      cost_estimate=cost,
      interpret=interpret,
      name="lowbit_w8a8_matmul",
  )(x_codes, x_scales, w_codes, w_scales)

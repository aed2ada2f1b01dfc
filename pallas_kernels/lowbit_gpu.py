"""Low-bit matmul kernels for NVIDIA GPUs (the Pallas Triton lowering).

Called by `pallas_kernels.lowbit` with checked arguments and fitted blocks (powers of two
>= 16; see there for the semantics). Grid (cdiv(M, bm), cdiv(N, bn)); each program runs a
`lax.fori_loop` over the K tiles, loading them from whole-array refs with
`plgpu.load(ref.at[pl.ds(...), pl.ds(...)], mask=..., other=0)`, and accumulates in f32
(W8A8: int32) registers. Every tail (M, N and K) is masked on load and the output store is
masked, so shapes need not be powers of two.

The dequantization matches the TPU kernel: the code tile is converted in-kernel (int4
nibbles sign-extended in int32, low = (v << 28) >> 28, high = v >> 4) to x.dtype; per
channel the scale is applied once to the accumulator; per group a K tile lies inside one
group (bk divides g), so its scale / zero tile is one [1, bn] row applied before the dot.
int4 uses the same even / odd split of x as the TPU kernel (x[:, 0::2] against the low
nibbles, x[:, 1::2] against the high ones), made in the wrapper. f32 dots ask for IEEE
precision (Triton's default would be TF32).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu_triton
from jaxtyping import Array, Float, Int8

NUM_STAGES = 3


def num_warps(bm: int, bn: int) -> int:
  """4 warps up to 64 x 128 output tiles, 8 above."""
  return 4 if bm * bn <= 64 * 128 else 8


def unpack_tile(v: Int8[Array, "r n"]) -> tuple[Array, Array]:
  """(low, high) signed nibbles of an int8 tile, as int32."""
  v = v.astype(jnp.int32)
  return (v << 28) >> 28, v >> 4


def _precision(dtype):
  return lax.Precision.HIGHEST if jnp.dtype(dtype) == jnp.float32 else None


def _weight_only_kernel(*refs, bits: int, grouped: bool, has_zeros: bool, M: int, N: int,
                        kc: int, bm: int, bn: int, bkc: int, rows_per_group: int):
  n_x = 2 if bits == 4 else 1
  x_refs = refs[:n_x]
  v_ref, s_ref = refs[n_x], refs[n_x + 1]
  z_ref = refs[n_x + 2] if has_zeros else None
  o_ref = refs[-1]
  dtype = x_refs[0].dtype
  precision = _precision(dtype)
  i, j = pl.program_id(0), pl.program_id(1)
  rmask = (i * bm + jnp.arange(bm)) < M
  cmask = (j * bn + jnp.arange(bn)) < N

  def param_row(ref, r):  # [1, bn] f32 (scale or zero row r)
    return plgpu_triton.load(ref.at[pl.ds(r, 1), pl.ds(j * bn, bn)], mask=cmask[None, :],
                             other=0).astype(jnp.float32)

  if not grouped:
    s_row = param_row(s_ref, 0)
    z_row = param_row(z_ref, 0) if has_zeros else None

  def body(k, acc):
    kmask = (k * bkc + jnp.arange(bkc)) < kc
    v = plgpu_triton.load(v_ref.at[pl.ds(k * bkc, bkc), pl.ds(j * bn, bn)],
                          mask=kmask[:, None] & cmask[None, :], other=0)
    parts = unpack_tile(v) if bits == 4 else (v,)
    if grouped:
      grp = (k * bkc) // rows_per_group
      s, z = param_row(s_ref, grp), (param_row(z_ref, grp) if has_zeros else None)
    else:
      s, z = None, z_row
    for x_ref, c in zip(x_refs, parts, strict=True):
      x = plgpu_triton.load(x_ref.at[pl.ds(i * bm, bm), pl.ds(k * bkc, bkc)],
                            mask=rmask[:, None] & kmask[None, :], other=0)
      w = c.astype(jnp.float32)
      w = w - z if z is not None else w
      w = w * s if s is not None else w
      acc += jnp.dot(x, w.astype(dtype), preferred_element_type=jnp.float32,
                     precision=precision)
    return acc

  acc = lax.fori_loop(0, pl.cdiv(kc, bkc), body, jnp.zeros((bm, bn), jnp.float32))
  if not grouped:
    acc = acc * s_row
  plgpu_triton.store(o_ref.at[pl.ds(i * bm, bm), pl.ds(j * bn, bn)], acc.astype(o_ref.dtype),
                     mask=rmask[:, None] & cmask[None, :])


@functools.partial(jax.jit, static_argnames=("bits", "group_size", "bm", "bn", "bk",
                                             "interpret"))
def weight_only(x: Float[Array, "M K"], values: Int8[Array, "Kc N"],
                scales: Float[Array, "G N"], zeros: Array | None, *, bits: int,
                group_size: int | None, bm: int, bn: int, bk: int, interpret
                ) -> Float[Array, "M N"]:
  """The weight-only GPU kernel (arguments checked and blocks fitted by `lowbit`)."""
  M, K = x.shape
  N = values.shape[1]
  if bits == 4:
    xs = [x[:, 0::2], x[:, 1::2]]
    kc, bkc = K // 2, bk // 2
  else:
    xs = [x]
    kc, bkc = K, bk
  g = group_size
  params = [scales] + ([zeros] if zeros is not None else [])
  kernel = functools.partial(
      _weight_only_kernel, bits=bits, grouped=g is not None, has_zeros=zeros is not None,
      M=M, N=N, kc=kc, bm=bm, bn=bn, bkc=bkc,
      rows_per_group=(g // 2 if bits == 4 else g) if g is not None else 1)
  itemsize = jnp.dtype(x.dtype).itemsize
  cost = pl.CostEstimate(
      flops=2 * M * N * K, transcendentals=0,
      bytes_accessed=values.size + sum(p.size * p.dtype.itemsize for p in params)
      + (M * K + M * N) * itemsize)
  return pl.pallas_call(
      kernel,
      out_shape=jax.ShapeDtypeStruct((M, N), x.dtype),
      grid=(pl.cdiv(M, bm), pl.cdiv(N, bn)),
      compiler_params=plgpu_triton.CompilerParams(num_warps=num_warps(bm, bn),
                                                  num_stages=NUM_STAGES),
      cost_estimate=cost,
      interpret=interpret,
      name=f"lowbit_int{bits}_matmul_gpu",
  )(*xs, values, *params)


def _w8a8_kernel(x_ref, xs_ref, w_ref, ws_ref, o_ref, *, M: int, N: int, K: int, bm: int,
                 bn: int, bk: int):
  i, j = pl.program_id(0), pl.program_id(1)
  rmask = (i * bm + jnp.arange(bm)) < M
  cmask = (j * bn + jnp.arange(bn)) < N

  def body(k, acc):
    kmask = (k * bk + jnp.arange(bk)) < K
    x = plgpu_triton.load(x_ref.at[pl.ds(i * bm, bm), pl.ds(k * bk, bk)],
                          mask=rmask[:, None] & kmask[None, :], other=0)
    w = plgpu_triton.load(w_ref.at[pl.ds(k * bk, bk), pl.ds(j * bn, bn)],
                          mask=kmask[:, None] & cmask[None, :], other=0)
    return acc + jnp.dot(x, w, preferred_element_type=jnp.int32)

  acc = lax.fori_loop(0, pl.cdiv(K, bk), body, jnp.zeros((bm, bn), jnp.int32))
  xs = plgpu_triton.load(xs_ref.at[pl.ds(i * bm, bm), pl.ds(0, 1)], mask=rmask[:, None],
                         other=0)
  ws = plgpu_triton.load(ws_ref.at[pl.ds(0, 1), pl.ds(j * bn, bn)], mask=cmask[None, :],
                         other=0)
  y = acc.astype(jnp.float32) * xs * ws
  plgpu_triton.store(o_ref.at[pl.ds(i * bm, bm), pl.ds(j * bn, bn)], y.astype(o_ref.dtype),
                     mask=rmask[:, None] & cmask[None, :])


@functools.partial(jax.jit, static_argnames=("out_dtype", "bm", "bn", "bk", "interpret"))
def w8a8(x_codes: Int8[Array, "M K"], x_scales: Float[Array, "M 1"],
         w_codes: Int8[Array, "K N"], w_scales: Float[Array, "1 N"], *, out_dtype, bm: int,
         bn: int, bk: int, interpret) -> Float[Array, "M N"]:
  """The W8A8 GPU kernel: int8 x int8 -> int32 accumulator, scales applied at the end."""
  M, K = x_codes.shape
  N = w_codes.shape[1]
  cost = pl.CostEstimate(
      flops=2 * M * N * K, transcendentals=0,
      bytes_accessed=M * K + K * N + 4 * (M + N) + M * N * jnp.dtype(out_dtype).itemsize)
  return pl.pallas_call(
      functools.partial(_w8a8_kernel, M=M, N=N, K=K, bm=bm, bn=bn, bk=bk),
      out_shape=jax.ShapeDtypeStruct((M, N), out_dtype),
      grid=(pl.cdiv(M, bm), pl.cdiv(N, bn)),
      compiler_params=plgpu_triton.CompilerParams(num_warps=num_warps(bm, bn),
                                                  num_stages=NUM_STAGES),
      cost_estimate=cost,
      interpret=interpret,
      name="lowbit_w8a8_matmul_gpu",
  )(x_codes, x_scales, w_codes, w_scales)

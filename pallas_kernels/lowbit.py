"""Low-bit matmul x[M, K] @ W[K, N]: int8 / int4 weights (weight-only) and W8A8.

The public entry points of this kernel family, their argument checks, block choice and
the pure-jnp `reference` / `w8a8_reference` (same signatures; tuning and platform
arguments accepted and ignored). The kernels live in `lowbit_tpu` (Mosaic) and
`lowbit_gpu` (Triton); block sizes default to `tuning.lookup`.

Weight format (as `model.qarray` stores it; this package re-implements the decoding):
  bits=8: `values` int8 [K, N], the codes.
  bits=4: `values` int8 [K // 2, N]; byte r holds code row 2r in its low nibble and row
    2r + 1 in its high nibble, each a signed two's-complement field (codes in [-8, 7]).
  scales: [1, N] per output channel (group_size None or 0), or [K // g, N] per group of g
    input rows (group j covers rows [j g, (j + 1) g); g divides K, and is even for int4).
  zeros: None (symmetric) or shaped like scales, in code units: w = (code - zero) * scale.

Weight-only: y = x @ W with f32 accumulation, in x.dtype; the kernels dequantize each
code tile in-kernel (to x.dtype, the scale on the f32 accumulator when it is per
channel), never a dequantized W in HBM. The reference dequantizes W in f32, casts it to
x.dtype and runs one dot, as `model.ops` does.

W8A8 (act_bits=8; bits=8, symmetric, scales [1, N] or [1, 1]): x is quantized per token
as `model.ops.quantize_act` does (s_x = max|x_row| / 127, 1 for a zero row; codes =
clip(round(x / s_x), -127, 127)), then y = (x_codes @ w_codes in int32) * s_x * w_scale,
in x.dtype. `w8a8_matmul` is that int8 x int8 -> int32 kernel on given codes.

Platforms: `platform=None` picks by `jax.default_backend()`; interpreting
(`interpret=True`) on a CPU runs the TPU kernel unless platform="gpu";
`pltpu.InterpretParams()` interprets the TPU kernel only. Compiling (interpret=False) on
a CPU is a ValueError: there is no compiled kernel for it (`pallas_kernels.api` falls back
to the reference there).

Block sizes (block_m, block_n, block_k, over M, N and logical K rows): None takes
`tuning.lookup` (a measured table entry, else the heuristic). TPU: a block larger than its
dimension shrinks to it; grouped K tiles hold whole groups and divide K; compiled blocks
are multiples of (8, 128) (int4 K tiles: 256, the x halves carry block_k / 2 lanes) or
span the whole dimension. GPU: powers of two >= 16 (int4 and W8A8 K tiles >= 32), shrunk
to the next power of two of a smaller dimension, tails masked; a grouped K tile divides
the group. Anything else is a ValueError before launch; empty dimensions return zeros.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.experimental.pallas import tpu as pltpu
from jaxtyping import Array, Float, Int8

from pallas_kernels import lowbit_gpu, lowbit_tpu, tuning

X_DTYPES = ("float32", "bfloat16", "float16")
BITS = (4, 8)
ACT_BITS = (None, 8)
PLATFORMS = ("tpu", "gpu")
BLOCK_NAMES = ("block_m", "block_n", "block_k")


def _shape(a) -> tuple | None:
  s = getattr(a, "shape", None)
  return None if s is None else tuple(s)


def _dtype_name(a) -> str | None:
  d = getattr(a, "dtype", None)
  return None if d is None else jnp.dtype(d).name


def _is_int(v) -> bool:
  return isinstance(v, int) and not isinstance(v, bool)


def check_blocks(block_m=None, block_n=None, block_k=None) -> None:
  """Each block size is None or a positive int."""
  for name, b in zip(BLOCK_NAMES, (block_m, block_n, block_k), strict=True):
    if b is not None and (not _is_int(b) or b < 1):
      raise ValueError(f"{name}={b!r} must be a positive integer (or None for the tuned "
                       "default)")


def check_platform(platform) -> None:
  if platform is not None and platform not in PLATFORMS:
    raise ValueError(f"platform={platform!r}; valid: None (by backend), 'tpu', 'gpu'")


def check_args(x, values, scales, *, bits, group_size, zeros=None, act_bits=None,
               block_m=None, block_n=None, block_k=None, platform=None) -> int | None:
  """Raises ValueError naming the bad argument; returns the group size (None: per channel)."""
  if _shape(x) is None or len(_shape(x)) != 2 or _dtype_name(x) not in X_DTYPES:
    raise ValueError(f"x must be a 2-D array [M, K] with dtype in {X_DTYPES}; got shape "
                     f"{_shape(x)} dtype {_dtype_name(x)}")
  if not _is_int(bits) or bits not in BITS:
    raise ValueError(f"bits={bits!r}; valid: {BITS}")
  M, K = _shape(x)
  if _shape(values) is None or len(_shape(values)) != 2 or _dtype_name(values) != "int8":
    want = "[K, N]" if bits == 8 else "[K // 2, N] (two int4 codes per byte)"
    raise ValueError(f"values must be a 2-D int8 array {want}; got shape {_shape(values)} "
                     f"dtype {_dtype_name(values)}")
  rows, N = _shape(values)
  if bits == 4 and rows * 2 != K:
    raise ValueError(f"values.shape[0]={rows} must be K // 2 = {K / 2:g} for bits=4 (x.shape"
                     f"[1]=K={K}, two codes per byte along K); K must be even")
  if bits == 8 and rows != K:
    raise ValueError(f"values.shape[0]={rows} must equal x.shape[1]=K={K} for bits=8")
  if group_size is not None and (not _is_int(group_size) or group_size < 0):
    raise ValueError(f"group_size={group_size!r} must be None / 0 (per channel) or a "
                     "positive integer dividing K")
  g = group_size or None
  if g is not None:
    if K % g:
      raise ValueError(f"group_size={g} must divide K={K}")
    if bits == 4 and g % 2:
      raise ValueError(f"group_size={g} must be even for bits=4 (a byte holds two rows)")
  if act_bits not in ACT_BITS:
    raise ValueError(f"act_bits={act_bits!r}; valid: None (weight-only), 8 (W8A8)")
  if act_bits == 8:
    if bits != 8:
      raise ValueError(f"act_bits=8 (W8A8) requires bits=8; got bits={bits}")
    if zeros is not None:
      raise ValueError("act_bits=8 (W8A8) requires symmetric weights (zeros=None)")
    if g is not None:
      raise ValueError(f"act_bits=8 (W8A8) requires per-channel or per-tensor scales; got "
                       f"group_size={g}")
    if _shape(scales) not in ((1, N), (1, 1)):
      raise ValueError(f"scales must have shape (1, N)=(1, {N}) or (1, 1) for act_bits=8; "
                       f"got {_shape(scales)}")
  else:
    want = (1, N) if g is None else (K // g, N)
    if _shape(scales) != want:
      what = "per channel" if g is None else f"K // group_size = {K} // {g} groups"
      raise ValueError(f"scales must have shape {want} ({what}); got {_shape(scales)}")
  if not jnp.issubdtype(scales.dtype, jnp.floating):
    raise ValueError(f"scales must be floating point; got dtype {_dtype_name(scales)}")
  if zeros is not None:
    if _shape(zeros) != _shape(scales):
      raise ValueError(f"zeros must have the shape of scales {_shape(scales)}; got "
                       f"{_shape(zeros)}")
    if _dtype_name(zeros) != "int8" and not jnp.issubdtype(zeros.dtype, jnp.floating):
      raise ValueError(f"zeros must be int8 or floating point; got dtype {_dtype_name(zeros)}")
  check_blocks(block_m, block_n, block_k)
  check_platform(platform)
  return g


def check_w8a8_args(x_codes, x_scales, w_codes, w_scales, out_dtype, block_m=None,
                    block_n=None, block_k=None, platform=None) -> None:
  """Raises ValueError naming the bad argument of `w8a8_matmul`."""
  if _shape(x_codes) is None or len(_shape(x_codes)) != 2 or _dtype_name(x_codes) != "int8":
    raise ValueError(f"x_codes must be a 2-D int8 array [M, K]; got shape {_shape(x_codes)} "
                     f"dtype {_dtype_name(x_codes)}")
  M, K = _shape(x_codes)
  if _shape(w_codes) is None or len(_shape(w_codes)) != 2 or _dtype_name(w_codes) != "int8":
    raise ValueError(f"w_codes must be a 2-D int8 array [K, N]; got shape {_shape(w_codes)} "
                     f"dtype {_dtype_name(w_codes)}")
  if _shape(w_codes)[0] != K:
    raise ValueError(f"w_codes.shape[0]={_shape(w_codes)[0]} must equal x_codes.shape[1]="
                     f"K={K}")
  N = _shape(w_codes)[1]
  if _shape(x_scales) != (M, 1) or _dtype_name(x_scales) != "float32":
    raise ValueError(f"x_scales must be float32 of shape (M, 1)=({M}, 1) (per token); got "
                     f"shape {_shape(x_scales)} dtype {_dtype_name(x_scales)}")
  if _shape(w_scales) not in ((1, N), (1, 1)) or not jnp.issubdtype(w_scales.dtype,
                                                                    jnp.floating):
    raise ValueError(f"w_scales must be floating point of shape (1, N)=(1, {N}) or (1, 1); "
                     f"got shape {_shape(w_scales)} dtype {_dtype_name(w_scales)}")
  if jnp.dtype(out_dtype).name not in X_DTYPES:
    raise ValueError(f"out_dtype={jnp.dtype(out_dtype).name}; valid: {X_DTYPES}")
  check_blocks(block_m, block_n, block_k)
  check_platform(platform)


def resolve_platform(platform, interpret) -> str:
  """The kernel ("tpu" / "gpu") a call runs; ValueError where none can."""
  check_platform(platform)
  if not isinstance(interpret, (bool, pltpu.InterpretParams)):
    raise ValueError(f"interpret={interpret!r}; valid: False, True, pltpu.InterpretParams()")
  backend = jax.default_backend()
  if isinstance(interpret, pltpu.InterpretParams):
    if platform == "gpu":
      raise ValueError("pltpu.InterpretParams() interprets the TPU kernel; got platform="
                       "'gpu' (use interpret=True for the GPU kernel)")
    return "tpu"
  if interpret:
    return platform or ("gpu" if backend == "gpu" else "tpu")
  if backend not in PLATFORMS:
    raise ValueError(f"no compiled low-bit Pallas kernel exists for backend {backend!r} "
                     "(only 'tpu' and 'gpu'); pass interpret=True or "
                     "pltpu.InterpretParams(), or use pallas_kernels.api.lowbit_matmul, "
                     "which falls back to the reference")
  if platform is not None and platform != backend:
    raise ValueError(f"platform={platform!r} cannot be compiled on backend {backend!r}; pass "
                     "interpret=True to interpret it")
  return backend


def fit_blocks(kernel: str, platform: str, M: int, K: int, N: int, *, bits: int,
               group_size: int | None, block_m: int, block_n: int, block_k: int,
               compiled: bool) -> tuple[int, int, int]:
  """The (bm, bn, bk) a kernel runs for the given sizes, shrunk where larger than the
  dimension; ValueError where they do not tile (see the module docstring)."""
  g = group_size or None
  if platform == "tpu":
    bm, bn, bk = min(block_m, M), min(block_n, N), min(block_k, K)
    if bits == 4 and bk % 2:
      raise ValueError(f"block_k={bk} must be even for bits=4 (K tiles of whole bytes)")
    if g is not None and (bk % g or K % bk):
      raise ValueError(f"block_k={bk} must be a multiple of group_size={g} and divide K={K} "
                       "(a TPU K tile holds whole groups)")
    if compiled:
      lane = tuning.TPU_LANE * (2 if bits == 4 else 1)
      for name, b, dim, align in (("block_m", bm, M, tuning.TPU_SUBLANE),
                                  ("block_n", bn, N, tuning.TPU_LANE),
                                  ("block_k", bk, K, lane)):
        if b != dim and b % align:
          raise ValueError(f"{name}={b} must be a multiple of {align} or equal the full "
                           f"dimension ({dim}) for the compiled TPU kernel (Mosaic tiling)")
    return bm, bn, bk
  kmin = tuning.min_gpu_block_k(kernel, bits)
  out = []
  for name, b, dim, least in (("block_m", block_m, M, tuning.GPU_MIN_TILE),
                              ("block_n", block_n, N, tuning.GPU_MIN_TILE),
                              ("block_k", block_k, K, kmin)):
    if b & (b - 1) or b < least:
      raise ValueError(f"{name}={b} must be a power of two >= {least} for the GPU (Triton) "
                       "kernel")
    out.append(min(b, max(tuning.next_pow2(dim), least)))
  bm, bn, bk = out
  if g is not None and g % bk:
    raise ValueError(f"block_k={bk} must divide group_size={g} for the GPU kernel (one scale "
                     f"row per K tile); the group needs a power-of-two divisor >= {kmin}")
  return bm, bn, bk


def pick_blocks(kernel: str, platform: str, M: int, K: int, N: int, *, bits: int,
                group_size: int | None, block_m=None, block_n=None, block_k=None,
                compiled: bool) -> tuple[int, int, int]:
  """Given blocks, completed from `tuning.lookup` (a table entry that does not fit these
  sizes gives way to `tuning.default_blocks`), then `fit_blocks`."""
  given = dict(block_m=block_m, block_n=block_n, block_k=block_k)
  kw = dict(bits=bits, group_size=group_size, platform=platform)
  if None in given.values():
    for source in (tuning.lookup, tuning.default_blocks):
      tuned = source(kernel, M, K, N, **kw)
      blocks = {k: v if v is not None else tuned[k] for k, v in given.items()}
      try:
        return fit_blocks(kernel, platform, M, K, N, bits=bits, group_size=group_size,
                          compiled=compiled, **blocks)
      except ValueError:
        if source is tuning.default_blocks:
          raise
  return fit_blocks(kernel, platform, M, K, N, bits=bits, group_size=group_size,
                    compiled=compiled, **given)


def unpack_int4(values: Int8[Array, "Kh N"]) -> Int8[Array, "K N"]:
  """int4 codes [2 Kh, N] from bytes [Kh, N]: row 2r = low nibble, 2r + 1 = high (signed)."""
  v = values.astype(jnp.int32)
  low, high = (v << 28) >> 28, v >> 4
  return jnp.stack([low, high], axis=1).reshape(2 * v.shape[0], v.shape[1]).astype(jnp.int8)


def dequantize(values: Int8[Array, "Kc N"], scales: Float[Array, "G N"], zeros=None, *,
               bits: int, group_size: int | None) -> Float[Array, "K N"]:
  """W = (codes - zeros) * scales in f32, per-group rows repeated over their group."""
  codes = unpack_int4(values) if bits == 4 else values
  c = codes.astype(jnp.float32)
  s = scales.astype(jnp.float32)
  z = None if zeros is None else zeros.astype(jnp.float32)
  if group_size:
    s = jnp.repeat(s, group_size, axis=0)
    z = None if z is None else jnp.repeat(z, group_size, axis=0)
  if z is not None:
    c = c - z
  return c * s


def quantize_act(x: Float[Array, "M K"]) -> tuple[Int8[Array, "M K"], Float[Array, "M 1"]]:
  """Per-token symmetric int8 (as `model.ops.quantize_act`): codes and s_x = max|x| / 127."""
  x32 = x.astype(jnp.float32)
  s = jnp.max(jnp.abs(x32), axis=-1, keepdims=True) / 127.0
  s = jnp.where(s > 0, s, 1.0)
  return jnp.clip(jnp.round(x32 / s), -127, 127).astype(jnp.int8), s


def _precision(dtype):
  return jax.lax.Precision.HIGHEST if jnp.dtype(dtype) == jnp.float32 else None


def w8a8_reference(x_codes: Int8[Array, "M K"], x_scales: Float[Array, "M 1"],
                   w_codes: Int8[Array, "K N"], w_scales: Float[Array, "1 N"], *,
                   out_dtype=jnp.float32, interpret=False, platform=None, block_m=None,
                   block_n=None, block_k=None) -> Float[Array, "M N"]:
  """(x_codes @ w_codes in int32) * x_scales * w_scales, cast to out_dtype (pure jnp)."""
  del interpret
  check_w8a8_args(x_codes, x_scales, w_codes, w_scales, out_dtype, block_m, block_n,
                  block_k, platform)
  acc = jnp.matmul(x_codes, w_codes, preferred_element_type=jnp.int32)
  y = acc.astype(jnp.float32) * x_scales * w_scales.astype(jnp.float32)
  return y.astype(out_dtype)


def reference(x: Float[Array, "M K"], values: Int8[Array, "Kc N"], scales: Float[Array, "G N"],
              *, bits: int, group_size: int | None, zeros: Array | None = None,
              act_bits: int | None = None, interpret=False, block_m=None, block_n=None,
              block_k=None, platform=None) -> Float[Array, "M N"]:
  """Pure-jnp low-bit matmul (tuning, interpret and platform arguments accepted, unused)."""
  del interpret
  g = check_args(x, values, scales, bits=bits, group_size=group_size, zeros=zeros,
                 act_bits=act_bits, block_m=block_m, block_n=block_n, block_k=block_k,
                 platform=platform)
  if act_bits == 8:
    x_codes, s_x = quantize_act(x)
    return w8a8_reference(x_codes, s_x, values, scales, out_dtype=x.dtype)
  w = dequantize(values, scales, zeros, bits=bits, group_size=g).astype(x.dtype)
  y = jnp.matmul(x, w, preferred_element_type=jnp.float32, precision=_precision(x.dtype))
  return y.astype(x.dtype)


def _kernels(platform: str):
  return lowbit_tpu if platform == "tpu" else lowbit_gpu


def w8a8_matmul(x_codes: Int8[Array, "M K"], x_scales: Float[Array, "M 1"],
                w_codes: Int8[Array, "K N"], w_scales: Float[Array, "1 N"], *,
                out_dtype=jnp.float32, interpret=False, platform: str | None = None,
                block_m: int | None = None, block_n: int | None = None,
                block_k: int | None = None) -> Float[Array, "M N"]:
  """Pallas int8 x int8 -> int32 matmul; the per-token x per-channel (or per-tensor) scales
  are applied to the int32 accumulator in the kernel's finalize."""
  check_w8a8_args(x_codes, x_scales, w_codes, w_scales, out_dtype, block_m, block_n,
                  block_k, platform)
  target = resolve_platform(platform, interpret)
  M, K = x_codes.shape
  N = w_codes.shape[1]
  if 0 in (M, K, N):
    return jnp.zeros((M, N), out_dtype)
  bm, bn, bk = pick_blocks("w8a8", target, M, K, N, bits=8, group_size=None,
                           block_m=block_m, block_n=block_n, block_k=block_k,
                           compiled=interpret is False)
  w_scales = jnp.broadcast_to(w_scales.astype(jnp.float32), (1, N))
  return _kernels(target).w8a8(x_codes, x_scales, w_codes, w_scales,
                               out_dtype=jnp.dtype(out_dtype), bm=bm, bn=bn, bk=bk,
                               interpret=interpret)


def lowbit_matmul(x: Float[Array, "M K"], values: Int8[Array, "Kc N"],
                  scales: Float[Array, "G N"], *, bits: int, group_size: int | None,
                  zeros: Array | None = None, act_bits: int | None = None, interpret=False,
                  block_m: int | None = None, block_n: int | None = None,
                  block_k: int | None = None, platform: str | None = None
                  ) -> Float[Array, "M N"]:
  """x @ W for a quantized W (see the module docstring), on the Pallas kernel of
  `platform` (None: by backend); `interpret` is False, True or `pltpu.InterpretParams()`."""
  g = check_args(x, values, scales, bits=bits, group_size=group_size, zeros=zeros,
                 act_bits=act_bits, block_m=block_m, block_n=block_n, block_k=block_k,
                 platform=platform)
  target = resolve_platform(platform, interpret)
  M, K = x.shape
  N = values.shape[1]
  if 0 in (M, K, N):  # an empty grid would leave the output unwritten
    return jnp.zeros((M, N), x.dtype)
  if act_bits == 8:
    x_codes, s_x = quantize_act(x)
    return w8a8_matmul(x_codes, s_x, values, scales, out_dtype=x.dtype, interpret=interpret,
                       platform=target, block_m=block_m, block_n=block_n, block_k=block_k)
  bm, bn, bk = pick_blocks("weight_only", target, M, K, N, bits=bits, group_size=g,
                           block_m=block_m, block_n=block_n, block_k=block_k,
                           compiled=interpret is False)
  return _kernels(target).weight_only(x, values, scales, zeros, bits=bits, group_size=g,
                                      bm=bm, bn=bn, bk=bk, interpret=interpret)

"""The one dispatch point for weight use.

Every matmul against a parameter goes through `dot` (or `einsum`). A weight
may be a plain array, a `model.qarray.QArray`, or a `model.nm_array.NMArray` (N:M
compressed, its values plain or a QArray). This module is the only place that may
call a low-bit Pallas kernel.

NMArray ("load as sparse, compute as dense"): on CPU the kernel is expanded to its
dense `[in, out]` form (values dequantized at their compressed size, then placed by
their packed in-group indices) and enters an ordinary dot; that dense copy is the only
one. Accelerators would take a sparse kernel here instead (2:4 sparse tensor cores
consume the compressed values and 2-bit indices directly).

W8A8 (a QArray with `act_bits=8`: int8 codes, symmetric, one scale per output channel
or per tensor): x is quantized per token (row of the flattened `[M, K]` x) to int8 with
s_x = max|x| / 127 (1 for a zero row), and y = (x_codes @ w_codes) * s_x * w_scale.
Each quantized dot has several implementations of the same math (`W8A8_PATHS`,
`WEIGHT_ONLY_PATHS`); `dot` picks one by backend, row count and weight size
(`pick_w8a8_path`, `pick_weight_only_path`), and `path=` forces one. They agree to f32
rounding; the W8A8 "int32" path's accumulators are integer-exact.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Int8

from model.nm_array import NMArray
from model.nm_array import decompress as decompress_nm
from model.qarray import QArray, codes, dequantize
from pallas_kernels import api as kernels

# W8A8: "int32" is an int8 x int8 -> int32 dot; "f32" carries both codes as f32 into an
# f32 dot (exact while K * 127^2 < 2^24, i.e. K <= 1040; within f32 rounding beyond).
W8A8_PATHS = ("int32", "f32")
# Per-channel weight-only: "codes" puts the codes (as the compute dtype) into one dot with
# the scale on the f32 accumulator; "dequant" dequantizes W, then dots; "blocked" is
# "codes" over K in blocks of `block_rows` rows inside a loop, so the codes of only one
# block are converted at a time.
WEIGHT_ONLY_PATHS = ("codes", "dequant", "blocked")
# XLA:CPU runs an int8 dot of one row (matrix x vector) on a slow generic loop: 6.6 ms
# for M = 1 against 1.6 ms for M = 2 at K x N = 2048 x 8192 (medians of 8 dots in a
# loop, 2 shared cores). A single row is therefore padded to this many rows first.
W8A8_MIN_DOT_ROWS = 2
# Converting a whole large int8 weight to f32 per dot writes (and, outside a loop, first
# touches) 4 bytes per weight; converting it block by block keeps each block's f32 copy
# small. Measured on XLA:CPU, 2 shared cores, 8 dots in a loop, M = 1 / 8 / 32, ratio to an
# f32-weight dot: 2048 x 8192 "codes" 0.47 / 0.55 / 0.75x, "blocked" with 256 rows (8 MiB
# f32 per block) 1.44 / 1.37 / 1.28x, 128 rows 1.40 / 1.31 / 1.10x, 1024 rows 0.47 /
# 0.61 / 0.75x; at 512 x 1536 and 1536 x 512 (3 MiB as f32) blocking was no faster than
# "codes" (0.4-1.2x, noise-level). So on CPU "blocked" runs where W converted to the compute
# dtype takes at least BLOCKED_MIN_BYTES, in blocks of at most BLOCK_BYTES converted.
BLOCKED_MIN_BYTES = 16 << 20
BLOCK_BYTES = 8 << 20


def dot(x: Float[Array, "... In"], w, *, impl: str = "xla", dtype=None,
        path: str | None = None) -> Float[Array, "... Out"]:
  """x[..., in] @ w[in, out] with f32 accumulation, result in `dtype` (default x.dtype).

  path: for a 2-D per-channel QArray, one of `W8A8_PATHS` (act_bits=8) or
    `WEIGHT_ONLY_PATHS`; None picks the fastest measured one.
  impl="pallas": 2-D int8 / int4 QArrays (per-channel or per-group, symmetric or with a
    zero point, and W8A8) run `pallas_kernels.lowbit_matmul`; other formats, and backends
    where no kernel runs (a CPU unless SPARQ_PALLAS_INTERPRET is set), take the XLA path
    (one logged line per reason).
  """
  dtype = dtype or x.dtype
  if isinstance(w, QArray):
    if w.act_bits is not None:
      if path is None and impl == "pallas":
        _check_w8a8(w)
        y = _pallas_dot(x, w, dtype)
        if y is not None:
          return y
      return w8a8_dot(x, w, dtype=dtype, path=path)
    return _qdot(x, w, impl=impl, dtype=dtype, path=path)
  if path is not None:
    raise ValueError(f"path={path!r} applies to QArray weights only; got a {type(w).__name__}")
  if isinstance(w, NMArray):
    w = decompress_nm(w, dtype)  # see the module docstring: dense on CPU
  x = x.astype(dtype)
  y = jnp.matmul(x, w.astype(dtype), preferred_element_type=jnp.float32)
  return y.astype(dtype)


def einsum(eq: str, x: Array, w, *, dtype=None) -> Array:
  """Einsum against a weight (QArray leaves dequantized, NMArray leaves decompressed first).

  A W8A8 leaf also quantizes x per token, which needs x's last axis to be the only
  contracted one (as in "...d,vd->...v").
  """
  dtype = dtype or x.dtype
  if isinstance(w, QArray):
    if w.act_bits is not None:
      _check_w8a8(w)
      _check_w8a8_einsum(eq, w)
      x_codes, s_x = quantize_act(x)
      x = x_codes.astype(jnp.float32) * s_x
      w = dequantize(w, jnp.float32)
      return jnp.einsum(eq, x, w, preferred_element_type=jnp.float32).astype(dtype)
    w = dequantize(w, dtype)
  elif isinstance(w, NMArray):
    w = decompress_nm(w, dtype)
  return jnp.einsum(eq, x.astype(dtype), w.astype(dtype),
                    preferred_element_type=jnp.float32).astype(dtype)


def quantize_act(x: Float[Array, "... K"]) -> tuple[Int8[Array, "... K"], Float[Array, "... 1"]]:
  """Per-token symmetric int8: (codes, s_x) with x ~ codes * s_x, s_x = max|x| / 127."""
  x32 = x.astype(jnp.float32)
  s = jnp.max(jnp.abs(x32), axis=-1, keepdims=True) / 127.0
  s = jnp.where(s > 0, s, 1.0)  # a zero row: codes 0 with any scale; 1 avoids 0 / 0
  return jnp.clip(jnp.round(x32 / s), -127, 127).astype(jnp.int8), s


def pick_w8a8_path(rows: int, backend: str | None = None) -> str:
  """The W8A8 path `dot` runs for `rows` rows of x: the int32 dot (fastest at M = 1-1024)."""
  # "int32" won at every measured M (XLA:CPU, 2 shared cores, dots in a loop, ratio to an
  # f32-weight dot; the "f32" path in brackets): 2048 x 8192 at M = 1 (rows padded) / 8 /
  # 32: 1.19 (0.43) / 2.22 (0.56) / 3.00x (0.75x); 512 x 1536 at M = 256 / 1024: 2.07
  # (1.92) / 1.48x (1.05x). Accelerators have int8 dots too, so no backend needs "f32".
  del rows, backend
  return "int32"


def pick_weight_only_path(rows: int, shape: tuple[int, int], dtype,
                          backend: str | None = None) -> str:
  """The per-channel weight-only path `dot` runs (see BLOCKED_MIN_BYTES)."""
  del rows  # "blocked" won at M = 1, 8 and 32 alike wherever it won
  k, n = shape
  backend = backend or jax.default_backend()
  big = k * n * jnp.dtype(dtype).itemsize >= BLOCKED_MIN_BYTES
  return "blocked" if backend == "cpu" and big and block_rows(k, n, dtype) < k else "codes"


# Decode-step projection layouts (see `model.fuse`): "separate" keeps the checkpoint's
# q / k / v and gate / up kernels, "fused" concatenates each group into one kernel.
PROJECTION_LAYOUTS = ("separate", "fused")


def pick_projection_layout(rows: int, backend: str | None = None) -> str:
  """The projection layout a decode step of `rows` rows runs fastest with on `backend`.

  XLA:CPU (2 shared cores, bench-25m's 100.7 MB of projection weights, 50-step jitted
  loops, docs/bench_decode_dots.md): "separate" over "fused" 1.11x / 1.09x / 1.15x at
  M = 1 / 8 / 32, since a small-M dot runs on one core and the independent separate dots
  share both; end to end (docs/bench_decode.md) unfused decoding was faster too. Other
  backends run one dot on the whole device, where one wide dot reads its weights faster
  than several narrow ones and launches fewer kernels, so they take "fused" (not measured
  here: no accelerator was available).
  """
  if not isinstance(rows, int) or rows < 1:
    raise ValueError(f"rows={rows!r}; valid: an int >= 1")
  backend = backend or jax.default_backend()
  return "separate" if backend == "cpu" else "fused"


def block_rows(k: int, n: int, dtype) -> int:
  """Rows per "blocked" block: the largest power of two <= k whose converted copy fits
  BLOCK_BYTES."""
  rows = 1
  while rows * 2 <= k and rows * 2 * n * jnp.dtype(dtype).itemsize <= BLOCK_BYTES:
    rows *= 2
  return rows


def w8a8_dot(x: Float[Array, "... In"], w: QArray, *, dtype=None,
             path: str | None = None) -> Float[Array, "... Out"]:
  """x @ w with x quantized per token to int8 (see the module docstring), in `dtype`."""
  dtype = dtype or x.dtype
  _check_w8a8(w)
  lead, (k, n) = x.shape[:-1], w.shape
  x_MK = x.reshape(-1, k)
  path = path or pick_w8a8_path(x_MK.shape[0])
  x_codes, s_x = quantize_act(x_MK)
  acc_MN = w8a8_accumulate(x_codes, w.values, path=path).astype(jnp.float32)
  y = acc_MN * (s_x * w.scale.astype(jnp.float32).reshape(1, -1))
  return y.reshape(*lead, n).astype(dtype)


def w8a8_accumulate(x_codes: Int8[Array, "M K"], w_codes: Int8[Array, "K N"], *,
                    path: str) -> Array:
  """The dot of the codes: int32 (path "int32", exact) or f32 (path "f32")."""
  if path not in W8A8_PATHS:
    raise ValueError(f"path={path!r} for a W8A8 weight; valid: {W8A8_PATHS}")
  if path == "f32":
    return jnp.matmul(x_codes.astype(jnp.float32), w_codes.astype(jnp.float32),
                      preferred_element_type=jnp.float32)
  m = x_codes.shape[0]
  if m < W8A8_MIN_DOT_ROWS and jax.default_backend() == "cpu":
    x_codes = jnp.pad(x_codes, ((0, W8A8_MIN_DOT_ROWS - m), (0, 0)))
  acc = jax.lax.dot_general(x_codes, w_codes, (((1,), (0,)), ((), ())),
                            preferred_element_type=jnp.int32)
  return acc[:m]


def _check_w8a8(w: QArray) -> None:
  """W8A8 needs int8 symmetric per-channel / per-tensor 2-D codes; anything else is an error."""
  problems = []
  if w.act_bits != 8:
    problems.append(f"act_bits={w.act_bits!r} (valid: None, 8)")
  if (w.fmt, w.bits) != ("int", 8):
    problems.append(f"format {w.fmt!r} with {w.bits} bits (needs int8)")
  if w.zero is not None:
    problems.append("a zero point (needs symmetric)")
  if w.group_size:
    problems.append(f"group_size={w.group_size} (needs per-channel or per-tensor scales)")
  if w.ndim != 2:
    problems.append(f"shape {w.shape} (needs a 2-D [in, out] kernel)")
  elif w.scale.ndim != 2 or w.scale.shape[0] != 1 or w.scale.shape[1] not in (1, w.shape[1]):
    problems.append(f"scale shape {tuple(w.scale.shape)} (needs [1, {w.shape[1]}] or [1, 1])")
  if problems:
    raise ValueError(f"W8A8 leaf {w!r} is not computable: {'; '.join(problems)}")


def _check_w8a8_einsum(eq: str, w: QArray) -> None:
  """Per-token activation scales factor out of an einsum only if x's last axis is contracted."""
  ins, arrow, out = eq.replace(" ", "").partition("->")
  terms = ins.split(",")
  if not arrow or len(terms) != 2 or not terms[0]:
    raise ValueError(f"einsum eq={eq!r} with W8A8 leaf {w!r}: needs an explicit 'x,w->out' "
                     "equation")
  x_terms, w_terms = terms
  contracted = [c for c in x_terms.replace("...", "") if c in w_terms and c not in out]
  if contracted != [x_terms[-1]]:
    raise ValueError(f"einsum eq={eq!r} with W8A8 leaf {w!r}: per-token activation "
                     "quantization needs x's last axis to be the only contracted axis "
                     "(e.g. '...d,vd->...v')")


def _qdot(x: Float[Array, "... In"], w: QArray, *, impl: str, dtype,
          path: str | None = None) -> Float[Array, "... Out"]:
  """x @ w for a weight-only QArray (per-channel: codes enter the dot, scales hit the f32
  accumulator)."""
  x = x.astype(dtype)
  per_channel = w.ndim == 2 and not w.group_size and w.scale.shape[0] == 1  # [1, N] or [1, 1]
  if path is not None and path not in WEIGHT_ONLY_PATHS:
    raise ValueError(f"path={path!r} for a weight-only QArray; valid: {WEIGHT_ONLY_PATHS}")
  if path is not None and not per_channel:
    raise ValueError(f"path={path!r} needs a 2-D per-channel QArray; got {w!r}")
  if w.ndim != 2:
    return jnp.matmul(x, dequantize(w, dtype), preferred_element_type=jnp.float32).astype(dtype)
  if path is None and impl == "pallas":
    y = _pallas_dot(x, w, dtype)
    if y is not None:
      return y
  if per_channel:
    rows = x.size // max(x.shape[-1], 1)
    if path is None:
      path = pick_weight_only_path(rows, w.shape, dtype) if w.packing == 1 else "codes"
    if path == "dequant":
      return jnp.matmul(x, dequantize(w, dtype), preferred_element_type=jnp.float32
                        ).astype(dtype)
    # Integer codes enter the dot directly; the per-output-channel scale (and the
    # zero point, through the row sums of x) is applied to the f32 accumulator,
    # so no dequantized copy of W is formed.
    if path == "blocked":
      acc = _blocked_codes_dot(x, w, dtype)
    else:
      # Codes (|int| <= 128, or float8 values) are exact in bf16 / f16 / f32.
      acc = jnp.matmul(x, codes(w).astype(dtype), preferred_element_type=jnp.float32)
    if w.zero is not None:
      x_sum = jnp.sum(x, axis=-1, keepdims=True, dtype=jnp.float32)
      acc = acc - x_sum * w.zero.astype(jnp.float32).reshape(-1)
    return (acc * w.scale.astype(jnp.float32).reshape(-1)).astype(dtype)
  # Per-group scales vary along the contraction axis, so they cannot be pulled out of
  # the dot. Partial dots per group scaled in f32 were 1.3-3x slower than this fused
  # dequantize-then-dot on the 2-core CPU (K=N=1024, g=128, M=1..512); accelerators
  # take the low-bit Pallas kernels instead.
  return jnp.matmul(x, dequantize(w, dtype), preferred_element_type=jnp.float32).astype(dtype)


def _pallas_dot(x: Float[Array, "... In"], w: QArray, dtype) -> Float[Array, "... Out"] | None:
  """x @ w on the low-bit Pallas kernel, or None (logged) where it can't run this weight."""
  interpret = kernels.env_interpret()
  target, mode = kernels.plan(interpret)
  reason = None if target is not None else mode
  k, n = w.shape if w.ndim == 2 else (None, None)
  if reason is None and (w.ndim != 2 or w.fmt != "int" or w.bits not in (4, 8)):
    reason = f"a {w.fmt} {w.bits}-bit {w.ndim}-D weight (the kernel takes 2-D int8 / int4)"
  if reason is None and jnp.dtype(dtype).name not in ("float32", "bfloat16", "float16"):
    reason = f"compute dtype {jnp.dtype(dtype).name}"
  if reason is not None:
    kernels.log_fallback("lowbit_matmul", reason)
    return None
  groups = k // w.group_size if w.group_size else 1
  scales = jnp.broadcast_to(w.scale, (groups, n))
  zeros = None if w.zero is None else jnp.broadcast_to(w.zero, (groups, n))
  x_MK = x.reshape(-1, k).astype(dtype)
  y = kernels.lowbit_matmul(x_MK, w.values, scales, bits=w.bits, group_size=w.group_size or None,
                            zeros=zeros, act_bits=w.act_bits, interpret=interpret)
  return y.reshape(*x.shape[:-1], n).astype(dtype)


def _blocked_codes_dot(x: Float[Array, "... K"], w: QArray, dtype) -> Float[Array, "... N"]:
  """x @ codes(w) in f32, summed over blocks of `block_rows` input rows (plus a tail)."""
  lead, (k, n) = x.shape[:-1], w.shape
  x_MK, c_KN = x.reshape(-1, k), codes(w)
  bk = block_rows(k, n, dtype)
  full = k // bk * bk

  def body(i, acc_MN):
    c_BN = jax.lax.dynamic_slice_in_dim(c_KN, i * bk, bk, 0).astype(dtype)
    x_MB = jax.lax.dynamic_slice_in_dim(x_MK, i * bk, bk, 1)
    return acc_MN + jnp.matmul(x_MB, c_BN, preferred_element_type=jnp.float32)

  acc_MN = jax.lax.fori_loop(0, k // bk, body, jnp.zeros((x_MK.shape[0], n), jnp.float32))
  if full < k:
    acc_MN = acc_MN + jnp.matmul(x_MK[:, full:], c_KN[full:].astype(dtype),
                                 preferred_element_type=jnp.float32)
  return acc_MN.reshape(*lead, n)

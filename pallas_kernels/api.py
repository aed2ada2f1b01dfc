"""The public entry points and the backend picker; `model/ops.py` and `model/attention.py`
call only this module.

Which path a kernel call runs (`plan`):

| backend | interpret=False (default)         | interpret=True          | pltpu.InterpretParams() |
|---------|-----------------------------------|-------------------------|-------------------------|
| tpu     | compiled Mosaic TPU kernel        | interpreted TPU kernel  | TPU-faithful interpreter|
| gpu     | compiled GPU kernel (Triton)      | interpreted GPU kernel  | TPU-faithful interpreter|
| cpu     | reference (XLA), one logged line  | interpreted TPU kernel  | TPU-faithful interpreter|

`platform="tpu" | "gpu"` picks which kernel to interpret on any backend (the default when
interpreting on a CPU is the TPU kernel). A compiled kernel that cannot run a given call
(block sizes its hardware tiling rejects) also falls back to the reference with one logged
line per distinct reason; bad input (shapes, dtypes, layouts, bit widths, block sizes that
do not tile) is a ValueError before anything runs. `impl="reference"` forces the reference.
The environment variable SPARQ_PALLAS_INTERPRET=1 (or =tpu for `InterpretParams()`) asks
the model's dispatch (`model.ops`, `model.attention` with impl "pallas") to interpret.

"""

from __future__ import annotations

import logging
import os

import jax
import jax.numpy as jnp
from jax.experimental.pallas import tpu as pltpu
from jaxtyping import Array, Float

from pallas_kernels import block_sparse as bs
from pallas_kernels import block_sparse_gpu, block_sparse_tpu, lowbit

IMPLS = ("pallas", "reference")
PLATFORMS = ("tpu", "gpu")
ENV_INTERPRET = "SPARQ_PALLAS_INTERPRET"
_ENV_VALUES = {"": False, "0": False, "false": False, "1": True, "true": True, "tpu": "tpu"}

log = logging.getLogger("sparq.pallas_kernels")
_LOGGED: set[str] = set()


def log_fallback(kernel: str, reason: str) -> None:
  """Logs (once per distinct kernel and reason) that a call runs its XLA fallback."""
  line = f"pallas_kernels.{kernel}: {reason}; running the XLA path"
  if line not in _LOGGED:
    _LOGGED.add(line)
    log.warning(line)


def env_interpret():
  """Interpret mode requested by SPARQ_PALLAS_INTERPRET: False, True or InterpretParams."""
  raw = os.environ.get(ENV_INTERPRET, "")
  v = _ENV_VALUES.get(raw.strip().lower())
  if v is None:
    raise ValueError(
        f"{ENV_INTERPRET}={raw!r}; valid: '0'/'false' (off), '1'/'true' (interpret=True), "
        "'tpu' (pltpu.InterpretParams())")
  return pltpu.InterpretParams() if v == "tpu" else v


def _check_interpret(interpret) -> None:
  if not isinstance(interpret, (bool, pltpu.InterpretParams)):
    raise ValueError(
        f"interpret={interpret!r}; valid: False, True, pltpu.InterpretParams()")


def plan(interpret=False, platform: str | None = None, backend: str | None = None
         ) -> tuple[str | None, object]:
  """(platform, interpret) of the kernel to run, or (None, reason) for the XLA fallback."""
  _check_interpret(interpret)
  if platform is not None and platform not in PLATFORMS:
    raise ValueError(f"platform={platform!r}; valid: None (by backend), 'tpu', 'gpu'")
  backend = backend or jax.default_backend()
  if isinstance(interpret, pltpu.InterpretParams):
    if platform == "gpu":
      raise ValueError("pltpu.InterpretParams() interprets the TPU kernel; got platform='gpu' "
                       "(use interpret=True for the GPU kernel)")
    return "tpu", interpret
  if interpret:
    return platform or (backend if backend in PLATFORMS else "tpu"), True
  if backend not in PLATFORMS:
    return None, f"no compiled Pallas kernel for backend {backend!r}"
  if platform is not None and platform != backend:
    raise ValueError(f"platform={platform!r} cannot be compiled on backend {backend!r}; pass "
                     "interpret=True to interpret it")
  return backend, False


# --- Block-sparse attention ---------------------------------------------------------------

# Default (block_q, block_kv) of dense mode (layout=None) per platform: the largest of these
# dividing T (resp. S); TPU tiles need sublane multiples of 8 and lane multiples of 128.
ATTN_BLOCKS = {"tpu": ((512, 256, 128, 64, 32, 16, 8), (512, 256, 128)),
               "gpu": ((128, 64, 32, 16), (64, 32, 16)),
               None: ((128, 64, 32, 16, 8, 4, 2, 1), (128, 64, 32, 16, 8, 4, 2, 1))}


def attention_blocks(t: int, s: int, platform: str | None) -> tuple[int, int]:
  """Dense-mode block sizes: per-platform candidates, else the whole dimension."""
  qs, ks = ATTN_BLOCKS[platform]
  bq = next((c for c in qs if t % c == 0), t)
  bkv = next((c for c in ks if s % c == 0), s)
  return bq, bkv


def attention_blocker(platform: str, t: int, s: int, dh: int, block_q: int, block_kv: int
                      ) -> str | None:
  """Why the compiled `platform` kernel can't run these blocks (None: it can)."""
  if platform == "tpu":
    if block_q != t and block_q % 8:
      return f"block_q={block_q} is not a multiple of 8 (TPU sublanes) nor T={t}"
    if block_kv != s and block_kv % 128:
      return f"block_kv={block_kv} is not a multiple of 128 (TPU lanes) nor S={s}"
    return None
  pow2 = lambda n: n >= 16 and n & (n - 1) == 0
  for name, n in (("block_q", block_q), ("block_kv", block_kv), ("head dim", dh)):
    if not pow2(n):
      return f"{name}={n} is not a power of two >= 16 (Triton dot tiles)"
  return None


def block_sparse_attention(q: Float[Array, "B T H Dh"], k: Float[Array, "B S K Dh"],
                           v: Float[Array, "B S K Dh"], layout=None, *,
                           mask: bs.Mask | None = None, scale: float | None = None,
                           return_lse: bool = False, interpret=False,
                           platform: str | None = None, impl: str | None = None,
                           block_q: int | None = None, block_kv: int | None = None):
  """Flash attention over a `BlockLayout`'s active blocks (layout=None: dense mode).

  q [B, T, H, Dh], k / v [B, S, K, Dh] (K divides H), float32 or bfloat16. `layout`: a
  `model.BlockLayout` (or any object with its fields); None builds one from `mask` that
  skips hidden blocks and marks wholly visible ones full (`block_sparse.dense_layout`), with
  block_q / block_kv (default: per platform). mask: a `block_sparse.Mask` (causal, window,
  sinks, positions, segment ids), computed in-kernel on partial blocks. Returns out [B, T,
  H, Dh] in q's dtype, and lse [B, T, H] (f32; NEG_INF for queries that see nothing) with
  `return_lse`. Differentiable in q, k, v. See the module docstring for `interpret`,
  `platform` and `impl`.
  """
  if impl is not None and impl not in IMPLS:
    raise ValueError(f"impl={impl!r}; valid: None (auto), {', '.join(map(repr, IMPLS))}")
  b, t, h, s, kh, dh = bs.check_qkv(q, k, v)
  mask = bs.Mask() if mask is None else mask
  bs.check_mask(mask, b, t, s)
  scale = dh ** -0.5 if scale is None else float(scale)
  target, mode = (None, "impl='reference'") if impl == "reference" else plan(interpret,
                                                                             platform)
  if layout is None:
    dq, dkv = attention_blocks(t, s, target)
    block_q, block_kv = block_q or dq, block_kv or dkv
    bs.check_blocks(t, s, block_q, block_kv)
  else:
    if block_q is not None or block_kv is not None:
      raise ValueError("block_q / block_kv are the layout's (layout.block_q, layout.block_kv); "
                       "pass them only with layout=None")
    bs.check_layout(layout, b, t, s, h, kh)
    block_q, block_kv = layout.block_q, layout.block_kv
  if target is not None and mode is False:
    reason = attention_blocker(target, t, s, dh, block_q, block_kv)
    if reason is not None:
      target, mode = None, reason
  if target is None:
    if impl != "reference":
      log_fallback("block_sparse_attention", mode)
    return bs.reference(q, k, v, layout, mask=mask, scale=scale, return_lse=return_lse)
  m = bs.mask_arrays(mask, b, t, s)
  if layout is None:
    layout = bs.dense_layout(m, block_q, block_kv)
  meta = bs.build_meta(layout, s)
  kernel = block_sparse_tpu.attention if target == "tpu" else block_sparse_gpu.attention
  out, lse = kernel(jnp.swapaxes(q, 1, 2), jnp.swapaxes(k, 1, 2), jnp.swapaxes(v, 1, 2), meta,
                    m, scale=scale, interpret=mode)
  out = jnp.swapaxes(out, 1, 2)
  return (out, jnp.swapaxes(lse, 1, 2)) if return_lse else out


def block_sparse_attention_reference(
    q: Float[Array, "B T H Dh"], k: Float[Array, "B S K Dh"], v: Float[Array, "B S K Dh"],
    layout=None, *, mask: bs.Mask | None = None, scale: float | None = None,
    return_lse: bool = False, interpret=False, platform: str | None = None,
    impl: str | None = None, block_q: int | None = None, block_kv: int | None = None):
  """`block_sparse_attention`'s pure-jnp reference (dense masked softmax in f32); the
  kernel-selection and block arguments are accepted and unused."""
  del platform, impl
  return bs.reference(q, k, v, layout, mask=mask, scale=scale, return_lse=return_lse,
                      interpret=interpret, block_q=block_q, block_kv=block_kv)


# --- Low-bit matmul -------------------------------------------------------------------------


def lowbit_matmul(x: Float[Array, "M K"], values: Array, scales: Float[Array, "G N"], *,
                  bits: int, group_size: int | None, zeros: Array | None = None,
                  act_bits: int | None = None, interpret=False, platform: str | None = None,
                  impl: str | None = None, block_m: int | None = None,
                  block_n: int | None = None, block_k: int | None = None
                  ) -> Float[Array, "M N"]:
  """x @ W for a quantized W ([K, N] int8 codes, or int4 packed two per byte along K):
  weight-only (dequantized in-kernel, f32 accumulation) or, with act_bits=8, W8A8 (x
  quantized per token, int8 x int8 -> int32). Semantics: `pallas_kernels.lowbit`."""
  if impl is not None and impl not in IMPLS:
    raise ValueError(f"impl={impl!r}; valid: None (auto), {', '.join(map(repr, IMPLS))}")
  kw = dict(bits=bits, group_size=group_size, zeros=zeros, act_bits=act_bits)
  if impl == "reference":
    return lowbit.reference(x, values, scales, **kw)
  target, mode = plan(interpret, platform)
  if target is None:
    lowbit.check_args(x, values, scales, **kw)
    log_fallback("lowbit_matmul", mode)
    return lowbit.reference(x, values, scales, **kw)
  return lowbit.lowbit_matmul(x, values, scales, **kw, interpret=mode, platform=target,
                              block_m=block_m, block_n=block_n, block_k=block_k)


def lowbit_matmul_reference(x: Float[Array, "M K"], values: Array, scales: Float[Array, "G N"],
                            *, bits: int, group_size: int | None, zeros: Array | None = None,
                            act_bits: int | None = None, interpret=False,
                            platform: str | None = None, impl: str | None = None,
                            block_m: int | None = None, block_n: int | None = None,
                            block_k: int | None = None) -> Float[Array, "M N"]:
  """`lowbit_matmul`'s pure-jnp reference (W dequantized in f32, one dot; W8A8: the int32
  dot of the codes); the kernel-selection and block arguments are accepted and unused."""
  del impl
  return lowbit.reference(x, values, scales, bits=bits, group_size=group_size, zeros=zeros,
                          act_bits=act_bits, interpret=interpret, platform=platform,
                          block_m=block_m, block_n=block_n, block_k=block_k)

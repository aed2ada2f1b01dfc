"""Block-sparse flash attention for NVIDIA GPUs (Pallas, Triton lowering): forward and backward.

Heads-major operands: q [B, H, T, Dh], k / v [B, K, S, Dh] (K divides H; query head h reads
kv head h // (H / K)). The layout arrives as `block_sparse.BlockMeta`, the element mask as
`block_sparse.MaskArrays`; the result equals `block_sparse.reference` (transposed), and
`attention` returns (out [B, H, T, Dh] in q.dtype, lse [B, H, T] f32).

Forward. Grid (B, H, Qb): one program per (row, query head, q block). The q tile
[block_q, Dh] is a BlockSpec block; K and V BlockSpecs span the whole S of the (row, kv
head h // (H / K)) pair, and the kernel loads [block_kv, Dh] tiles of them at
`pl.ds(idx * block_kv, block_kv)` itself. The split q-major lists of the metadata
(f_num / f_idx: full blocks, p_num / p_idx: partial blocks) are flattened to 1-D int32 and
passed whole; the kernel computes the flat offset ((layout_row(b) * Hl + layout_head(h)) *
Qb + i) of its q block, reads the two counts with scalar loads and runs two
`lax.fori_loop`s with those dynamic bounds: first over the full blocks with no element
mask at all (the full claim is trusted), then over the partial blocks with the element
mask `block_sparse.element_mask` computed in-kernel from the block's slices of the
per-token vectors (q_pos / kv_pos, and q_seg / kv_seg with segments). Blocks outside the
lists cost nothing: no load, no loop step. Without any causal / window / segment term
there is no element mask and partial blocks take the unmasked body too. The online
softmax runs in base 2 (scores scaled by scale * log2(e), `exp2`), in f32: running max m,
running sum l, accumulator [block_q, Dh]. Masked scores are set to the finite `NEG_INF`
with `jnp.where` and their probabilities are zeroed explicitly, so a row whose first
visited block is entirely masked stays exact (exp2(NEG_INF - NEG_INF) = 1 would otherwise
count). At the end out = acc / l and lse = m * ln 2 + log l; a row that saw nothing
(l == 0) gets out 0 and lse `NEG_INF`. Dots take the operands' dtype (f32 or bf16) with
f32 accumulation (`preferred_element_type=jnp.float32`; f32 dots lower to IEEE precision,
not TF32); p is cast to v.dtype for the P.V dot.

Backward (FlashAttention-2), residuals q, k, v, out, lse. The wrapper computes
delta = rowsum(dO * O) - dlse in f32 (d lse / d s = p, so a cotangent on lse enters as a
shift of delta). p = exp(s - lse) is recomputed from the saved lse, ds = p * (dO v^T - delta).
  * dq kernel: grid (B, H, Qb), the same two loops over the split q-major lists as the
    forward; dq += ds k, written (times scale) in q.dtype.
  * dk / dv kernel: grid (B, H, Sb), per QUERY head h and kv block j; its two loops run
    over the transposed split lists tf_num / tf_idx (full, unmasked) and tp_num / tp_idx
    (partial, masked): the q blocks that attend to j. Each step loads the q, dO tiles and
    the lse, delta slices of one q block and accumulates dv += p^T dO, dk += ds^T q in f32.
    The outputs are per query head, dk (times scale) and dv [B, H, S, Dh] f32; the wrapper
    sums each group of H / K heads to [B, K, S, Dh] and casts to k.dtype. A kv block that
    no q block attends to has empty lists and gets zeros.
`attention` is a `jax.custom_vjp`, differentiable in q, k and v (the metadata and mask
vectors are integer inputs and get no cotangent).

Why Triton. In JAX 0.10 a `pallas_call` whose `compiler_params` are
`jax.experimental.pallas.triton.CompilerParams` lowers through Triton (the
`__gpu$xla.gpu.triton` custom call). That lowering also runs under `interpret=True` on
CPU, which is how this kernel is tested without a GPU, and it cross-lowers for CUDA on a
CPU-only machine (`jax.jit(f).trace(...).lower(lowering_platforms=("cuda",))`), which
catches ops the Triton lowering does not support. Mosaic GPU, JAX's other GPU backend,
can be neither interpreted nor tested that way here. The Triton lowering is deprecated
from JAX 0.11, so upgrading past 0.10 needs a Mosaic GPU port of these kernels (the
follow-up); the structure (dynamic-count loops over split lists, transposed lists for
dk / dv) carries over.

Triton constraints (checked when compiling, i.e. interpret is False): every tensor a
program touches must have power-of-two dims and dots need dims >= 16, so block_q,
block_kv and Dh must be powers of two >= 16. Interpret mode takes any sizes (tests use 8).
The cross-lowering enforces the power-of-two rule itself but not the dot minimum (that
surfaces only when XLA compiles the Triton module on a GPU), hence the explicit check.
Triton caps grid axes 1 and 2 at 65535: H and Qb (or Sb) must stay below that. The
flattened metadata is read with scalar loads from global memory (L2-resident in
practice); its size is not limited.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu
from jaxtyping import Array, Float

from pallas_kernels.block_sparse import (
  NEG_INF,
  BlockMeta,
  MaskArrays,
  element_mask,
  layout_head,
  layout_row,
)

LOG2E = math.log2(math.e)
LN2 = math.log(2.0)
NT = (((1,), (1,)), ((), ()))  # a @ b^T
NN = (((1,), (0,)), ((), ()))  # a @ b
TN = (((0,), (0,)), ((), ()))  # a^T @ b


def _dot(a, b, dims):
  return lax.dot_general(a, b, dims, preferred_element_type=jnp.float32)


@dataclasses.dataclass(frozen=True)
class _Config:
  """Everything static about one call (hashable: a `custom_vjp` nondiff argument)."""

  heads: int
  kv_heads: int
  layout_batch: int
  layout_heads: int
  q_blocks: int
  kv_blocks: int
  block_q: int
  block_kv: int
  scale: float
  causal: bool
  window: int | None
  sinks: int
  segments: bool
  interpret: Any
  num_warps: int | None
  num_stages: int | None

  @property
  def group(self) -> int:
    return self.heads // self.kv_heads

  @property
  def masked(self) -> bool:
    """Whether partial blocks need an element mask at all."""
    return self.causal or self.window is not None or self.segments

  @property
  def static_mask(self) -> MaskArrays:
    """The mask's static part, all `element_mask` reads (vectors come from refs)."""
    return MaskArrays(q_pos=None, kv_pos=None, q_seg=None, kv_seg=None, causal=self.causal,
                      window=self.window, sinks=self.sinks)

  def compiler_params(self, dh: int, backward: bool) -> plgpu.CompilerParams:
    warps = self.num_warps
    if warps is None:
      warps = 4 if dh <= 64 and (backward or self.block_q * self.block_kv <= 64 * 64) else 8
    stages = self.num_stages if self.num_stages is not None else 2
    return plgpu.CompilerParams(num_warps=warps, num_stages=stages)

  def flat_offset(self, b, h, i, n: int):
    """Offset of the list entry of (row b, query head h, block i) in a flat [B', Hl, n]."""
    row = layout_row(b, self.layout_batch)
    head = layout_head(h, self.layout_heads, self.heads, self.kv_heads)
    return (row * self.layout_heads + head) * n + i


def _is_pow2(n: int) -> bool:
  return n >= 1 and n & (n - 1) == 0


def _check(q, k, v, meta: BlockMeta, m: MaskArrays, interpret: bool) -> None:
  if q.ndim != 4 or k.ndim != 4 or k.shape != v.shape:
    raise ValueError(f"q must be [B, H, T, Dh] and k, v [B, K, S, Dh]; got {q.shape}, "
                     f"{k.shape}, {v.shape}")
  b, h, t, dh = q.shape
  kh, s = k.shape[1], k.shape[2]
  if k.shape[0] != b or k.shape[3] != dh or h % kh:
    raise ValueError(f"k.shape={k.shape} must be [B={b}, K, S, Dh={dh}] with K dividing H={h}")
  if not q.dtype == k.dtype == v.dtype or jnp.dtype(q.dtype).name not in ("float32",
                                                                             "bfloat16"):
    raise ValueError(f"q, k, v must share a dtype in (float32, bfloat16); got {q.dtype}, "
                     f"{k.dtype}, {v.dtype}")
  bq, bkv = meta.block_q, meta.block_kv
  if t % bq or s % bkv:
    raise ValueError(f"block_q={bq} must divide T={t} and block_kv={bkv} S={s}")
  if meta.num.shape[2] != t // bq or meta.t_num.shape[2] != s // bkv:
    raise ValueError(f"meta has {meta.num.shape[2]} q blocks / {meta.t_num.shape[2]} kv "
                     f"blocks; T={t}, S={s} in blocks of {bq} / {bkv} need {t // bq} / "
                     f"{s // bkv}")
  if meta.batch not in (1, b) or meta.heads not in (1, kh, h):
    raise ValueError(f"meta leading axes {meta.num.shape[:2]}; valid: batch 1 or {b}, heads "
                     f"1, {kh} or {h}")
  if m.q_pos.shape != (b, t) or m.kv_pos.shape != (b, s):
    raise ValueError(f"mask vectors q_pos {m.q_pos.shape} / kv_pos {m.kv_pos.shape}; valid: "
                     f"[{b}, {t}] / [{b}, {s}]")
  if (m.q_seg is None) != (m.kv_seg is None):
    raise ValueError("MaskArrays: give both q_seg and kv_seg, or neither")
  if not interpret:
    for name, n in (("block_q", bq), ("block_kv", bkv), ("head dim Dh", dh)):
      if not _is_pow2(n) or n < 16:
        raise ValueError(f"{name}={n}: the Triton GPU kernel needs a power of two >= 16 "
                         "(tensor dims must be powers of two, dots need >= 16); valid e.g. "
                         "16, 32, 64, 128 (interpret=True accepts any size)")


# --- Shared kernel pieces -----------------------------------------------------------------


def _mask_refs(cfg: _Config, m: MaskArrays):
  """(q-side vectors, kv-side vectors) the element mask reads: positions, then segments."""
  if not cfg.masked:
    return [], []
  qs, ks = [m.q_pos], [m.kv_pos]
  if cfg.segments:
    qs.append(m.q_seg)
    ks.append(m.kv_seg)
  return qs, ks


def _tile_mask(cfg: _Config, q_vecs, kv_vecs):
  """The element mask [block_q, block_kv] from q-side [block_q] / kv-side [block_kv] vectors."""
  qseg = kseg = None
  if cfg.segments:
    qseg, kseg = q_vecs[1][:, None], kv_vecs[1][None, :]
  return element_mask(cfg.static_mask, q_vecs[0][:, None], kv_vecs[0][None, :], qseg, kseg)


def _split_loops(step, carry, lists, base, masked: bool):
  """Run `step(block, carry, masked)` over a full list, then over a partial list.

  lists: the ((full count, full indices), (partial count, partial indices)) flat refs;
  `base` is the flat offset of this program's list. Loop bounds are the dynamic counts.
  """
  for kind, (num_ref, idx_ref) in enumerate(lists):
    start = base * (idx_ref.shape[0] // num_ref.shape[0])  # times the padded list length
    use_mask = masked and kind == 1

    def body(t, c, idx_ref=idx_ref, start=start, use_mask=use_mask):
      return step(idx_ref[start + t], c, use_mask)

    carry = lax.fori_loop(0, num_ref[base], body, carry)
  return carry


# --- Forward ------------------------------------------------------------------------------


def _fwd_kernel(*refs, cfg: _Config, n_vec: int):
  f_num, f_idx, p_num, p_idx = refs[:4]
  q_vec_refs, kv_vec_refs = refs[4:4 + n_vec], refs[4 + n_vec:4 + 2 * n_vec]
  q_ref, k_ref, v_ref, o_ref, lse_ref = refs[4 + 2 * n_vec:]
  b, h, i = pl.program_id(0), pl.program_id(1), pl.program_id(2)
  bq, bkv = cfg.block_q, cfg.block_kv
  q = q_ref[...]
  q_vecs = [r[...] for r in q_vec_refs]
  c = cfg.scale * LOG2E

  def step(j, carry, masked):
    acc, mx, l = carry
    kv = pl.ds(j * bkv, bkv)
    s = _dot(q, k_ref[kv, :], NT) * c
    if masked:
      ok = _tile_mask(cfg, q_vecs, [r[kv] for r in kv_vec_refs])
      s = jnp.where(ok, s, NEG_INF)
    m_new = jnp.maximum(mx, jnp.max(s, axis=-1))
    p = jnp.exp2(s - m_new[:, None])
    if masked:
      p = jnp.where(ok, p, 0.0)
    corr = jnp.exp2(mx - m_new)
    l = l * corr + jnp.sum(p, axis=-1)
    v = v_ref[kv, :]
    acc = acc * corr[:, None] + _dot(p.astype(v.dtype), v, NN)
    return acc, m_new, l

  carry = (jnp.zeros((bq, q.shape[-1]), jnp.float32), jnp.full((bq,), NEG_INF, jnp.float32),
           jnp.zeros((bq,), jnp.float32))
  base = cfg.flat_offset(b, h, i, cfg.q_blocks)
  acc, mx, l = _split_loops(step, carry, ((f_num, f_idx), (p_num, p_idx)), base, cfg.masked)
  seen = l > 0.0
  safe_l = jnp.where(seen, l, 1.0)
  o_ref[...] = jnp.where(seen[:, None], acc / safe_l[:, None], 0.0).astype(o_ref.dtype)
  lse_ref[...] = jnp.where(seen, mx * LN2 + jnp.log(safe_l), NEG_INF)


def _flat(*xs):
  return [x.reshape(-1) for x in xs]


def _whole(x) -> pl.BlockSpec:
  return pl.BlockSpec(x.shape, lambda *_: (0,) * x.ndim)


def _forward(cfg: _Config, q, k, v, meta: BlockMeta, m: MaskArrays):
  b, h, t, dh = q.shape
  s = k.shape[2]
  bq, g = cfg.block_q, cfg.group
  lists = _flat(meta.f_num, meta.f_idx, meta.p_num, meta.p_idx)
  q_vecs, kv_vecs = _mask_refs(cfg, m)
  in_specs = [_whole(x) for x in lists]
  in_specs += [pl.BlockSpec((None, bq), lambda b, h, i: (b, i)) for _ in q_vecs]
  in_specs += [pl.BlockSpec((None, s), lambda b, h, i: (b, 0)) for _ in kv_vecs]
  in_specs += [
      pl.BlockSpec((None, None, bq, dh), lambda b, h, i: (b, h, i, 0)),
      pl.BlockSpec((None, None, s, dh), lambda b, h, i: (b, h // g, 0, 0)),
      pl.BlockSpec((None, None, s, dh), lambda b, h, i: (b, h // g, 0, 0)),
  ]
  out_specs = [pl.BlockSpec((None, None, bq, dh), lambda b, h, i: (b, h, i, 0)),
               pl.BlockSpec((None, None, bq), lambda b, h, i: (b, h, i))]
  out, lse = pl.pallas_call(
      functools.partial(_fwd_kernel, cfg=cfg, n_vec=len(q_vecs)),
      grid=(b, h, t // bq),
      in_specs=in_specs,
      out_specs=out_specs,
      out_shape=[jax.ShapeDtypeStruct(q.shape, q.dtype),
                 jax.ShapeDtypeStruct((b, h, t), jnp.float32)],
      compiler_params=cfg.compiler_params(dh, backward=False),
      interpret=cfg.interpret,
      name="block_sparse_attention_fwd",
  )(*lists, *q_vecs, *kv_vecs, q, k, v)
  return out, lse


# --- Backward -----------------------------------------------------------------------------


def _dq_kernel(*refs, cfg: _Config, n_vec: int):
  f_num, f_idx, p_num, p_idx = refs[:4]
  q_vec_refs, kv_vec_refs = refs[4:4 + n_vec], refs[4 + n_vec:4 + 2 * n_vec]
  q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, dq_ref = refs[4 + 2 * n_vec:]
  b, h, i = pl.program_id(0), pl.program_id(1), pl.program_id(2)
  bkv = cfg.block_kv
  q, do = q_ref[...], do_ref[...]
  lse2 = lse_ref[...] * LOG2E
  delta = delta_ref[...]
  q_vecs = [r[...] for r in q_vec_refs]
  c = cfg.scale * LOG2E

  def step(j, dq, masked):
    kv = pl.ds(j * bkv, bkv)
    k = k_ref[kv, :]
    s = _dot(q, k, NT) * c
    if masked:
      ok = _tile_mask(cfg, q_vecs, [r[kv] for r in kv_vec_refs])
      s = jnp.where(ok, s, NEG_INF)
    p = jnp.exp2(s - lse2[:, None])
    if masked:
      p = jnp.where(ok, p, 0.0)
    ds = p * (_dot(do, v_ref[kv, :], NT) - delta[:, None])
    return dq + _dot(ds.astype(k.dtype), k, NN)

  base = cfg.flat_offset(b, h, i, cfg.q_blocks)
  dq = _split_loops(step, jnp.zeros(q.shape, jnp.float32), ((f_num, f_idx), (p_num, p_idx)),
                    base, cfg.masked)
  dq_ref[...] = (dq * cfg.scale).astype(dq_ref.dtype)


def _dkv_kernel(*refs, cfg: _Config, n_vec: int):
  f_num, f_idx, p_num, p_idx = refs[:4]
  q_vec_refs, kv_vec_refs = refs[4:4 + n_vec], refs[4 + n_vec:4 + 2 * n_vec]
  q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, dk_ref, dv_ref = refs[4 + 2 * n_vec:]
  b, h, j = pl.program_id(0), pl.program_id(1), pl.program_id(2)
  bq = cfg.block_q
  k, v = k_ref[...], v_ref[...]
  kv_vecs = [r[...] for r in kv_vec_refs]
  c = cfg.scale * LOG2E

  def step(i, carry, masked):
    dk, dv = carry
    rows = pl.ds(i * bq, bq)
    q, do = q_ref[rows, :], do_ref[rows, :]
    s = _dot(q, k, NT) * c
    if masked:
      ok = _tile_mask(cfg, [r[rows] for r in q_vec_refs], kv_vecs)
      s = jnp.where(ok, s, NEG_INF)
    p = jnp.exp2(s - (lse_ref[rows] * LOG2E)[:, None])
    if masked:
      p = jnp.where(ok, p, 0.0)
    dv = dv + _dot(p.astype(do.dtype), do, TN)
    ds = p * (_dot(do, v, NT) - delta_ref[rows][:, None])
    dk = dk + _dot(ds.astype(q.dtype), q, TN)
    return dk, dv

  zeros = jnp.zeros(k.shape, jnp.float32)
  base = cfg.flat_offset(b, h, j, cfg.kv_blocks)
  dk, dv = _split_loops(step, (zeros, zeros), ((f_num, f_idx), (p_num, p_idx)), base,
                        cfg.masked)
  dk_ref[...] = dk * cfg.scale
  dv_ref[...] = dv


def _backward(cfg: _Config, res, cts):
  q, k, v, meta, m, out, lse = res
  d_out, d_lse = cts
  b, h, t, dh = q.shape
  kh, s = k.shape[1], k.shape[2]
  bq, bkv, g = cfg.block_q, cfg.block_kv, cfg.group
  d_out = d_out.astype(q.dtype)
  delta = jnp.sum(d_out.astype(jnp.float32) * out.astype(jnp.float32), axis=-1)
  delta = delta - d_lse.astype(jnp.float32)
  q_vecs, kv_vecs = _mask_refs(cfg, m)
  params = cfg.compiler_params(dh, backward=True)

  q_lists = _flat(meta.f_num, meta.f_idx, meta.p_num, meta.p_idx)
  tile_q = pl.BlockSpec((None, None, bq, dh), lambda b, h, i: (b, h, i, 0))
  row_q = pl.BlockSpec((None, None, bq), lambda b, h, i: (b, h, i))
  all_kv = pl.BlockSpec((None, None, s, dh), lambda b, h, i: (b, h // g, 0, 0))
  dq = pl.pallas_call(
      functools.partial(_dq_kernel, cfg=cfg, n_vec=len(q_vecs)),
      grid=(b, h, t // bq),
      in_specs=[_whole(x) for x in q_lists]
      + [pl.BlockSpec((None, bq), lambda b, h, i: (b, i)) for _ in q_vecs]
      + [pl.BlockSpec((None, s), lambda b, h, i: (b, 0)) for _ in kv_vecs]
      + [tile_q, all_kv, all_kv, tile_q, row_q, row_q],
      out_specs=tile_q,
      out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
      compiler_params=params,
      interpret=cfg.interpret,
      name="block_sparse_attention_dq",
  )(*q_lists, *q_vecs, *kv_vecs, q, k, v, d_out, lse, delta)

  t_lists = _flat(meta.tf_num, meta.tf_idx, meta.tp_num, meta.tp_idx)
  all_q = pl.BlockSpec((None, None, t, dh), lambda b, h, j: (b, h, 0, 0))
  all_row = pl.BlockSpec((None, None, t), lambda b, h, j: (b, h, 0))
  tile_kv = pl.BlockSpec((None, None, bkv, dh), lambda b, h, j: (b, h // g, j, 0))
  tile_dkv = pl.BlockSpec((None, None, bkv, dh), lambda b, h, j: (b, h, j, 0))
  dk, dv = pl.pallas_call(
      functools.partial(_dkv_kernel, cfg=cfg, n_vec=len(q_vecs)),
      grid=(b, h, s // bkv),
      in_specs=[_whole(x) for x in t_lists]
      + [pl.BlockSpec((None, t), lambda b, h, j: (b, 0)) for _ in q_vecs]
      + [pl.BlockSpec((None, bkv), lambda b, h, j: (b, j)) for _ in kv_vecs]
      + [all_q, tile_kv, tile_kv, all_q, all_row, all_row],
      out_specs=[tile_dkv, tile_dkv],
      out_shape=[jax.ShapeDtypeStruct((b, h, s, dh), jnp.float32)] * 2,
      compiler_params=params,
      interpret=cfg.interpret,
      name="block_sparse_attention_dkv",
  )(*t_lists, *q_vecs, *kv_vecs, q, k, v, d_out, lse, delta)
  dk = dk.reshape(b, kh, g, s, dh).sum(axis=2).astype(k.dtype)
  dv = dv.reshape(b, kh, g, s, dh).sum(axis=2).astype(v.dtype)
  return dq, dk, dv, None, None


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _attention(cfg: _Config, q, k, v, meta: BlockMeta, m: MaskArrays):
  return _forward(cfg, q, k, v, meta, m)


def _attention_fwd(cfg: _Config, q, k, v, meta: BlockMeta, m: MaskArrays):
  out, lse = _forward(cfg, q, k, v, meta, m)
  return (out, lse), (q, k, v, meta, m, out, lse)


_attention.defvjp(_attention_fwd, _backward)


def attention(q: Float[Array, "B H T Dh"], k: Float[Array, "B K S Dh"],
              v: Float[Array, "B K S Dh"], meta: BlockMeta, m: MaskArrays, *, scale: float,
              interpret=False, num_warps: int | None = None, num_stages: int | None = None
              ) -> tuple[Float[Array, "B H T Dh"], Float[Array, "B H T"]]:
  """Block-sparse attention over the layout `meta` and mask `m` (see the module docstring).

  Returns (out [B, H, T, Dh] in q.dtype, lse [B, H, T] f32); rows that see no key get out 0
  and lse `NEG_INF`. Differentiable in q, k, v (also through lse). num_warps / num_stages
  are Triton's (defaults: 4 warps for Dh <= 64 and small tiles, else 8; 2 stages).
  """
  _check(q, k, v, meta, m, bool(interpret))
  cfg = _Config(heads=q.shape[1], kv_heads=k.shape[1], layout_batch=meta.batch,
                layout_heads=meta.heads, q_blocks=q.shape[2] // meta.block_q,
                kv_blocks=k.shape[2] // meta.block_kv, block_q=meta.block_q,
                block_kv=meta.block_kv, scale=float(scale), causal=bool(m.causal),
                window=m.window, sinks=int(m.sinks), segments=m.q_seg is not None,
                interpret=interpret, num_warps=num_warps, num_stages=num_stages)
  return _attention(cfg, q, k, v, meta, m)

"""Data-aware PTQ of a whole model: GPTQ block by block; AWQ and SmoothQuant from one pass.

`quant.quantize(params, "int4:g128:gptq", calib=Calibration(cfg, batches))` lands
here for every leaf whose spec has method "gptq": the decoder blocks are
calibrated in order on the outputs of the already-quantized blocks (as the
official GPTQ code does; `calib.sequential=False`: one pass over the float
model), each kernel is quantized by `quant.gptq_layer` from its Hessian
`2 X^T X / n`, and kernels outside the blocks are calibrated afterwards.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping

import jax
import jax.numpy as jnp

from model import calibration as calib_lib
from model.attention import context
from model.layers import RMSNorm
from model.qarray import QArray
from model.transformer import MLP, Attention
from model.tree import get_path, is_weight_leaf, replace_path
from quant import smooth

# The pseudo-quantizer and ratio -> scale map of quant.awq, shared by the module-level search.
from quant.awq import (
  _fake_quant,
  _ratio_scale,
  awq_clip_search_stats,
  awq_scale_search_stats,
  clip_and_quantize,
)
from quant.gptq import gptq_layer, gptq_nm_layer
from quant.recipes import QuantSpec


def _gptq(kernel, stats: calib_lib.KernelStats, spec: QuantSpec, path: str):
  if is_weight_leaf(kernel):
    raise ValueError(f"gptq on {path}: the leaf is already {type(kernel).__name__}; GPTQ "
                     "needs a float kernel")
  try:
    if spec.sparse:
      n, m = spec.sparse
      return gptq_nm_layer(kernel, stats.hessian(), bits=spec.bits, n=n, m=m,
                           group_size=spec.group_size, sym=spec.symmetric)
    return gptq_layer(kernel, stats.hessian(), bits=spec.bits, group_size=spec.group_size,
                      sym=spec.symmetric, act_order=spec.act_order,
                      static_groups=spec.static_groups)
  except ValueError as e:
    raise ValueError(f"gptq on {path}: {e}") from None


def gptq_quantize(params, specs: Mapping[str, QuantSpec], calib) -> dict[str, QArray]:
  """{path: QArray} for every path in `specs` (all GPTQ specs), calibrated as described above."""
  calib = calib_lib.check_calibration(calib, what="GPTQ")
  out: dict[str, QArray] = {}
  in_blocks = [p for p in specs if p.startswith("layers_")]
  others = [p for p in specs if not p.startswith("layers_")]

  def quantize_paths(tree, stats, paths, prefix=""):
    calib_lib.check_stats(stats, paths, hessian=True)
    for p in paths:
      local = p[len(prefix):]
      out[p] = _gptq(get_path(tree, local), stats[p], specs[p], p)
      tree = replace_path(tree, local, out[p])
    return tree

  if calib.sequential:
    def update(layer, block, stats):
      prefix = f"layers_{layer}/"
      return quantize_paths(block, stats, [p for p in in_blocks if p.startswith(prefix)],
                            prefix)
    params = calib_lib.calibrate_sequential(calib.cfg, params, calib.batches, update,
                                            paths=list(specs))
    if others:
      stats = calib_lib.calibrate(calib.cfg, params, calib.batches, paths=others)
      quantize_paths(params, stats, others)
  else:
    stats = calib_lib.calibrate(calib.cfg, params, calib.batches, paths=list(specs))
    quantize_paths(params, stats, list(specs))
  return out


# -------------------------------------------------------------------- AWQ and SmoothQuant


def activation_aware(params, specs: Mapping[str, QuantSpec], calib):
  """AWQ and SmoothQuant over a model: (params with scales folded in, {path: QArray}, report).

  `specs` maps kernel paths to their AWQ or SmoothQuant specs. Statistics come from one
  pass over the float model, as upstream (llm-awq feeds each block the float outputs of
  the previous one; scaling does not change the float function). Per block:

  * AWQ: for each `smooth.ScaleGroup` whose kernels are all AWQ with one (bits, group),
    s = (mean |x|)^r is searched on a grid of r, scoring each r as upstream: q / k / v by
    the attention module's output and gate / up by the MLP's output on the block's real
    float inputs (`model.calibration.block_inputs`), the linears after v / up by their own
    output error (exact from X^T X); all of a block's scales are searched on the original
    weights, then folded in; each AWQ kernel
    is then clipped by `awq_clip_search_stats` on its scaled inputs (q and k are not
    clipped, as upstream) and quantized to an asymmetric grouped QArray.
  * SmoothQuant: for the two norm groups whose kernels are all SmoothQuant, s from
    max |x| and max |W| (`smooth.smoothquant_scales`) is folded in; the kernels stay float
    here and are quantized W8A8 by the caller.
  """
  calib = calib_lib.check_calibration(calib, what="AWQ / SmoothQuant")
  cfg = calib.cfg
  groups = smooth.scale_groups(cfg)
  awq = {p for p, s in specs.items() if s.method == "awq"}
  sq = {p for p, s in specs.items() if s.method == "smoothquant"}

  def uniform(group, members, key):
    if not all(k in members for k in group.kernels):
      return None
    keys = {key(specs[k]) for k in group.kernels}
    if len(keys) > 1:
      raise ValueError(f"kernels {list(group.kernels)} share one input, so their scales are "
                       f"searched together; they need one spec, got {sorted(map(str, keys))}")
    return specs[group.kernels[0]]

  awq_groups = [(g, s) for g in groups
                if (s := uniform(g, awq, lambda s: (s.bits, s.group_size))) is not None]
  sq_groups = [(g, s) for g in groups if g.prev_is_norm
               if (s := uniform(g, sq, lambda s: s.alpha)) is not None]
  # Statistics: each group's shared input once (its first kernel), every other AWQ kernel.
  rep = {k: g.kernels[0] for g, _ in (*awq_groups, *sq_groups) for k in g.kernels}
  need = sorted({rep.get(p, p) for p in awq} | {rep[p] for g, _ in sq_groups for p in g.kernels})
  stats = calib_lib.calibrate(cfg, params, calib.batches, paths=need, hessian=bool(awq))
  calib_lib.check_stats(stats, need, hessian=bool(awq))

  report, in_scale = {}, {}
  module_losses = _module_losses(cfg, params, calib.batches, stats,
                                 [(g, s) for g, s in awq_groups if g.prev_is_norm])
  for g, s in awq_groups:
    st = stats[g.kernels[0]]
    if g.prev_is_norm:  # the attention / MLP output, as upstream's `module2inspect`
      losses = module_losses[g.prev]
      best = int(jnp.argmin(losses))
      scale, ratio = _ratio_scale(st.abs_mean, best / AWQ_GRID), best / AWQ_GRID
    else:  # a single linear after v / up: its output error, exactly from X^T X
      w_cat = jnp.concatenate([get_path(params, k) for k in g.kernels], axis=1)
      scale, ratio, losses = awq_scale_search_stats(
          w_cat, st.xtx, st.abs_mean, st.count, bits=s.bits, group_size=s.group_size,
          n_grid=AWQ_GRID)
    report[g.prev] = dict(kernels=list(g.kernels), ratio=ratio,
                          loss_rtn=float(losses[0]), loss_awq=float(jnp.min(losses)))
    in_scale.update({k: scale for k in g.kernels})
  for g, s in sq_groups:
    st = stats[g.kernels[0]]
    scale = smooth.smoothquant_scales(st.abs_max, [get_path(params, k) for k in g.kernels],
                                      s.alpha)
    report[g.prev] = dict(kernels=list(g.kernels), alpha=s.alpha,
                          scale_min=float(jnp.min(scale)), scale_max=float(jnp.max(scale)))
    params = smooth.apply_scale(params, g, scale)
  for g, _ in awq_groups:
    params = smooth.apply_scale(params, g, in_scale[g.kernels[0]])

  out = {}
  for p in sorted(awq):
    s, w = specs[p], get_path(params, p)
    if is_weight_leaf(w):
      raise ValueError(f"awq on {p}: the leaf is already {type(w).__name__}; AWQ needs a float "
                       "kernel")
    if p.endswith(("/q/kernel", "/k/kernel")):
      max_val = None  # upstream: "due to qk bmm, it is hard to clip precisely"
    else:
      xtx = stats[rep.get(p, p)].xtx
      if p in in_scale:
        xtx = xtx / (in_scale[p][:, None] * in_scale[p][None, :])
      max_val, _ = awq_clip_search_stats(w, xtx, bits=s.bits, group_size=s.group_size)
    out[p] = clip_and_quantize(w, max_val, bits=s.bits, group_size=s.group_size)
  return params, out, report


AWQ_GRID = 20  # llm-awq's n_grid: ratios 0, 1/20, ..., 19/20


def _module_losses(cfg, params, batches, stats, groups) -> dict:
  """{group.prev: summed squared module-output error f32[AWQ_GRID]} for AWQ's norm groups."""
  if not groups:
    return {}
  by_layer: dict[int, list] = {}
  for g, s in groups:
    by_layer.setdefault(int(g.prev.split("/")[0].split("_")[1]), []).append((g, s))
  out = {}
  for layer, inputs in calib_lib.block_inputs(cfg, params, batches):
    if layer not in by_layer:
      continue
    block = params[f"layers_{layer}"]
    for g, s in by_layer[layer]:
      part = g.prev.split("/")[1].removesuffix("_norm")  # "attn" | "mlp"
      names = tuple(k.split("/", 1)[1] for k in g.kernels)
      x_max = stats[g.kernels[0]].abs_mean
      total = 0.0
      for x, positions, seg in inputs:
        if part == "mlp":
          x = x + _module_out(cfg, block, x, positions, seg, layer=layer, part="attn")
        total = total + _ratio_losses(cfg, block, x, positions, seg, x_max, layer=layer,
                                      part=part, names=names, bits=s.bits,
                                      group_size=s.group_size)
      out[g.prev] = total
  return out


@functools.partial(jax.jit, static_argnames=("cfg", "layer", "part"))
def _module_out(cfg, block, x_BTD, positions, seg, *, layer, part):
  """The attention or MLP sublayer's output (norm included) on block input x."""
  b, t, _ = x_BTD.shape
  norm = RMSNorm(cfg.norm_eps, cfg.jnp_dtype, cfg.jnp_param_dtype)
  xn = norm.apply({"params": block[f"{part}_norm"]}, x_BTD)
  if part == "attn":
    ctx = context(b, t, positions=positions, segment_ids=seg)
    return Attention(cfg).apply({"params": block["attn"]}, xn, ctx, layer)[0]
  return MLP(cfg).apply({"params": block["mlp"]}, xn)


@functools.partial(jax.jit, static_argnames=("cfg", "layer", "part", "names", "bits",
                                             "group_size"))
def _ratio_losses(cfg, block, x_BTD, positions, seg, x_max, *, layer, part, names, bits,
                  group_size):
  ref = _module_out(cfg, block, x_BTD, positions, seg, layer=layer, part=part)
  weight = 1.0 if seg is None else (seg > 0)[..., None].astype(jnp.float32)

  def loss(r):
    s = _ratio_scale(x_max, r)
    blk = block
    for name in names:
      w = get_path(block, name).astype(jnp.float32)
      blk = replace_path(blk, name, _fake_quant(w * s[:, None], bits, group_size) / s[:, None])
    out = _module_out(cfg, blk, x_BTD, positions, seg, layer=layer, part=part)
    return jnp.sum(weight * (out - ref) ** 2)

  return jax.lax.map(loss, jnp.arange(AWQ_GRID, dtype=jnp.float32) / AWQ_GRID)

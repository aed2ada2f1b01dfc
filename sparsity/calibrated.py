"""Data-aware one-shot pruning of a whole model: Wanda, SparseGPT, saliency, OWL ratios.

The per-layer maths lives in `sparsity.oneshot` (public one-layer functions) and
`quant.obs` (the OBS column solver shared with GPTQ); this module walks the
model: it plans per-kernel targets from the rules and the sparsity
distribution, gathers calibration statistics (`model.calibration`: sequential,
block by block on the already-pruned blocks as upstream does, or one pass) and
replaces each targeted kernel.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Mapping

import jax
import jax.numpy as jnp
import numpy as np

from model import calibration as calib_lib
from model import transformer
from model.config import ModelConfig
from model.tree import flatten, get_path, is_weight_leaf, replace_path
from quant import rtn
from sparsity import oneshot
from sparsity import rules as rules_lib

LAYER_METHODS = ("wanda", "sparsegpt")


@dataclasses.dataclass(frozen=True)
class Target:
  """What one kernel is pruned to: a sparsity, or N:M (n kept of every m inputs)."""

  sparsity: float | None = None
  n: int | None = None
  m: int | None = None

  def kwargs(self) -> dict:
    return dict(sparsity=self.sparsity, n=self.n, m=self.m)


def check_finite(paths, leaves, what: str = "param") -> None:
  """ValueError naming the first leaf with NaN or Inf."""
  for path, leaf in zip(paths, leaves, strict=True):
    if not bool(jnp.isfinite(leaf).all()):
      raise ValueError(f"{what} {path} contains NaN or Inf; refusing to prune it")


def plan_targets(params, target: Target, rules: rules_lib.Rules = (),
                 per_path: Mapping[str, float] | None = None) -> dict[str, Target]:
  """{kernel path: Target} for every leaf the rules prune (validated, before any compute).

  per_path: per-kernel sparsities from a distribution (OWL, ERK); a float rule
  override still wins over it. N:M recipes reject float overrides.
  """
  paths, leaves, _ = flatten(params)
  spec = rules_lib.resolve(paths, rules)
  out = {}
  for path, leaf in zip(paths, leaves, strict=True):
    s = spec[path]
    if s is None:
      continue
    if is_weight_leaf(leaf):
      raise ValueError(f"param {path} is already quantized or N:M compressed "
                       f"({type(leaf).__name__}); prune before quantizing / compressing")
    if leaf.ndim != 2:
      raise ValueError(f"param {path} has shape {tuple(leaf.shape)}; one-shot methods prune "
                       "2-D [in, out] kernels only (add a rule 'REGEX=none' to skip it)")
    if target.n is not None:
      if s != rules_lib.PRUNE:
        raise ValueError(f"rule sparsity {s} for {path} cannot apply to an N:M recipe "
                         f"({target.n}:{target.m}); use 'none' or 'prune'")
      if leaf.shape[0] % target.m:
        raise ValueError(f"N:M group size m={target.m} does not divide the input dimension "
                         f"{leaf.shape[0]} of {path}")
      out[path] = target
      continue
    if s == rules_lib.PRUNE:
      s = per_path[path] if per_path is not None and path in per_path else target.sparsity
    out[path] = Target(sparsity=float(s))
  check_finite(list(out), [dict(zip(paths, leaves, strict=True))[p] for p in out])
  return out


@functools.cache
def _row_quantizer(bits: int):
  # One function object per bit width: the compiled sweep is reused across layers.
  return functools.partial(rtn.fake_quantize_row, bits=bits)


def _prune_kernel(method: str, kernel, stats: calib_lib.KernelStats, t: Target, opts: dict):
  if method == "wanda":
    keep = oneshot.wanda_mask(kernel, stats.x_norm, **t.kwargs())
    return jnp.where(keep, kernel, jnp.zeros((), kernel.dtype)), keep
  bits = opts.get("bits")
  quantize = scale = None
  if bits:
    # Joint prune + quantize in one OBS pass (SparseGPT's joint mode): kept weights are
    # rounded onto per-channel grids fixed from the dense kernel, errors propagate.
    scale = rtn.symmetric_scale(kernel, bits)
    quantize = jax.tree_util.Partial(_row_quantizer(bits), scale[0])
  new, keep = oneshot.sparsegpt_prune(kernel, stats.hessian(), **t.kwargs(),
                                      blocksize=opts.get("blocksize", 128),
                                      percdamp=opts.get("percdamp", 0.01), quantize=quantize)
  return (rtn.on_grid(new, scale, bits) if bits else new), keep


def prune_calibrated(params, method: str, targets: Mapping[str, Target],
                     calib: calib_lib.Calibration, **opts):
  """Prunes every kernel in `targets` with Wanda or SparseGPT: (params, mask tree).

  Sequential calibration handles the decoder blocks in order; kernels outside
  the blocks (an LM head a rule selects) are calibrated afterwards on the pruned model.
  """
  if method not in LAYER_METHODS:
    raise ValueError(f"method={method!r}; valid: {LAYER_METHODS}")
  cfg = calib.cfg
  hessian = method == "sparsegpt"
  masks: dict[str, jax.Array] = {}

  def prune_paths(tree, stats, paths, prefix=""):
    calib_lib.check_stats(stats, paths, hessian=hessian)
    for p in paths:
      local = p[len(prefix):]
      try:
        new, keep = _prune_kernel(method, get_path(tree, local), stats[p], targets[p], opts)
      except ValueError as e:  # e.g. a Hessian that stays singular after the damping retries
        raise ValueError(f"{method} on {p}: {e}") from None
      tree, masks[p] = replace_path(tree, local, new), keep
    return tree

  in_blocks = [p for p in targets if p.startswith("layers_")]
  others = [p for p in targets if not p.startswith("layers_")]
  if calib.sequential:
    def update(layer, block, stats):
      prefix = f"layers_{layer}/"
      return prune_paths(block, stats, [p for p in in_blocks if p.startswith(prefix)], prefix)
    params = calib_lib.calibrate_sequential(cfg, params, calib.batches, update,
                                            paths=list(targets), hessian=hessian)
    if others:
      stats = calib_lib.calibrate(cfg, params, calib.batches, paths=others, hessian=hessian)
      params = prune_paths(params, stats, others)
  else:
    stats = calib_lib.calibrate(cfg, params, calib.batches, paths=list(targets),
                                hessian=hessian)
    params = prune_paths(params, stats, list(targets))
  return params, mask_tree(params, masks)


def mask_tree(params, masks: Mapping[str, jax.Array]):
  """A params-structured mask tree from {path: mask} (None elsewhere)."""
  paths, _, treedef = flatten(params)
  return jax.tree_util.tree_unflatten(treedef, [masks.get(p) for p in paths])


# --- Layer-wise sparsity from outliers (OWL, Yin et al. 2024).

def owl_sparsities(params, targets: Mapping[str, Target], calib: calib_lib.Calibration,
                   sparsity: float, *, lam: float = 0.08, outlier_m: float = 5.0
                   ) -> dict[str, float]:
  """Per-kernel sparsity: decoder blocks with more Wanda-score outliers are pruned less.

  A block's outlier ratio D_l is the fraction of its scores |W| * ||X|| above
  `outlier_m` times their mean; ratios are rescaled to [0, 2 * lam], centred, and
  block l gets density (1 - sparsity) + that offset, clipped to [0, 1). All kernels
  of a block share its ratio; kernels outside the blocks keep `sparsity`.
  """
  if not 0.0 <= lam < 1.0:
    raise ValueError(f"owl lambda={lam} outside the valid range [0, 1)")
  if outlier_m <= 0:
    raise ValueError(f"owl M={outlier_m} must be > 0")
  stats = calib_lib.calibrate(calib.cfg, params, calib.batches, paths=list(targets),
                              hessian=False)
  calib_lib.check_stats(stats, list(targets))
  by_layer: dict[str, list[str]] = {}
  for p in targets:
    if p.startswith("layers_"):
      by_layer.setdefault(p.split("/")[0], []).append(p)
  names = sorted(by_layer, key=lambda n: int(n.split("_")[1]))
  ratios = []
  for name in names:
    scores = jnp.concatenate([
        (jnp.abs(get_path(params, p)) * stats[p].x_norm[:, None]).reshape(-1)
        for p in by_layer[name]])
    ratios.append(float(jnp.mean(scores > outlier_m * jnp.mean(scores))))
  r = np.asarray(ratios, np.float64)
  spread = r.max() - r.min() if r.size else 0.0
  r = (r - r.min()) / spread * 2 * lam if spread > 0 else np.zeros_like(r)
  density = r - r.mean() + (1.0 - sparsity)
  out = {p: sparsity for p in targets}
  for name, d in zip(names, density, strict=True):
    s = float(np.clip(1.0 - d, 0.0, 0.999))
    out.update({p: s for p in by_layer[name]})
  return out


# --- Saliency |w * dL/dw| (SNIP-style) on the calibration batches.

def _nll(cfg: ModelConfig, params, tokens, seg):
  logits, _ = transformer.apply(cfg, params, tokens, segment_ids=seg)
  logp = jax.nn.log_softmax(logits[:, :-1], -1)
  ll = jnp.take_along_axis(logp, tokens[:, 1:, None], -1)[..., 0]
  if seg is None:
    return -jnp.mean(ll)
  w = ((seg[:, 1:] == seg[:, :-1]) & (seg[:, 1:] > 0)).astype(jnp.float32)
  return -jnp.sum(ll * w) / jnp.maximum(jnp.sum(w), 1.0)


@functools.partial(jax.jit, static_argnums=0)
def _grad(cfg: ModelConfig, params, tokens, seg):
  return jax.grad(lambda p: _nll(cfg, p, tokens, seg))(params)


def calibration_grads(params, calib: calib_lib.Calibration):
  """Mean next-token NLL gradient over the calibration batches (same structure as params)."""
  total = None
  for batch in calib.batches:
    tokens, seg = calib_lib.split_batch(batch)
    seg = None if seg is None else jnp.asarray(seg, jnp.int32)
    g = _grad(calib.cfg, params, tokens, seg)
    total = g if total is None else jax.tree.map(jnp.add, total, g)
  return jax.tree.map(lambda x: x / len(calib.batches), total)

"""Structured pruning: whole FFN neurons, query heads or KV groups, and a physical shrink.

  masks, keep = structured_masks(cfg, params, neurons=0.5)   # zeroing masks + kept indices
  new_cfg, new_params = shrink(cfg, params, keep)            # a smaller dense model
  new_cfg, new_params, report = prune_structured(cfg, params, neurons=0.5, heads=0.5)

Counts are uniform across layers (`ModelConfig` has one ffn_dim / n_heads /
n_kv_heads): every layer loses exactly `n_pruned(neurons, F)` neurons, the lowest
scored of that layer. Head modes, both GQA aware (query head h reads kv head
h // G, G = H / K):
  "heads"      every KV group loses `n_pruned(heads, G)` query heads (so H' = K * G'),
               its lowest scored; all kv heads stay.
  "kv_groups"  `n_pruned(heads, K)` whole groups (a kv head and its G query heads) go.
`n_pruned` rounds to the nearest count, halves up (heads=0.25 of G=2 prunes 1).
Ranking is a stable ascending sort: on ties the lower index is pruned first.

Scores estimate how much a unit writes into the residual stream; the score is
the L2 norm of its output contribution:
  neuron j, weight only:  ||gate[:, j]|| * ||up[:, j]|| * ||down[j, :]||. Under an
      isotropic input, the gate and up pre-activations scale with their column norms
      and silu(a) * b with their product, and the output with the down row. A product
      is zero when any factor is (a neuron with a dead down row writes nothing), which
      a sum of squares would miss.
  neuron j, calibrated:   ||down[j, :]|| * sqrt(sq_norm_down[j]) (Wanda-style): the
      down kernel's input j is neuron j's activation, so the square of this is the
      exact energy, summed over calibration tokens, of that neuron's output.
  query head h:           sqrt(<C_h, O_h O_h^T>), O_h the o kernel rows of head h
      ([Dh, D]) and C_h the second moment of those inputs: the xtx block when
      calib gives one (exact energy), else diag(sq_norm) (the diagonal estimate,
      which for a single row is the neuron formula above); weight only, C_h =
      V_g^T V_g with V_g the v kernel columns of its kv head (the OV-circuit norm
      ||V_g O_h||_F, attention mixing and biases ignored). q/k only shape the
      attention pattern, not its magnitude, so they do not enter.
  KV group g:             the same over all G heads of the group (with xtx the whole
      block, cross-head terms included; otherwise the sum of the head energies).
`count` only rescales a layer's scores and does not change any ranking.
"""

from __future__ import annotations

import dataclasses
import functools
import re
from collections.abc import Mapping, Sequence
from typing import Any

import jax.numpy as jnp
import numpy as np

import model
from model.config import ModelConfig
from model.qarray import is_qarray
from model.tree import flatten
from sparsity.masks import n_pruned
from sparsity.rules import check_sparsity

HEAD_MODES = ("heads", "kv_groups")

# Layer-relative path -> (index set, axis it slices). "ffn": neurons, "q": the columns
# of kept query heads, "kv": those of kept kv heads. Other leaves are never sliced.
_SLICES = {
    "attn/q/kernel": ("q", 1), "attn/q/bias": ("q", 0),
    "attn/k/kernel": ("kv", 1), "attn/k/bias": ("kv", 0),
    "attn/v/kernel": ("kv", 1), "attn/v/bias": ("kv", 0),
    "attn/o/kernel": ("q", 0),
    "mlp/gate/kernel": ("ffn", 1), "mlp/up/kernel": ("ffn", 1), "mlp/down/kernel": ("ffn", 0),
}
_LAYER = re.compile(r"^layers_(\d+)/(.+)$")


@dataclasses.dataclass(frozen=True, eq=False)
class LayerKeep:
  """What one layer keeps: sorted indices of neurons, query heads and kv heads (i32)."""

  neurons: np.ndarray  # i32[F']
  q_heads: np.ndarray  # i32[H']
  kv_heads: np.ndarray  # i32[K']

  def to_dict(self) -> dict[str, list[int]]:
    """JSON-able lists."""
    return {f.name: getattr(self, f.name).tolist() for f in dataclasses.fields(self)}


Keep = tuple[LayerKeep, ...]


# ----------------------------------------------------------------------------- validation

@functools.lru_cache(maxsize=16)
def _expected_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
  paths, leaves, _ = flatten(model.param_shapes(cfg))
  return {p: tuple(x.shape) for p, x in zip(paths, leaves, strict=True)}


def _check_cfg_params(cfg, params) -> dict[str, Any]:
  """{path: leaf} of `params`, or ValueError unless they are float params of `cfg`."""
  if not isinstance(cfg, ModelConfig):
    raise ValueError(f"cfg={type(cfg).__name__} must be a model.ModelConfig")
  paths, leaves, _ = flatten(params)
  want = _expected_shapes(cfg)
  missing, extra = sorted(set(want) - set(paths)), sorted(set(paths) - set(want))
  if missing or extra:
    raise ValueError(f"params do not match cfg: missing {missing[:4]}, unexpected {extra[:4]}")
  for path, leaf in zip(paths, leaves, strict=True):
    if is_qarray(leaf):
      raise ValueError(f"param {path} is quantized; prune structurally before quantizing")
    if tuple(leaf.shape) != want[path]:
      raise ValueError(f"params do not match cfg: {path} has shape {tuple(leaf.shape)}, "
                       f"cfg expects {want[path]}")
  return dict(zip(paths, leaves, strict=True))


def _check_calib(cfg: ModelConfig, calib, kernel: str) -> None:
  """ValueError unless `calib` has statistics of the right shape for `kernel` of every layer."""
  if not isinstance(calib, Mapping):
    raise ValueError(f"calib={type(calib).__name__} must be a mapping from kernel path to "
                     "statistics (.sq_norm, .xtx, .count)")
  n_in = cfg.ffn_dim if kernel == "mlp/down/kernel" else cfg.n_heads * cfg.dh
  for i in range(cfg.n_layers):
    path = f"layers_{i}/{kernel}"
    if path not in calib:
      raise ValueError(f"calib has no statistics for {path!r} (needed for activation-aware "
                       f"scores); it has {sorted(calib)[:4]}")
    st = calib[path]
    if not all(hasattr(st, a) for a in ("sq_norm", "xtx", "count")):
      raise ValueError(f"calib[{path!r}] must have .sq_norm, .xtx and .count")
    if tuple(np.shape(st.sq_norm)) != (n_in,):
      raise ValueError(f"calib[{path!r}].sq_norm has shape {tuple(np.shape(st.sq_norm))}, "
                       f"expected ({n_in},)")
    if st.xtx is not None and tuple(np.shape(st.xtx)) != (n_in, n_in):
      raise ValueError(f"calib[{path!r}].xtx has shape {tuple(np.shape(st.xtx))}, "
                       f"expected ({n_in}, {n_in}) or None")
    if int(st.count) < 1:
      raise ValueError(f"calib[{path!r}].count={int(st.count)} must be >= 1 token")


def _max_fraction(size: int) -> float:
  """The supremum of fractions that leave at least one of `size` units."""
  return (size - 0.5) / size


def _plan(cfg: ModelConfig, neurons, heads, head_mode) -> tuple[float, float, int, int, int]:
  """Validated (neurons, heads, neurons pruned per layer, heads per group, groups)."""
  neurons = check_sparsity(neurons, "neurons")
  heads = check_sparsity(heads, "heads")
  if head_mode not in HEAD_MODES:
    raise ValueError(f"head_mode={head_mode!r} is not valid; choose one of {HEAD_MODES}")
  f, k, g = cfg.ffn_dim, cfg.n_kv_heads, cfg.n_heads // cfg.n_kv_heads
  n_neurons = n_pruned(neurons, f)
  if n_neurons >= f:
    raise ValueError(f"neurons={neurons} would prune all {f} FFN neurons of every layer "
                     f"(n_pruned rounds to nearest); valid range [0, {_max_fraction(f):.4g})")
  per_group = n_groups = 0
  if head_mode == "heads":
    per_group = n_pruned(heads, g)
    if per_group >= g:
      raise ValueError(
          f"heads={heads} would prune all {g} query heads of every KV group (head_mode='heads' "
          f"prunes n_pruned(heads, n_heads / n_kv_heads) per group); valid range "
          f"[0, {_max_fraction(g):.4g})")
  else:
    n_groups = n_pruned(heads, k)
    if n_groups >= k:
      raise ValueError(
          f"heads={heads} would prune all {k} KV groups (head_mode='kv_groups' prunes "
          f"n_pruned(heads, n_kv_heads) groups); valid range [0, {_max_fraction(k):.4g})")
  return neurons, heads, n_neurons, per_group, n_groups


# ----------------------------------------------------------------------------- scores

def _f32(x) -> np.ndarray:
  return np.asarray(x, np.float32)


def _neuron_scores(cfg: ModelConfig, leaves: dict, calib) -> np.ndarray:
  out = []
  for i in range(cfg.n_layers):
    down = np.linalg.norm(_f32(leaves[f"layers_{i}/mlp/down/kernel"]), axis=1)
    if calib is not None:
      sq = np.maximum(_f32(calib[f"layers_{i}/mlp/down/kernel"].sq_norm), 0.0)
      out.append(down * np.sqrt(sq))
    else:
      gate = np.linalg.norm(_f32(leaves[f"layers_{i}/mlp/gate/kernel"]), axis=0)
      up = np.linalg.norm(_f32(leaves[f"layers_{i}/mlp/up/kernel"]), axis=0)
      out.append(gate * up * down)
  return np.stack(out)


def _head_energies(cfg: ModelConfig, leaves: dict, calib, i: int, groups: bool) -> np.ndarray:
  """f32[H] (or f32[K] with `groups`): <C, O O^T> per query head (or per KV group)."""
  h, k, dh, d = cfg.n_heads, cfg.n_kv_heads, cfg.dh, cfg.d_model
  g = h // k
  o = _f32(leaves[f"layers_{i}/attn/o/kernel"])
  st = calib[f"layers_{i}/attn/o/kernel"] if calib is not None else None
  if st is not None and st.xtx is not None and groups:
    x = _f32(st.xtx).reshape(k, g * dh, k, g * dh)
    c = x[np.arange(k), :, np.arange(k), :]  # [K, G*Dh, G*Dh] diagonal blocks
    og = o.reshape(k, g * dh, d)
    return np.einsum("kij,kid,kjd->k", c, og, og)
  oh = o.reshape(h, dh, d)
  if st is None:
    v = _f32(leaves[f"layers_{i}/attn/v/kernel"]).reshape(d, k, dh)
    c = np.repeat(np.einsum("dki,dkj->kij", v, v), g, axis=0)  # [H, Dh, Dh] = V_g^T V_g
    e = np.einsum("hij,hid,hjd->h", c, oh, oh)
  elif st.xtx is not None:
    x = _f32(st.xtx).reshape(h, dh, h, dh)
    e = np.einsum("hij,hid,hjd->h", x[np.arange(h), :, np.arange(h), :], oh, oh)
  else:
    sq = np.maximum(_f32(st.sq_norm), 0.0).reshape(h, dh)
    e = np.einsum("hi,hid->h", sq, oh * oh)
  return e.reshape(k, g).sum(1) if groups else e


def _scores(cfg, leaves, calib, groups: bool) -> np.ndarray:
  e = np.stack([_head_energies(cfg, leaves, calib, i, groups) for i in range(cfg.n_layers)])
  return np.sqrt(np.maximum(e, 0.0))


def neuron_scores(cfg: ModelConfig, params, calib: Mapping | None = None) -> np.ndarray:
  """f32[L, F] FFN neuron importances (weight-only, or activation-aware given calib)."""
  leaves = _check_cfg_params(cfg, params)
  if calib is not None:
    _check_calib(cfg, calib, "mlp/down/kernel")
  return _neuron_scores(cfg, leaves, calib)


def head_scores(cfg: ModelConfig, params, calib: Mapping | None = None) -> np.ndarray:
  """f32[L, H] query head importances (weight-only OV norm, or activation-aware)."""
  leaves = _check_cfg_params(cfg, params)
  if calib is not None:
    _check_calib(cfg, calib, "attn/o/kernel")
  return _scores(cfg, leaves, calib, groups=False)


def group_scores(cfg: ModelConfig, params, calib: Mapping | None = None) -> np.ndarray:
  """f32[L, K] KV group importances (a kv head with all its query heads)."""
  leaves = _check_cfg_params(cfg, params)
  if calib is not None:
    _check_calib(cfg, calib, "attn/o/kernel")
  return _scores(cfg, leaves, calib, groups=True)


# ----------------------------------------------------------------------------- masks, shrink

def _kept(score: np.ndarray, n: int) -> np.ndarray:
  """Sorted indices of all but the `n` lowest scores (stable: ties prune lower indices)."""
  order = np.argsort(score, kind="stable")
  return np.sort(order[n:]).astype(np.int32)


def _columns(heads: np.ndarray, dh: int) -> np.ndarray:
  return (heads[:, None] * dh + np.arange(dh)[None]).reshape(-1).astype(np.int32)


def _index_sets(cfg: ModelConfig, lk: LayerKeep) -> dict[str, np.ndarray]:
  return {"ffn": lk.neurons, "q": _columns(lk.q_heads, cfg.dh),
          "kv": _columns(lk.kv_heads, cfg.dh)}


def structured_masks(cfg: ModelConfig, params, *, neurons: float = 0.0, heads: float = 0.0,
                     head_mode: str = "heads", calib: Mapping | None = None
                     ) -> tuple[Any, Keep]:
  """(params-structured mask tree zeroing pruned neurons / heads, per-layer `LayerKeep`s).

  Masked leaves: gate/up columns and down rows (neurons > 0); q kernel columns, q bias
  and o rows (heads > 0); also k/v columns and biases (head_mode="kv_groups"). Norm
  scales and every other leaf are None (dense).
  """
  neurons, heads, n_neurons, per_group, n_groups = _plan(cfg, neurons, heads, head_mode)
  leaves = _check_cfg_params(cfg, params)
  if calib is not None and neurons > 0:
    _check_calib(cfg, calib, "mlp/down/kernel")
  if calib is not None and heads > 0:
    _check_calib(cfg, calib, "attn/o/kernel")
  h, k = cfg.n_heads, cfg.n_kv_heads
  g = h // k
  all_heads, all_groups = np.arange(h, dtype=np.int32), np.arange(k, dtype=np.int32)
  nscore = _neuron_scores(cfg, leaves, calib) if neurons > 0 else None
  hscore = _scores(cfg, leaves, calib, groups=head_mode == "kv_groups") if heads > 0 else None
  keep = []
  for i in range(cfg.n_layers):
    kept_n = (_kept(nscore[i], n_neurons) if nscore is not None
              else np.arange(cfg.ffn_dim, dtype=np.int32))
    q_heads, kv_heads = all_heads, all_groups
    if hscore is not None and head_mode == "heads":
      per = [j * g + _kept(hscore[i, j * g:(j + 1) * g], per_group) for j in range(k)]
      q_heads = np.concatenate(per).astype(np.int32)
    elif hscore is not None:
      kv_heads = _kept(hscore[i], n_groups)
      q_heads = _columns(kv_heads, g)  # the G query heads of each kept group
    keep.append(LayerKeep(kept_n, q_heads, kv_heads))
  active = {"ffn": neurons > 0, "q": heads > 0, "kv": heads > 0 and head_mode == "kv_groups"}
  return _map_layers(cfg, params, tuple(keep), active, _mask_leaf), tuple(keep)


def _mask_leaf(leaf, idx: np.ndarray, axis: int):
  keep = np.zeros(leaf.shape[axis], bool)
  keep[idx] = True
  shape = [1] * len(leaf.shape)
  shape[axis] = -1
  return jnp.asarray(np.broadcast_to(keep.reshape(shape), leaf.shape))


def _take_leaf(leaf, idx: np.ndarray, axis: int):
  return jnp.take(leaf, jnp.asarray(idx), axis=axis)


def _map_layers(cfg: ModelConfig, params, keep: Keep, active: dict[str, bool] | None, fn):
  """Applies `fn(leaf, idx, axis)` to sliceable leaves; others: None (masks) or unchanged."""
  paths, leaves, treedef = flatten(params)
  out = []
  for path, leaf in zip(paths, leaves, strict=True):
    m = _LAYER.match(path)
    kind, axis = _SLICES.get(m.group(2), (None, None)) if m else (None, None)
    if kind is None or (active is not None and not active[kind]):
      out.append(None if active is not None else leaf)
      continue
    out.append(fn(leaf, _index_sets(cfg, keep[int(m.group(1))])[kind], axis))
  return treedef.unflatten(out)


def _check_keep(cfg: ModelConfig, keep) -> Keep:
  if (not isinstance(keep, Sequence) or len(keep) != cfg.n_layers
      or not all(isinstance(lk, LayerKeep) for lk in keep)):
    n = len(keep) if hasattr(keep, "__len__") else "?"
    raise ValueError(f"keep must be a sequence of {cfg.n_layers} LayerKeep (one per layer, "
                     f"from structured_masks); got {type(keep).__name__} of length {n}")
  g = cfg.n_heads // cfg.n_kv_heads
  limits = {"neurons": cfg.ffn_dim, "q_heads": cfg.n_heads, "kv_heads": cfg.n_kv_heads}
  for i, lk in enumerate(keep):
    for name, size in limits.items():
      idx = np.asarray(getattr(lk, name))
      ok = (idx.ndim == 1 and idx.size >= 1 and np.issubdtype(idx.dtype, np.integer)
            and idx.min() >= 0 and idx.max() < size and bool(np.all(np.diff(idx) > 0)))
      if not ok:
        raise ValueError(f"keep[{i}].{name}={idx.tolist()} must be strictly increasing "
                         f"integers in [0, {size}), at least one")
      if idx.size != np.asarray(getattr(keep[0], name)).size:
        raise ValueError(f"keep[{i}].{name} keeps {idx.size}, layer 0 keeps "
                         f"{np.asarray(getattr(keep[0], name)).size}: counts must be uniform "
                         "across layers (one ModelConfig)")
    groups = np.asarray(lk.q_heads) // g
    counts = [int(np.sum(groups == j)) for j in np.asarray(lk.kv_heads)]
    if not set(groups.tolist()) <= set(np.asarray(lk.kv_heads).tolist()) or len(set(counts)) != 1:
      raise ValueError(f"keep[{i}].q_heads={np.asarray(lk.q_heads).tolist()} must keep the same "
                       "number of query heads in every kept KV group "
                       f"{np.asarray(lk.kv_heads).tolist()} (group of head h: h // {g})")
  return tuple(LayerKeep(*(np.asarray(getattr(lk, f.name), np.int32)
                           for f in dataclasses.fields(LayerKeep))) for lk in keep)


def shrink(cfg: ModelConfig, params, keep: Sequence[LayerKeep]) -> tuple[ModelConfig, Any]:
  """(smaller config, sliced dense params) keeping only `keep`'s neurons and heads."""
  _check_cfg_params(cfg, params)
  keep = _check_keep(cfg, keep)
  lk = keep[0]
  new_cfg = cfg.replace(ffn_dim=int(lk.neurons.size), n_heads=int(lk.q_heads.size),
                        n_kv_heads=int(lk.kv_heads.size), head_dim=cfg.dh)
  return new_cfg, _map_layers(cfg, params, keep, None, _take_leaf)


def prune_structured(cfg: ModelConfig, params, *, neurons: float = 0.0, heads: float = 0.0,
                     head_mode: str = "heads", calib: Mapping | None = None
                     ) -> tuple[ModelConfig, Any, dict]:
  """Scores, selects and shrinks: (new cfg, new params, JSON-able report)."""
  _, keep = structured_masks(cfg, params, neurons=neurons, heads=heads, head_mode=head_mode,
                             calib=calib)
  new_cfg, new_params = shrink(cfg, params, keep)
  before, after = model.count_params(params), model.count_params(new_params)
  layers = cfg.n_layers
  counts = {}
  for kind, old, new in (("neurons", cfg.ffn_dim, new_cfg.ffn_dim),
                         ("q_heads", cfg.n_heads, new_cfg.n_heads),
                         ("kv_heads", cfg.n_kv_heads, new_cfg.n_kv_heads)):
    counts[kind] = {"pruned_per_layer": old - new, "kept_per_layer": new,
                    "pruned": layers * (old - new)}
  report = {
      "method": "structured", "neurons": float(neurons), "heads": float(heads),
      "head_mode": head_mode, "scoring": "weight" if calib is None else "activation",
      "params_before": before, "params_after": after, "params_ratio": after / before,
      "counts": counts,
      "ffn_dim_before": cfg.ffn_dim, "ffn_dim_after": new_cfg.ffn_dim,
      "n_heads_before": cfg.n_heads, "n_heads_after": new_cfg.n_heads,
      "n_kv_heads_before": cfg.n_kv_heads, "n_kv_heads_after": new_cfg.n_kv_heads,
      "head_dim": new_cfg.dh,
  }
  return new_cfg, new_params, report

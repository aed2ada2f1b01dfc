"""Per-layer sparsity report: a JSON-able dict written next to pruned checkpoints."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from model import nm_array
from model.qarray import dequantize, is_qarray
from model.tree import flatten, leaf_nbytes, leaf_size

_count_nonzero = jax.jit(jnp.count_nonzero)


@jax.jit
def _rel_error(w: jax.Array, ref: jax.Array) -> jax.Array:
  ref = ref.astype(jnp.float32)
  err = jnp.linalg.norm(w.astype(jnp.float32) - ref)
  return err / jnp.maximum(jnp.linalg.norm(ref), 1e-30)


def sparsity_report(params, masks=None, *, dense=None) -> dict:
  """Per-leaf and total parameter counts, non-zeros, sparsity and bytes.

  Args:
    params: the (pruned) params; QArray leaves are counted on their dequantized values.
    masks: optional mask tree; leaves with a mask are flagged `masked` and summed
      into `totals.masked_*`.
    dense: optional params before pruning; adds each masked leaf's relative
      Frobenius error ||w - w_dense|| / ||w_dense||.

  `bytes` is the storage the leaf takes now (pruned weights are stored dense);
  `nonzero_bytes` counts only the non-zero values, a lower bound for any sparse
  format.
  """
  paths, leaves, treedef = flatten(params)
  mask_list = treedef.flatten_up_to(masks) if masks is not None else [None] * len(paths)
  mask_by_path = {p: m for p, m in zip(paths, mask_list, strict=True) if m is not None}
  dense_by_path = {}
  if dense is not None:
    dpaths, dleaves, _ = flatten(dense)
    dense_by_path = dict(zip(dpaths, dleaves, strict=True))

  layers = {}
  tot = dict(params=0, nonzeros=0, bytes=0, nonzero_bytes=0, masked_params=0,
             masked_nonzeros=0)
  for path, leaf in zip(paths, leaves, strict=True):
    values = (nm_array.decompress(leaf) if nm_array.is_nmarray(leaf) else
              dequantize(leaf) if is_qarray(leaf) else leaf)
    size = leaf_size(leaf)
    nnz = int(_count_nonzero(values))
    nbytes = leaf_nbytes(leaf)
    entry = dict(shape=list(leaf.shape), dtype=str(jnp.dtype(leaf.dtype)), params=size,
                 nonzeros=nnz, sparsity=1.0 - nnz / size if size else 0.0, bytes=nbytes,
                 nonzero_bytes=nnz * nbytes // size if size else 0,
                 masked=path in mask_by_path)
    if path in mask_by_path and path in dense_by_path:
      entry["rel_error"] = float(_rel_error(values, dense_by_path[path]))
    layers[path] = entry
    tot["params"] += size
    tot["nonzeros"] += nnz
    tot["bytes"] += nbytes
    tot["nonzero_bytes"] += entry["nonzero_bytes"]
    if entry["masked"]:
      tot["masked_params"] += size
      tot["masked_nonzeros"] += nnz
  tot["sparsity"] = 1.0 - tot["nonzeros"] / tot["params"] if tot["params"] else 0.0
  tot["masked_sparsity"] = (1.0 - tot["masked_nonzeros"] / tot["masked_params"]
                            if tot["masked_params"] else 0.0)
  return dict(layers=layers, totals=tot)


def format_report(report: dict) -> str:
  """A fixed-width table of the masked layers plus totals, for logs."""
  rows = [f"{'param':<36} {'shape':>14} {'sparsity':>9} {'nonzeros':>10}"]
  for path, e in report["layers"].items():
    if e["masked"]:
      shape = "x".join(map(str, e["shape"]))
      rows.append(f"{path:<36} {shape:>14} {e['sparsity']:>9.4f} {e['nonzeros']:>10}")
  t = report["totals"]
  rows.append(f"masked: {t['masked_params']} params, sparsity {t['masked_sparsity']:.4f}; "
              f"all: {t['params']} params, sparsity {t['sparsity']:.4f}, {t['bytes']} bytes "
              f"({t['nonzero_bytes']} in non-zeros)")
  return "\n".join(rows)

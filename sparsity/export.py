"""Sparse export: N:M-pruned kernels as compressed `model.NMArray` leaves (values + indices).

  pruned, _ = sparsity.prune(params, "sparsegpt:2:4", calib=calib)
  packed, report = sparsity.compress(pruned, n=2, m=4)      # f32: 0.53x the kernel bytes
  packed, _ = quant.quantize(packed, "int4")                 # 2:4 + int4: ~0.09x

`model.apply` consumes the compressed tree unchanged (`model.ops.dot` decompresses;
"load as sparse, compute as dense"); the one checkpoint format stores it.
"""

from __future__ import annotations

import jax
import numpy as np

from model import nm_array
from model.tree import flatten, is_weight_leaf, tree_nbytes
from sparsity import rules as rules_lib
from sparsity.recipes import check_nm


def compress(params, *, n: int, m: int, rules: rules_lib.Rules = ()) -> tuple[dict, dict]:
  """Compresses every kernel the pruning rules select into an N:M `NMArray`.

  Each selected kernel must already satisfy N:M along its input axis (at most n
  non-zeros in every m consecutive rows of each column), e.g. after an `N:M`
  recipe; otherwise ValueError names the kernel and the first bad group.
  Returns (params, JSON-able report with bytes before / after per kernel).
  """
  check_nm(n, m, "compress")
  paths, leaves, treedef = flatten(params)
  spec = rules_lib.resolve(paths, rules)
  out, layers = [], {}
  for path, leaf in zip(paths, leaves, strict=True):
    if spec[path] is None:
      out.append(leaf)
      continue
    if is_weight_leaf(leaf):
      raise ValueError(f"param {path} is already {type(leaf).__name__}; compress float "
                       "kernels (prune -> compress -> quantize)")
    if leaf.ndim != 2 or leaf.shape[0] % m:
      raise ValueError(f"param {path} of shape {tuple(leaf.shape)} cannot be {n}:{m} "
                       f"compressed (needs a 2-D kernel with m={m} dividing its input dim)")
    try:
      c = nm_array.compress_nm(leaf, n, m)
    except ValueError as e:
      raise ValueError(f"param {path}: {e}") from None
    layers[path] = dict(shape=list(leaf.shape), bytes_before=int(np.prod(leaf.shape))
                        * np.dtype(leaf.dtype).itemsize, bytes_after=c.nbytes)
    out.append(c)
  new = jax.tree_util.tree_unflatten(treedef, out)
  before, after = tree_nbytes(params), tree_nbytes(new)
  return new, dict(n=n, m=m, n_compressed=len(layers), bytes_before=before, bytes_after=after,
                   compression=before / after, layers=layers)

"""The param tree's vocabulary: path names, flattening, the one rule matcher, sizes.

Paths join pytree keys with "/" (`layers_3/attn/q/kernel`; the arrays inside a
QArray are `.../kernel/values`, of an NMArray `.../kernel/indices` and `.../kernel/values`
(`.../kernel/values/scale` when quantized), optimizer moments `.../mu/layers_3/...`). Every
`(regex, spec)` rule list in sparq (sparsity, quant, sharding) goes through
`match_rules`: user rules before a package's defaults, first `re.search` match
wins, and a user rule that wins no path is an error that says whether it matched
nothing or was shadowed by earlier rules. Weight leaves (`is_weight_leaf`: a QArray
or an NMArray, whose values may themselves be a QArray) are single leaves for
`flatten` and the sizes. Sizes: `tree_size` counts logical parameters (a packed int4
QArray counts what it dequantizes to, a 2:4 NMArray its dense shape) and
`tree_nbytes` the bytes as stored (packed codes + scales, kept values + packed indices).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np

from model.nm_array import is_nmarray
from model.qarray import is_qarray

Rules = Sequence[tuple[str, Any]]


def path_str(key_path) -> str:
  """'layers_0/attn/q/kernel' from a jax key path (dict keys, attributes, indices)."""
  parts = []
  for k in key_path:
    for attr in ("key", "name", "idx"):
      if hasattr(k, attr):
        parts.append(str(getattr(k, attr)))
        break
    else:
      parts.append(str(k))
  return "/".join(parts)


def is_weight_leaf(x) -> bool:
  """Whether `x` is a transformed weight kept whole by tree code (a QArray or an NMArray)."""
  return is_qarray(x) or is_nmarray(x)


def flatten(tree, is_leaf=is_weight_leaf) -> tuple[list[str], list[Any], Any]:
  """(paths, leaves, treedef) in tree-flatten order; QArrays and NMArrays are leaves by default."""
  leaves_with_path, treedef = jax.tree_util.tree_flatten_with_path(tree, is_leaf=is_leaf)
  return [path_str(p) for p, _ in leaves_with_path], [x for _, x in leaves_with_path], treedef


def _compile(rules: Rules, kind: str, convert: Callable[[Any], Any] | None
             ) -> list[tuple[re.Pattern, Any]]:
  out = []
  for rule in rules:
    if not (isinstance(rule, (tuple, list)) and len(rule) == 2 and isinstance(rule[0], str)):
      raise ValueError(f"{kind} rule {rule!r} must be a (regex, spec) pair")
    pattern, spec = rule
    try:
      rx = re.compile(pattern)
    except re.error as e:
      raise ValueError(f"{kind} rule {pattern!r} is not a valid regex: {e}") from None
    if convert is not None:
      try:
        spec = convert(spec)
      except ValueError as e:
        raise ValueError(f"{kind} rule {pattern!r}: {e}") from None
    out.append((rx, spec))
  return out


def match_rules(paths: Sequence[str], rules: Rules = (), defaults: Rules = (), *, kind: str,
                convert: Callable[[Any], Any] | None = None, unmatched: Any = None) -> list[Any]:
  """The spec of the first rule matching each path (`unmatched` where none does).

  Args:
    paths: param paths, e.g. from `flatten`.
    rules: the user's `(regex, spec)` rules, tried first; each must win a path.
    defaults: the package's rules, tried after the user's; they may win nothing.
    kind: names the rules in errors ("pruning", "quant", "sharding").
    convert: validates / converts each rule's spec (ValueError names the rule).
  """
  user, default = _compile(rules, kind, convert), _compile(defaults, kind, convert)
  wins = [0] * len(user)
  out = []
  for path in paths:
    spec = unmatched
    for i, (rx, s) in enumerate(user):
      if rx.search(path):
        wins[i] += 1
        spec = s
        break
    else:
      spec = next((s for rx, s in default if rx.search(path)), unmatched)
    out.append(spec)
  for (rx, _), n in zip(user, wins, strict=True):
    if not n:
      why = ("is shadowed by earlier rules" if any(rx.search(p) for p in paths)
             else "matches no param path")
      raise ValueError(f"{kind} rule {rx.pattern!r} {why} (rules use re.search on paths "
                       f"such as {list(paths)[:3]})")
  return out


def leaf_size(x) -> int:
  """Logical number of values of a leaf (a QArray / NMArray counts its dense shape)."""
  return int(np.prod(x.shape))


def leaf_nbytes(x) -> int:
  """Bytes a leaf occupies as stored (QArray: codes + scales + zeros; NMArray: values + indices)."""
  if is_weight_leaf(x):
    return x.nbytes
  return leaf_size(x) * np.dtype(x.dtype).itemsize


def tree_size(tree) -> int:
  """Logical parameter count of a tree (arrays, ShapeDtypeStructs, QArrays or NMArrays)."""
  return sum(leaf_size(x) for x in jax.tree.leaves(tree, is_leaf=is_weight_leaf))


def tree_nbytes(tree) -> int:
  """Bytes a tree occupies as stored, honest for packed QArray and NMArray leaves."""
  return sum(leaf_nbytes(x) for x in jax.tree.leaves(tree, is_leaf=is_weight_leaf))


def get_path(tree, path: str):
  """The node of a nested dict at a '/'-joined path ('layers_0/mlp/up/kernel')."""
  for part in path.split("/"):
    tree = tree[part]
  return tree


def replace_path(tree: dict, path: str, value) -> dict:
  """A copy of nested dict `tree` with the node at `path` replaced (other nodes shared)."""
  head, _, rest = path.partition("/")
  out = dict(tree)
  out[head] = replace_path(tree[head], rest, value) if rest else value
  return out


class NonFiniteError(ValueError):
  """A tree that must be finite holds NaN / Inf: names the leaf, where it came from, and what."""


def first_nonfinite(tree) -> tuple[str, int, int] | None:
  """(path, non-finite count, leaf size) of the first float leaf (in path order) holding
  NaN / Inf, or None. Integer leaves (codes, indices) are always finite. The arrays inside
  QArray / NMArray leaves are checked one by one (`.../kernel/scale`, ...). Concrete arrays
  only: the check runs on the host, once per call, at a public edge."""
  paths, leaves, _ = flatten(tree, is_leaf=None)
  for p, x in zip(paths, leaves, strict=True):
    if x is None or isinstance(x, jax.core.Tracer):
      continue
    a = np.asarray(x)
    if a.dtype.kind in "biu":
      continue
    if a.dtype.name == "bfloat16":  # NaN / Inf: all exponent bits set (no f32 copy needed)
      bad = int(np.count_nonzero((a.view(np.uint16) & 0x7F80) == 0x7F80))
    else:
      if a.dtype.kind not in "fc":
        a = a.astype(np.float32)  # other ml_dtypes (float8): a cast keeps NaN / Inf
      bad = int(a.size - np.count_nonzero(np.isfinite(a)))
    if bad:
      return p, bad, int(a.size)
  return None


def check_finite(tree, where: str) -> None:
  """NonFiniteError naming `where` (a file, an argument) and the first leaf with NaN / Inf."""
  found = first_nonfinite(tree)
  if found is not None:
    path, bad, size = found
    raise NonFiniteError(f"{where}: leaf {path!r} holds {bad} non-finite value(s) of {size} "
                         "(NaN / Inf); refusing to use it")

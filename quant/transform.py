"""`quantize(params, spec)`: the PTQ transform over a param tree, with its report.

Rules are ordered `(regex, spec)` pairs matched with `re.search` (as in
`sparsity.rules`; anchor with ^ / $) against '/'-joined param paths
(`layers_3/attn/q/kernel`); the first match wins and a `None` spec keeps the
leaf float. A bare recipe (`"int4:g128"`) expands to
`recipes.default_rules`. Every explicit rule must win at least one path.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from quant.qarray import QArray, dequantize, is_qarray
from quant.recipes import QuantSpec, as_spec, default_rules
from quant.rtn import _check_args, quantize_tensor

Rule = tuple[str, QuantSpec | str | None]


def path_str(key_path) -> str:
  """'/'-joined names of a jax key path (dict keys, attributes, sequence indices)."""
  parts = []
  for k in key_path:
    for attr in ("key", "name", "idx"):
      if hasattr(k, attr):
        parts.append(str(getattr(k, attr)))
        break
  return "/".join(parts)


def leaf_nbytes(x) -> int:
  """Bytes a leaf occupies (QArray: codes + scales + zero points)."""
  if is_qarray(x):
    return x.nbytes
  return int(np.prod(x.shape)) * jnp.dtype(x.dtype).itemsize


def param_bytes(params) -> int:
  """Total bytes of a param tree, counting QArray leaves honestly (packed codes)."""
  return sum(leaf_nbytes(x) for x in jax.tree.leaves(params, is_leaf=is_qarray))


def plan(params, spec) -> tuple[list[str], list[QuantSpec | None], list]:
  """Validates `spec` against `params`; returns (paths, per-leaf spec, leaves) in tree order."""
  rules, required = _rules(spec)
  flat = jax.tree_util.tree_flatten_with_path(params, is_leaf=is_qarray)[0]
  paths = [path_str(kp) for kp, _ in flat]
  leaves = [x for _, x in flat]
  compiled = [re.compile(r) for r, _ in rules]
  wins = [0] * len(rules)
  specs: list[QuantSpec | None] = []
  for path, leaf in zip(paths, leaves, strict=True):
    i = next((i for i, c in enumerate(compiled) if c.search(path)), None)
    s = None if i is None else rules[i][1]
    if i is not None:
      wins[i] += 1
    if s is not None:
      _check_leaf(path, leaf, s, rules[i][0])
    specs.append(s)
  for (regex, _), c, n, req in zip(rules, compiled, wins, required, strict=True):
    if req and not n:
      shadowed = any(c.search(p) for p in paths)
      why = "is shadowed by earlier rules" if shadowed else "matches no param path"
      raise ValueError(f"quant rule {regex!r} {why} (rules use re.search on paths such as "
                       f"{paths[:3]})")
  if not any(s is not None for s in specs):
    raise ValueError(f"quant spec={_describe(spec)} quantizes no leaf of params")
  return paths, specs, leaves


def quantize(params, spec, *, calib=None, key=None) -> tuple[dict, dict]:
  """Quantizes the kernels selected by `spec` (recipe, QuantSpec or rule list) with RTN.

  `calib` and `key` complete the transform contract; round-to-nearest uses neither.
  Returns (params with QArray leaves, JSON-able report).
  """
  del calib, key
  paths, specs, leaves = plan(params, spec)
  out, layers = [], {}
  for path, s, w in zip(paths, specs, leaves, strict=True):
    if s is None:
      out.append(w)
      continue
    q = quantize_tensor(w, **s.tensor_kwargs())
    rel, max_abs = (float(v) for v in _errors(w, q))
    layers[path] = dict(spec=s.name, shape=list(w.shape), dtype=str(jnp.dtype(w.dtype)),
                        bytes_before=leaf_nbytes(w), bytes_after=q.nbytes,
                        rel_fro_err=rel, max_abs_err=max_abs)
    out.append(q)
  treedef = jax.tree.structure(params, is_leaf=is_qarray)
  new_params = jax.tree.unflatten(treedef, out)
  return new_params, _report(spec, params, new_params, layers)


def abstract_quantize(abstract_params, spec):
  """The quantized tree's shapes/dtypes (an orbax restore target) without any compute."""
  _, specs, leaves = plan(abstract_params, spec)
  qt = lambda w, s: jax.eval_shape(lambda x: quantize_tensor(x, **s.tensor_kwargs()), w)
  out = [w if s is None else qt(w, s) for s, w in zip(specs, leaves, strict=True)]
  return jax.tree.unflatten(jax.tree.structure(abstract_params, is_leaf=is_qarray), out)


def _rules(spec) -> tuple[list[tuple[str, QuantSpec | None]], list[bool]]:
  if isinstance(spec, (str, QuantSpec)):
    return default_rules(spec), [False, True]
  if not isinstance(spec, Sequence) or not spec:
    raise ValueError(f"quant spec={spec!r} must be a recipe string, a QuantSpec or a non-empty "
                     "list of (regex, spec) rules")
  rules = []
  for rule in spec:
    if not isinstance(rule, (tuple, list)) or len(rule) != 2 or not isinstance(rule[0], str):
      raise ValueError(f"quant rule {rule!r} must be a (regex, spec) pair")
    try:
      re.compile(rule[0])
    except re.error as e:
      raise ValueError(f"quant rule {rule[0]!r} is not a valid regex: {e}") from None
    rules.append((rule[0], as_spec(rule[1])))
  return rules, [True] * len(rules)


def _check_leaf(path, leaf, s: QuantSpec, regex):
  where = f"quant rule {regex!r} selects {path!r}"
  if is_qarray(leaf):
    raise ValueError(f"{where}, which is already quantized ({leaf!r})")
  if len(leaf.shape) != 2:
    raise ValueError(f"{where} with shape {tuple(leaf.shape)}; only 2-D [in, out] kernels "
                     "can be quantized")
  try:
    _check_args(leaf.shape, leaf.dtype, **s.tensor_kwargs())
  except ValueError as e:
    raise ValueError(f"{where}: {e}") from None


@jax.jit
def _errors(w, q: QArray):
  w32 = w.astype(jnp.float32)
  d = w32 - dequantize(q, jnp.float32)
  norm = jnp.linalg.norm(w32)
  rel = jnp.where(norm > 0, jnp.linalg.norm(d) / jnp.where(norm > 0, norm, 1.0),
                  jnp.linalg.norm(d))
  return rel, jnp.max(jnp.abs(d))


def _describe(spec) -> str:
  if isinstance(spec, QuantSpec):
    return repr(spec.name)
  if isinstance(spec, str):
    return repr(spec)
  return repr([(r, getattr(s, "name", s)) for r, s in _rules(spec)[0]])


def _report(spec, params, new_params, layers) -> dict:
  before, after = param_bytes(params), param_bytes(new_params)
  q_before = sum(v["bytes_before"] for v in layers.values())
  q_after = sum(v["bytes_after"] for v in layers.values())
  rules, _ = _rules(spec)
  errs = [v["rel_fro_err"] for v in layers.values()]
  return dict(
      recipe=spec.name if isinstance(spec, QuantSpec) else spec if isinstance(spec, str) else None,
      method="rtn",
      rules=[[r, None if s is None else s.name] for r, s in rules],
      n_quantized=len(layers), bytes_before=before, bytes_after=after,
      compression=before / after, quantized_bytes_before=q_before, quantized_bytes_after=q_after,
      mean_rel_fro_err=float(np.mean(errs)), max_rel_fro_err=float(np.max(errs)),
      layers=layers)


def format_report(report: dict) -> str:
  """A fixed-width table of a `quantize` report (one row per quantized leaf plus totals)."""
  w = max([len(p) for p in report["layers"]] + [5])
  lines = [f"{'param':<{w}}  {'spec':<12} {'bytes before':>12} {'after':>10} {'rel err':>9}"]
  for p, v in report["layers"].items():
    lines.append(f"{p:<{w}}  {v['spec']:<12} {v['bytes_before']:>12,} {v['bytes_after']:>10,} "
                 f"{v['rel_fro_err']:>9.2e}")
  lines.append(f"{'total (all params)':<{w}}  {'':<12} {report['bytes_before']:>12,} "
               f"{report['bytes_after']:>10,}  x{report['compression']:.2f}")
  return "\n".join(lines)

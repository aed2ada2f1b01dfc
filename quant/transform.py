"""`quantize(params, spec)`: the PTQ transform over a param tree, with its report.

Rules are ordered `(regex, spec)` pairs matched by `model.tree.match_rules`
(`re.search`; anchor with ^ / $) against '/'-joined param paths
(`layers_3/attn/q/kernel`): user rules before `recipes.default_rules` (skip the
embedding and LM head, then the recipe on every `kernel`), first match wins, a
`None` spec keeps the leaf float, and every user rule must win a path.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from model import nm_array
from model.qarray import QArray, dequantize, is_qarray
from model.tree import (
    check_finite,
    flatten,
    is_weight_leaf,
    leaf_nbytes,
    match_rules,
    tree_nbytes,
)
from quant import calibrated
from quant.recipes import QuantSpec, as_spec, default_rules
from quant.rtn import _check_args, quantize_tensor

Rule = tuple[str, QuantSpec | str | None]


def plan(params, spec, *, rules=()) -> tuple[list[str], list[QuantSpec | None], list]:
  """Validates `spec` and `rules` against `params`; returns (paths, per-leaf spec, leaves)."""
  base, user = _split(spec, rules)
  paths, leaves, _ = flatten(params)
  specs = match_rules(paths, user, default_rules(base), kind="quant", convert=as_spec)
  for path, leaf, s in zip(paths, leaves, specs, strict=True):
    if s is not None:
      _check_leaf(path, leaf, s)
  if not any(s is not None for s in specs):
    raise ValueError(f"quant spec={_describe(base, user)} quantizes no leaf of params")
  return paths, specs, leaves


def quantize(params, spec, *, rules=(), calib=None, key=None) -> tuple[dict, dict]:
  """Quantizes the kernels selected by `spec` and `rules` with RTN.

  Args:
    spec: a recipe ("int8", "int4:g128"), a QuantSpec, None, or (shorthand for
      `rules=`) a rule list. A recipe quantizes every `kernel` but the embedding and
      LM head (`recipes.default_rules`).
    rules: `(regex, spec)` rules tried before the defaults, first match wins; a
      None spec keeps the leaf float, and every rule must win a path.
    calib: a `model.calibration.Calibration`, for GPTQ specs ("int4:g128:gptq"):
      kernels are quantized by `gptq_layer`, calibrated block by block on the
      already-quantized blocks. key: the transform contract (unused).
  Returns (params with QArray leaves, JSON-able report). Raises `model.tree.NonFiniteError`
  (a ValueError) naming the first leaf of `params` that holds NaN / Inf.
  """
  del key
  paths, specs, leaves = plan(params, spec, rules=rules)
  # A NaN / Inf weight would quantize to code 0 (only the report's error shows it); refuse
  # it before any calibration or rounding runs. Tracers are skipped.
  check_finite(params, "quant.quantize: params")
  chosen = {p: s for p, s in zip(paths, specs, strict=True) if s is not None}
  solved, scales = {}, {}
  aware = {p: s for p, s in chosen.items() if s.method in ("awq", "smoothquant")}
  if aware:
    # Scales folded into the norms / preceding kernels change those leaves too.
    params, solved, scales = calibrated.activation_aware(params, aware, calib)
    leaves = flatten(params)[1]
  gptq = {p: s for p, s in chosen.items() if s.method == "gptq"}
  if gptq:
    solved.update(calibrated.gptq_quantize(params, gptq, calib))
  out, layers = [], {}
  for path, s, w in zip(paths, specs, leaves, strict=True):
    if s is None:
      out.append(w)
      continue
    if path in solved:
      q = solved[path]
      rel, max_abs = (float(v) for v in _errors(w, _dense(q)))
    elif nm_array.is_nmarray(w):
      # N:M compressed kernel: quantize its kept values (sparse x quantized, e.g. 2:4 + int4).
      q = nm_array.with_values(w, quantize_tensor(w.values, **s.tensor_kwargs()))
      rel, max_abs = (float(v) for v in _errors(w.values, dequantize(q.values, jnp.float32)))
    else:
      q = _with_act_bits(quantize_tensor(w, **s.tensor_kwargs()), s)
      rel, max_abs = (float(v) for v in _errors(w, dequantize(q, jnp.float32)))
    layers[path] = dict(spec=s.name, shape=list(w.shape), dtype=str(jnp.dtype(w.dtype)),
                        bytes_before=leaf_nbytes(w), bytes_after=leaf_nbytes(q),
                        rel_fro_err=rel, max_abs_err=max_abs)
    out.append(q)
  new_params = jax.tree.unflatten(jax.tree.structure(params, is_leaf=is_weight_leaf), out)
  report = _report(spec, rules, params, new_params, layers)
  if scales:
    report["scales"] = scales
  return new_params, report


def abstract_quantize(abstract_params, spec, *, rules=()):
  """The quantized tree's shapes/dtypes (an orbax restore target) without any compute."""
  _, specs, leaves = plan(abstract_params, spec, rules=rules)
  def qt(w, s):
    kw = s.tensor_kwargs()
    if s.method == "awq":
      kw["symmetric"] = False  # AWQ grids are asymmetric min-max, as upstream
    q_of = lambda x, **k: jax.eval_shape(
        lambda v: _with_act_bits(quantize_tensor(v, **{**kw, **k}), s), x)
    if s.sparse:
      n, m = s.sparse
      a = nm_array.abstract_compress_nm(w, n, m)
      return nm_array.with_values(a, q_of(a.values, group_size=s.group_size and
                                          s.group_size // m * n))
    if nm_array.is_nmarray(w):
      return nm_array.with_values(w, q_of(w.values))
    return q_of(w)

  out = [w if s is None else qt(w, s) for s, w in zip(specs, leaves, strict=True)]
  return jax.tree.unflatten(jax.tree.structure(abstract_params, is_leaf=is_weight_leaf), out)


def _with_act_bits(q: QArray, s: QuantSpec) -> QArray:
  """W8A8 specs mark the leaf: `model.ops.dot` then quantizes its activations per token."""
  return dataclasses.replace(q, act_bits=s.act_bits) if s.act_bits else q


def _split(spec, rules) -> tuple[QuantSpec | None, list]:
  """(base spec, user rules); a rule list passed as `spec` is the user rules."""
  if isinstance(spec, (list, tuple)):
    if rules:
      raise ValueError("pass the quant rules either as spec or as rules=, not both")
    if not spec:
      raise ValueError("quant spec=[] is an empty rule list; pass a recipe or (regex, spec) "
                       "rules")
    return None, list(spec)
  if spec is not None and not isinstance(spec, (str, QuantSpec)):
    raise ValueError(f"quant spec={spec!r} must be a recipe string, a QuantSpec, None or a list "
                     "of (regex, spec) rules")
  return as_spec(spec), list(rules)


def _check_leaf(path, leaf, s: QuantSpec):
  where = f"quant spec {s.name!r} selects {path!r}"
  if is_qarray(leaf):
    raise ValueError(f"{where}, which is already quantized ({leaf!r})")
  compressed = nm_array.is_nmarray(leaf)
  if compressed:
    if is_qarray(leaf.values):
      raise ValueError(f"{where}, an N:M compressed kernel whose values are already quantized")
    leaf = leaf.values  # the kept values [in * n / m, out] are what gets quantized
  if len(leaf.shape) != 2:
    raise ValueError(f"{where} with shape {tuple(leaf.shape)}; only 2-D [in, out] kernels "
                     "can be quantized")
  try:
    _check_args(leaf.shape, leaf.dtype, **s.tensor_kwargs())
  except ValueError as e:
    raise ValueError(f"{where}: {e}") from None
  if compressed and s.method != "rtn":
    raise ValueError(f"{where}, an N:M compressed kernel; {s.method} needs a dense kernel "
                     "(prune and quantize it jointly with a '+N:M' recipe instead)")
  if s.sparse:
    n, m = s.sparse
    if compressed or leaf.shape[0] % m or (s.group_size and s.group_size % m):
      raise ValueError(f"{where}: +{n}:{m} needs a dense kernel whose input dim "
                       f"({leaf.shape[0]}) and group size ({s.group_size}) are multiples of "
                       f"m={m}")
    if (leaf.shape[0] // m * n) % (8 // s.bits):
      raise ValueError(f"{where}: the {leaf.shape[0] // m * n} kept rows of +{n}:{m} must be "
                       f"divisible by {8 // s.bits} (int{s.bits} packing)")


def _dense(q) -> jax.Array:
  """The f32 dense kernel a QArray or NMArray (of QArray values) stands for."""
  return nm_array.decompress(q, jnp.float32) if nm_array.is_nmarray(q) else dequantize(
      q, jnp.float32)


@jax.jit
def _errors(w, w_hat):
  w32 = w.astype(jnp.float32)
  d = w32 - w_hat
  norm = jnp.linalg.norm(w32)
  rel = jnp.where(norm > 0, jnp.linalg.norm(d) / jnp.where(norm > 0, norm, 1.0),
                  jnp.linalg.norm(d))
  return rel, jnp.max(jnp.abs(d))


def _name(spec) -> str | None:
  return None if spec is None else as_spec(spec).name


def _describe(base, user) -> str:
  return repr([(r, _name(s)) for r, s in user] if user else _name(base))


def _report(spec, rules, params, new_params, layers) -> dict:
  base, user = _split(spec, rules)
  before, after = tree_nbytes(params), tree_nbytes(new_params)
  errs = [v["rel_fro_err"] for v in layers.values()]
  return dict(
      recipe=_name(base), method=base.method if base is not None else "rtn",
      rules=[[r, _name(s)] for r, s in (*user, *default_rules(base))],
      n_quantized=len(layers), bytes_before=before, bytes_after=after,
      compression=before / after,
      quantized_bytes_before=sum(v["bytes_before"] for v in layers.values()),
      quantized_bytes_after=sum(v["bytes_after"] for v in layers.values()),
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

"""Mixed precision: "mostly 4-bit" rule sets (first / last or sensitive kernels at 8 bits).

AQT's and the quantization literature's recipe keeps the layers that hurt most in 8
bits and quantizes the rest low: `mostly_low_bit_rules` returns ordinary `(regex,
spec)` rules, so `quant.quantize(params, low, rules=rules)` and the checkpoint format
need nothing new. Sensitivity is measured, not guessed: `sensitivity` is each kernel's
relative output error under the low-bit RTN grid, `||X (W - Q(W))||^2 / ||X W||^2`,
exact from the calibration pass's X^T X.

In recipe strings (scripts, sweeps) a suffix selects a rule set:
`int4:g128:gptq@first_last` (the first and last decoder blocks at int8) and
`int4:g128@sensitive=3` (the 3 most sensitive kernels at int8).
"""

from __future__ import annotations

import dataclasses
import re

import jax.numpy as jnp

from model import calibration as calib_lib
from model.qarray import dequantize
from model.tree import flatten, match_rules
from quant.recipes import QuantSpec, as_spec, default_rules, parse_recipe
from quant.rtn import quantize_tensor

MIXED = ("first_last", "sensitive=K")


def high_spec(low: QuantSpec, high=None) -> QuantSpec:
  """The 8-bit spec kept for sensitive kernels: `high`, or `low`'s method at int8 per channel."""
  if high is not None:
    return as_spec(high)
  return dataclasses.replace(low, bits=8, fmt="int", group_size=None, sparse=None,
                             clip="absmax")


def mostly_low_bit_rules(n_layers: int, low, *, high=None, edge_layers: int = 1,
                         sensitive=()) -> list[tuple[str, QuantSpec]]:
  """Rules putting the first / last `edge_layers` blocks and `sensitive` paths at 8 bits.

  Args:
    n_layers: decoder blocks of the model.
    low: the low-bit recipe the other kernels get (it is also the base spec to pass).
    high: the spec of the kept kernels (default: `low`'s method at int8 per channel).
    edge_layers: blocks kept at each end (0: none).
    sensitive: extra kernel paths kept (e.g. from `sensitivity`).
  """
  low = as_spec(low)
  if low is None:
    raise ValueError("mostly_low_bit_rules: low=None; pass the low-bit recipe (e.g. 'int4:g128')")
  if not isinstance(n_layers, int) or n_layers < 1:
    raise ValueError(f"mostly_low_bit_rules: n_layers={n_layers!r} must be a positive int")
  if not isinstance(edge_layers, int) or not 0 <= 2 * edge_layers <= n_layers:
    raise ValueError(f"mostly_low_bit_rules: edge_layers={edge_layers!r} must be an int in "
                     f"[0, {n_layers // 2}] for {n_layers} layers")
  hi = high_spec(low, high)
  blocks = sorted({*range(edge_layers), *range(n_layers - edge_layers, n_layers)})
  rules = [(rf"^layers_({'|'.join(map(str, blocks))})/.*kernel$", hi)] if blocks else []
  rules += [(f"^{re.escape(p)}$", hi) for p in sensitive
            if not any(p.startswith(f"layers_{b}/") for b in blocks)]
  return rules


def sensitivity(params, low, calib) -> dict[str, float]:
  """{kernel path: relative output error under `low`'s RTN grid}, largest first.

  Covers the kernels `low`'s default rules select; `calib` is a
  `model.calibration.Calibration` (one pass over these params).
  """
  low = as_spec(low)
  calib = calib_lib.check_calibration(calib, params, what="sensitivity")
  paths, leaves, _ = flatten(params)
  rules = default_rules(low)
  specs = match_rules(paths, [], rules, kind="quant", convert=as_spec)
  chosen = {p: w for p, w, s in zip(paths, leaves, specs, strict=True) if s is not None}
  stats = calib_lib.calibrate(calib.cfg, params, calib.batches, paths=list(chosen))
  out = {}
  rtn = dataclasses.replace(low, method="rtn", sparse=None, act_order=False)
  for p, w in chosen.items():
    w32 = w.astype(jnp.float32)
    e = w32 - dequantize(quantize_tensor(w, **rtn.tensor_kwargs()), jnp.float32)
    xtx = stats[p].xtx
    out[p] = float(jnp.sum((xtx @ e) * e) / jnp.maximum(jnp.sum((xtx @ w32) * w32), 1e-30))
  return dict(sorted(out.items(), key=lambda kv: -kv[1]))


def split_mixed(recipe: str) -> tuple[str, str | None]:
  """'int4:g128@first_last' -> ('int4:g128', 'first_last'); validates both parts."""
  if not isinstance(recipe, str):
    raise ValueError(f"quant recipe={recipe!r} must be a string")
  base, at, mixed = recipe.partition("@")
  parse_recipe(base)
  if not at:
    return base, None
  if mixed != "first_last" and not re.fullmatch(r"sensitive=[1-9]\d*", mixed):
    raise ValueError(f"quant recipe={recipe!r}: unknown rule set {mixed!r} after '@'; valid: "
                     f"{list(MIXED)} (K a positive int)")
  return base, mixed


def mixed_rules(recipe: str, params, n_layers: int, calib=None) -> tuple[str, list]:
  """(base recipe, rules) for a recipe string with an optional '@' rule-set suffix."""
  base, mixed = split_mixed(recipe)
  if mixed is None:
    return base, []
  if mixed == "first_last":
    return base, mostly_low_bit_rules(n_layers, base)
  k = int(mixed.split("=")[1])
  ranked = list(sensitivity(params, base, calib))
  return base, mostly_low_bit_rules(n_layers, base, edge_layers=0, sensitive=ranked[:k])

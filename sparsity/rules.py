"""Param paths and ordered `(regex, spec)` pruning rules (first match wins).

A rule's spec says what happens to the leaves it matches first:
  None     keep the leaf dense (no mask);
  PRUNE    prune it to the recipe's target sparsity;
  a float  prune it to this sparsity instead (a per-layer override).

User rules are tried before `DEFAULT_RULES`; a user rule that is the first match
of no leaf is an error (it is misspelled or shadowed). Leaves that no rule
matches stay dense.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from typing import Any

import jax

from model.sharding import path_str

PRUNE = "prune"

# Only 2-D `kernel` leaves are pruned by default: embeddings, the LM head, norm
# scales and biases are few parameters and pruning them costs the most quality.
DEFAULT_RULES: tuple[tuple[str, Any], ...] = (
    (r"(^|/)embed/", None),
    (r"(^|/)lm_head/", None),
    (r"norm/", None),
    (r"/bias$", None),
    (r"/kernel$", PRUNE),
)

Rules = Sequence[tuple[str, Any]]


def flatten(tree, is_leaf=None) -> tuple[list[str], list[Any], Any]:
  """(paths, leaves, treedef) of a params tree; paths in tree-flatten order."""
  leaves_with_path, treedef = jax.tree_util.tree_flatten_with_path(tree, is_leaf=is_leaf)
  paths = [path_str(p) for p, _ in leaves_with_path]
  return paths, [x for _, x in leaves_with_path], treedef


def check_sparsity(value, name: str = "sparsity") -> float:
  """Returns `value` as a float, or raises ValueError unless it lies in [0, 1)."""
  if isinstance(value, bool) or not isinstance(value, (int, float)):
    raise ValueError(f"{name}={value!r} must be a number in the range [0, 1)")
  if math.isnan(value) or not 0.0 <= value < 1.0:
    raise ValueError(f"{name}={value!r} is outside the valid range [0, 1)")
  return float(value)


def _check_rules(rules: Rules) -> list[tuple[re.Pattern, Any]]:
  compiled = []
  for i, rule in enumerate(rules):
    if not (isinstance(rule, (tuple, list)) and len(rule) == 2):
      raise ValueError(f"rules[{i}]={rule!r} must be a (regex, spec) pair")
    pattern, spec = rule
    try:
      rx = re.compile(pattern)
    except (re.error, TypeError) as e:
      raise ValueError(f"rules[{i}] regex {pattern!r} does not compile: {e}") from None
    if isinstance(spec, str) and spec != PRUNE:
      raise ValueError(f"rules[{i}] spec {spec!r} must be None, {PRUNE!r} or a sparsity "
                       "in [0, 1)")
    if spec is not None and spec != PRUNE:
      check_sparsity(spec, f"rules[{i}] ({pattern!r}) sparsity")
    compiled.append((rx, spec))
  return compiled


def resolve(paths: Sequence[str], rules: Rules = (), *, defaults: Rules = DEFAULT_RULES
            ) -> dict[str, Any]:
  """Maps each path to the spec of its first matching rule (user rules, then defaults).

  Raises ValueError if a user rule is the first match of no path.
  """
  user = _check_rules(rules)
  default = _check_rules(defaults)
  used = [False] * len(user)
  plan = {}
  for path in paths:
    spec = None
    for i, (rx, s) in enumerate(user):
      if rx.search(path):
        used[i], spec = True, s
        break
    else:
      for rx, s in default:
        if rx.search(path):
          spec = s
          break
    plan[path] = spec
  for (rx, _), u in zip(user, used, strict=True):
    if not u:
      why = ("is shadowed by earlier rules" if any(rx.search(p) for p in paths)
             else "matches no param path")
      raise ValueError(f"pruning rule {rx.pattern!r} {why} (rules use re.search on paths "
                       f"such as {list(paths)[:3]})")
  return plan


def parse_rule(text: str) -> tuple[str, Any]:
  """'REGEX=SPEC' (SPEC: none | prune | a sparsity) -> (regex, spec), for command lines."""
  regex, sep, value = text.rpartition("=")
  if not sep or not regex:
    raise ValueError(f"rule {text!r} must look like REGEX=SPEC with SPEC one of none, "
                     f"{PRUNE}, or a sparsity in [0, 1)")
  value = value.strip().lower()
  if value in ("none", "dense"):
    return regex, None
  if value == PRUNE:
    return regex, PRUNE
  try:
    return regex, check_sparsity(float(value), f"rule {text!r} sparsity")
  except ValueError:
    raise ValueError(f"rule {text!r}: SPEC {value!r} must be none, {PRUNE}, or a sparsity "
                     "in [0, 1)") from None


def targets(plan: dict[str, Any], sparsity: float) -> dict[str, float | None]:
  """Per-path sparsity: PRUNE -> `sparsity`, overrides kept, None stays dense."""
  return {p: (sparsity if s == PRUNE else s) for p, s in plan.items()}

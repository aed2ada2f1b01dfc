"""Param paths and ordered `(regex, spec)` pruning rules (first match wins).

A rule's spec says what happens to the leaves it matches first:
  None     keep the leaf dense (no mask);
  PRUNE    prune it to the recipe's target sparsity;
  a float  prune it to this sparsity instead (a per-layer override).

User rules are tried before `DEFAULT_RULES` (`model.tree.match_rules`); a user
rule that is the first match of no leaf is an error (it is misspelled or
shadowed). Leaves that no rule matches stay dense.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from model.tree import Rules, match_rules

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

def check_sparsity(value, name: str = "sparsity") -> float:
  """Returns `value` as a float, or raises ValueError unless it lies in [0, 1)."""
  if isinstance(value, bool) or not isinstance(value, (int, float)):
    raise ValueError(f"{name}={value!r} must be a number in the range [0, 1)")
  if math.isnan(value) or not 0.0 <= value < 1.0:
    raise ValueError(f"{name}={value!r} is outside the valid range [0, 1)")
  return float(value)


def _check_spec(spec):
  if isinstance(spec, str) and spec != PRUNE:
    raise ValueError(f"spec {spec!r} must be None, {PRUNE!r} or a sparsity in [0, 1)")
  if spec is not None and spec != PRUNE:
    check_sparsity(spec, "sparsity")
  return spec


def resolve(paths: Sequence[str], rules: Rules = (), *, defaults: Rules = DEFAULT_RULES
            ) -> dict[str, Any]:
  """Maps each path to the spec of its first matching rule (user rules, then defaults).

  Raises ValueError for a malformed rule or a user rule that wins no path.
  """
  specs = match_rules(paths, rules, defaults, kind="pruning", convert=_check_spec)
  return dict(zip(paths, specs, strict=True))


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

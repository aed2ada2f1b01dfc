"""Quantization specs and the recipe-string registry (`--quant=int4:g128:asym`).

Grammar: `FORMAT[:OPTION...]` with FORMAT one of `FORMATS` and options
`gN` (per-group scales, N rows of the input axis), `channel` (default: one
scale per output channel), `tensor` (one scale), `sym` (default) / `asym`
(int zero point), and a method from `METHODS` (default `rtn`).
"""

from __future__ import annotations

import dataclasses
import re

# format token -> (fmt, bits)
FORMATS = {
    "int8": ("int", 8), "int4": ("int", 4), "int2": ("int", 2),
    "fp8": ("e4m3", 8), "fp8_e4m3": ("e4m3", 8), "fp8_e5m2": ("e5m2", 8),
}
GRANULARITIES = ("channel", "tensor")
METHODS = ("rtn", "gptq")
_OPTIONS = ("gN (e.g. g128)", *GRANULARITIES, "sym", "asym", *METHODS)


@dataclasses.dataclass(frozen=True)
class QuantSpec:
  """How to quantize one kernel: format, bits, scale granularity, symmetry, method."""

  bits: int = 8
  fmt: str = "int"
  group_size: int | None = None
  granularity: str = "channel"  # "channel" | "tensor"; ignored when group_size is set
  symmetric: bool = True
  method: str = "rtn"

  def __post_init__(self):
    if (self.fmt, self.bits) not in FORMATS.values():
      raise ValueError(f"QuantSpec: (fmt={self.fmt!r}, bits={self.bits!r}) is not a format; "
                       f"valid: {sorted(set(FORMATS.values()))}")
    if self.group_size is not None and (not isinstance(self.group_size, int)
                                        or self.group_size < 1):
      raise ValueError(f"QuantSpec: group_size={self.group_size!r} must be a positive int")
    if self.granularity not in GRANULARITIES:
      raise ValueError(f"QuantSpec: granularity={self.granularity!r}; valid: {GRANULARITIES}")
    if not self.symmetric and self.fmt != "int":
      raise ValueError(f"QuantSpec: asym needs an int format, got fmt={self.fmt!r}")
    if self.method not in METHODS:
      raise ValueError(f"QuantSpec: method={self.method!r}; valid: {METHODS}")

  @property
  def axis(self) -> int | None:
    """The `quantize_tensor` reduction axis for an `[in, out]` kernel."""
    return None if self.granularity == "tensor" and not self.group_size else 0

  @property
  def name(self) -> str:
    """Canonical recipe string; `parse_recipe(spec.name) == spec`."""
    fmt = next(k for k, v in FORMATS.items() if v == (self.fmt, self.bits))
    parts = [fmt]
    if self.group_size:
      parts.append(f"g{self.group_size}")
    elif self.granularity != "channel":
      parts.append(self.granularity)
    if not self.symmetric:
      parts.append("asym")
    if self.method != "rtn":
      parts.append(self.method)
    return ":".join(parts)

  def tensor_kwargs(self) -> dict:
    """Keyword arguments for `quantize_tensor`."""
    return dict(bits=self.bits, fmt=self.fmt, group_size=self.group_size,
                symmetric=self.symmetric, axis=self.axis)


def parse_recipe(recipe: str) -> QuantSpec:
  """Parses a recipe string such as "int8", "int4:g128", "int4:g32:asym" into a QuantSpec."""
  if not isinstance(recipe, str) or not recipe.strip():
    raise ValueError(f"quant recipe={recipe!r} must be a non-empty string like 'int8' or "
                     f"'int4:g128'; formats: {sorted(FORMATS)}")
  head, *opts = recipe.strip().lower().split(":")
  if head not in FORMATS:
    raise ValueError(f"quant recipe={recipe!r}: unknown format {head!r}; valid formats: "
                     f"{sorted(FORMATS)}")
  fmt, bits = FORMATS[head]
  kw: dict = dict(fmt=fmt, bits=bits)
  for opt in opts:
    if m := re.fullmatch(r"g(\d+)", opt):
      kw["group_size"] = int(m.group(1))
      if kw["group_size"] < 1:
        raise ValueError(f"quant recipe={recipe!r}: group size must be >= 1, got {opt!r}")
    elif opt in GRANULARITIES:
      kw["granularity"] = opt
    elif opt in ("sym", "asym"):
      kw["symmetric"] = opt == "sym"
    elif opt in METHODS:
      kw["method"] = opt
    else:
      raise ValueError(f"quant recipe={recipe!r}: unknown option {opt!r}; valid options: "
                       f"{list(_OPTIONS)}")
  try:
    return QuantSpec(**kw)
  except ValueError as e:
    raise ValueError(f"quant recipe={recipe!r}: {e}") from None


def as_spec(spec) -> QuantSpec | None:
  """Accepts a QuantSpec, a recipe string or None (keep float)."""
  if spec is None or isinstance(spec, QuantSpec):
    return spec
  if isinstance(spec, str):
    return parse_recipe(spec)
  raise ValueError(f"quant spec={spec!r} must be a QuantSpec, a recipe string or None")


# Skip embeddings and untied LM heads (gathered / most sensitive), then quantize every
# other 2-D kernel; norms and biases are not `kernel`s, so they stay float.
DEFAULT_SKIP = r"(^|/)(embed|lm_head)/"
DEFAULT_TARGET = r"(^|/)kernel$"


def default_rules(spec=None) -> list[tuple[str, QuantSpec | None]]:
  """The default rules (tried after the user's): skip embed / lm_head, then `spec` on every
  `kernel` (with spec None only the skip: what no rule selects stays float)."""
  spec = as_spec(spec)
  return [(DEFAULT_SKIP, None)] + ([] if spec is None else [(DEFAULT_TARGET, spec)])

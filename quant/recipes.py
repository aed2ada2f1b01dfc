"""Quantization specs and the recipe-string registry (`--quant=int4:g128:gptq+2:4`).

Grammar: `FORMAT[:OPTION...][+N:M]`.

FORMAT is one of `FORMATS` (int8 / int4 / int2, fp8 e4m3 / e5m2, fp6 e2m3 / e3m2,
fp4 e2m1, nf4) or `w8a8` (int8 weights, per-token dynamic int8 activations).
OPTIONs:
  `gN`                 per-group scales, N consecutive rows of the input axis
  `channel` / `tensor` one scale per output channel (default) / one per tensor
  `sym` / `asym`       symmetric (default) or an integer zero point (int formats)
  `clip=absmax|mse|pP` RTN range: absmax (default), the MSE-optimal shrink of it
                       (grid search), or the P-th percentile of |w| (e.g. `clip=p99.9`)
  a method             `rtn` (default), `gptq`, `awq`, `smoothquant` (W8A8 only)
  `act_order`          GPTQ: sweep inputs by descending Hessian diagonal
  `static_groups`      GPTQ: fit group grids before the sweep (upstream's --static-groups)
  `alpha=A`            SmoothQuant migration strength in [0, 1] (default 0.5)
Each option decides one thing: two options for the same thing (`int8:g64:g32`,
`channel:tensor`, `g128:tensor`, `sym:asym`, `rtn:gptq`, two `clip=` or `alpha=`) are a
ValueError naming both, never "the last one wins".
`+N:M` (GPTQ only) prunes N:M (n kept of every m inputs) in the same OBS sweep that
quantizes, as SparseGPT's joint mode: `int4:g128:gptq+2:4`.
"""

from __future__ import annotations

import dataclasses
import re

# format token -> (fmt, bits)
FORMATS = {
    "int8": ("int", 8), "int4": ("int", 4), "int2": ("int", 2),
    "fp8": ("e4m3", 8), "fp8_e4m3": ("e4m3", 8), "fp8_e5m2": ("e5m2", 8),
    "fp6": ("e2m3", 6), "fp6_e2m3": ("e2m3", 6), "fp6_e3m2": ("e3m2", 6),
    "fp4": ("e2m1", 4), "fp4_e2m1": ("e2m1", 4), "nf4": ("nf4", 4),
}
# W8A8: int8 weights with act_bits=8 (activations quantized per token at each dot).
ACT_FORMATS = {"w8a8": ("int", 8, 8)}
GRANULARITIES = ("channel", "tensor")
METHODS = ("rtn", "gptq", "awq", "smoothquant")
CLIPS = ("absmax", "mse", "pP (percentile, e.g. p99.9)")
_OPTIONS = ("gN (e.g. g128)", *GRANULARITIES, "sym", "asym", *METHODS, "act_order", "static_groups",
            "clip=absmax|mse|pP", "alpha=A")


def _check_clip(clip) -> None:
  if clip in ("absmax", "mse"):
    return
  m = re.fullmatch(r"p(\d+(?:\.\d*)?)", clip) if isinstance(clip, str) else None
  if m is None or not 0.0 < float(m.group(1)) <= 100.0:
    raise ValueError(f"QuantSpec: clip={clip!r}; valid: {list(CLIPS)} with 0 < P <= 100")


@dataclasses.dataclass(frozen=True)
class QuantSpec:
  """How to quantize one kernel: format, scales, symmetry, clipping, method and its options."""

  bits: int = 8
  fmt: str = "int"
  group_size: int | None = None
  granularity: str = "channel"  # "channel" | "tensor" (not with group_size)
  symmetric: bool = True
  method: str = "rtn"
  clip: str = "absmax"  # RTN range: "absmax" | "mse" | "p99.9" (percentile of |w|)
  act_bits: int | None = None  # 8: W8A8 (dynamic per-token int8 activations)
  act_order: bool = False  # GPTQ
  static_groups: bool = False  # GPTQ: group grids fitted before the sweep
  alpha: float = 0.5  # SmoothQuant
  sparse: tuple[int, int] | None = None  # GPTQ + N:M pruning in one sweep

  def __post_init__(self):
    if (self.fmt, self.bits) not in FORMATS.values():
      raise ValueError(f"QuantSpec: (fmt={self.fmt!r}, bits={self.bits!r}) is not a format; "
                       f"valid: {sorted(set(FORMATS.values()))}")
    if self.group_size is not None and (isinstance(self.group_size, bool)
                                        or not isinstance(self.group_size, int)
                                        or self.group_size < 1):
      raise ValueError(f"QuantSpec: group_size={self.group_size!r} must be a positive int")
    if self.granularity not in GRANULARITIES:
      raise ValueError(f"QuantSpec: granularity={self.granularity!r}; valid: {GRANULARITIES}")
    if self.group_size is not None and self.granularity == "tensor":
      raise ValueError(f"QuantSpec: group_size={self.group_size} and granularity='tensor' "
                       "conflict (per-group scales vs one per tensor); pass one")
    if not self.symmetric and self.fmt != "int":
      raise ValueError(f"QuantSpec: asym needs an int format, got fmt={self.fmt!r}")
    if self.method not in METHODS:
      raise ValueError(f"QuantSpec: method={self.method!r}; valid: {METHODS}")
    _check_clip(self.clip)
    if self.clip != "absmax" and self.method != "rtn":
      raise ValueError(f"QuantSpec: clip={self.clip!r} is an RTN option; {self.method} "
                       "chooses its own ranges")
    if self.act_bits not in (None, 8):
      raise ValueError(f"QuantSpec: act_bits={self.act_bits!r}; valid: None, 8")
    if self.act_bits and (self.fmt, self.bits) != ("int", 8):
      raise ValueError(f"QuantSpec: act_bits=8 (W8A8) needs int8 weights, got "
                       f"(fmt={self.fmt!r}, bits={self.bits})")
    if self.act_bits and (self.group_size or not self.symmetric):
      raise ValueError("QuantSpec: W8A8 weights are symmetric per channel (or tensor); "
                       f"got group_size={self.group_size}, symmetric={self.symmetric}")
    if self.method in ("gptq", "awq") and self.fmt != "int":
      raise ValueError(f"QuantSpec: method={self.method!r} needs an int format, got "
                       f"fmt={self.fmt!r}")
    if self.method == "smoothquant" and not self.act_bits:
      raise ValueError("QuantSpec: method='smoothquant' migrates activation outliers for "
                       "W8A8; use the format w8a8 (e.g. 'w8a8:smoothquant')")
    if self.method == "awq" and self.granularity == "tensor" and not self.group_size:
      raise ValueError("QuantSpec: awq scales are per channel or per group, not per tensor")
    if self.act_order and self.method != "gptq":
      raise ValueError(f"QuantSpec: act_order is a GPTQ option, method={self.method!r}")
    if self.static_groups and (self.method != "gptq" or not self.group_size):
      raise ValueError(f"QuantSpec: static_groups is a GPTQ option for grouped specs, got "
                       f"method={self.method!r}, group_size={self.group_size}")
    if isinstance(self.alpha, bool) or not isinstance(self.alpha, (int, float)) \
        or not 0.0 <= self.alpha <= 1.0:
      raise ValueError(f"QuantSpec: alpha={self.alpha!r} must lie in [0, 1]")
    if self.sparse is not None:
      n, m = self.sparse
      if self.method != "gptq":
        raise ValueError(f"QuantSpec: +{n}:{m} (joint pruning) needs method gptq, got "
                         f"{self.method!r}")
      if not (isinstance(n, int) and isinstance(m, int) and 1 <= n < m):
        raise ValueError(f"QuantSpec: sparse={self.sparse!r} must be N:M with 1 <= N < M")

  @property
  def axis(self) -> int | None:
    """The `quantize_tensor` reduction axis for an `[in, out]` kernel."""
    return None if self.granularity == "tensor" and not self.group_size else 0

  @property
  def name(self) -> str:
    """Canonical recipe string; `parse_recipe(spec.name) == spec`."""
    if self.act_bits:
      fmt = next(k for k, v in ACT_FORMATS.items() if v == (self.fmt, self.bits, self.act_bits))
    else:
      fmt = next(k for k, v in FORMATS.items() if v == (self.fmt, self.bits))
    parts = [fmt]
    if self.group_size:
      parts.append(f"g{self.group_size}")
    elif self.granularity != "channel":
      parts.append(self.granularity)
    if not self.symmetric:
      parts.append("asym")
    if self.clip != "absmax":
      parts.append(f"clip={self.clip}")
    if self.method != "rtn":
      parts.append(self.method)
    if self.act_order:
      parts.append("act_order")
    if self.static_groups:
      parts.append("static_groups")
    if self.alpha != 0.5:
      parts.append(f"alpha={self.alpha:g}")
    name = ":".join(parts)
    return name + (f"+{self.sparse[0]}:{self.sparse[1]}" if self.sparse else "")

  def tensor_kwargs(self) -> dict:
    """Keyword arguments for `quantize_tensor` (RTN)."""
    kw = dict(bits=self.bits, fmt=self.fmt, group_size=self.group_size,
              symmetric=self.symmetric, axis=self.axis)
    return kw if self.clip == "absmax" else dict(kw, clip=self.clip)


def parse_recipe(recipe: str) -> QuantSpec:
  """Parses a recipe string ("int8", "int4:g128", "w8a8:smoothquant", "int4:g128:gptq+2:4")."""
  valid = sorted([*FORMATS, *ACT_FORMATS])
  if not isinstance(recipe, str) or not recipe.strip():
    raise ValueError(f"quant recipe={recipe!r} must be a non-empty string like 'int8' or "
                     f"'int4:g128'; formats: {valid}")
  body, plus, sparse = recipe.strip().lower().partition("+")
  head, *opts = body.split(":")
  kw: dict = {}
  if head in FORMATS:
    kw["fmt"], kw["bits"] = FORMATS[head]
  elif head in ACT_FORMATS:
    kw["fmt"], kw["bits"], kw["act_bits"] = ACT_FORMATS[head]
  else:
    raise ValueError(f"quant recipe={recipe!r}: unknown format {head!r}; valid formats: {valid}")
  if plus:
    m = re.fullmatch(r"(\d+):(\d+)", sparse)
    if m is None:
      raise ValueError(f"quant recipe={recipe!r}: the part after '+' must be N:M (e.g. 2:4), "
                       f"got {sparse!r}")
    kw["sparse"] = (int(m.group(1)), int(m.group(2)))
  given: dict[str, str] = {}  # slot -> the option that set it
  for opt in opts:
    key, eq, val = opt.partition("=")
    if m := re.fullmatch(r"g(\d+)", opt):
      slot, kw["group_size"] = "scales", int(m.group(1))
      if kw["group_size"] < 1:
        raise ValueError(f"quant recipe={recipe!r}: group size must be >= 1, got {opt!r}")
    elif opt in GRANULARITIES:
      slot, kw["granularity"] = "scales", opt
    elif opt in ("sym", "asym"):
      slot, kw["symmetric"] = "symmetry", opt == "sym"
    elif opt in METHODS:
      slot, kw["method"] = "method", opt
    elif opt in ("act_order", "static_groups"):
      slot, kw[opt] = opt, True
    elif eq and key == "clip":
      slot, kw["clip"] = "clip", val
    elif eq and key == "alpha":
      slot = "alpha"
      try:
        kw["alpha"] = float(val)
      except ValueError:
        raise ValueError(f"quant recipe={recipe!r}: alpha={val!r} is not a number") from None
    else:
      raise ValueError(f"quant recipe={recipe!r}: unknown option {opt!r}; valid options: "
                       f"{list(_OPTIONS)}")
    _claim(recipe, given, slot, opt)
  try:
    return QuantSpec(**kw)
  except ValueError as e:
    raise ValueError(f"quant recipe={recipe!r}: {e}") from None


# What each option slot decides (conflict messages); a slot takes one option per recipe.
_SLOTS = {"scales": "the scale granularity (gN / channel / tensor)",
          "symmetry": "the symmetry (sym / asym)", "method": f"the method {METHODS}",
          "clip": "the RTN clipping", "alpha": "the SmoothQuant alpha"}


def _claim(recipe: str, given: dict[str, str], slot: str, opt: str) -> None:
  """Records that `opt` set `slot`; two different options for one slot are a ValueError.

  Without it `int8:g64:g32` or `int8:sym:asym` silently meant whichever came last. An
  option repeated verbatim (`int8:sym:sym`) means one thing, so it is accepted.
  """
  prev = given.setdefault(slot, opt)
  if prev != opt:
    raise ValueError(f"quant recipe={recipe!r}: options {prev!r} and {opt!r} conflict (both "
                     f"set {_SLOTS.get(slot, slot)}); keep one")


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

"""Device mesh and logical-axis sharding rules over parameter paths.

Two ordered rule lists, first match wins:
  PARAM_RULES:  the default (regex over a leaf path, logical PartitionSpec) rules,
                e.g. ("attn/(q|k|v)/kernel", P("embed", "heads")); user rules go
                before them (`model.tree.match_rules`);
  AXIS_RULES:   logical axis -> mesh axis (or axes), e.g. ("embed", "fsdp").
Paths (`model.tree.path_str`) cover optimizer moments (`.../mu/layers_3/attn/q/kernel`),
masks, and the arrays inside a QArray leaf (`.../q/kernel/values`), so one rule
set shards them all. A mesh axis that does not divide a dimension is dropped for
that leaf (replicated along it), so every rule set is valid for every mesh.
Unmatched leaves are replicated.
"""

from __future__ import annotations

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from model.tree import Rules, flatten, match_rules

MESH_AXES = ("data", "fsdp", "tensor")
_B = r"\b"  # rules match a key prefix: `kernel` also covers `kernel/values`

PARAM_RULES: tuple[tuple[str, P], ...] = (
    (rf"embed/embedding{_B}", P("vocab", "embed")),
    (rf"attn/(q|k|v)/kernel{_B}", P("embed", "heads")),
    (rf"attn/o/kernel{_B}", P("heads", "embed")),
    (rf"mlp/(gate|up)/kernel{_B}", P("embed", "mlp")),
    (rf"mlp/down/kernel{_B}", P("mlp", "embed")),
    (rf"lm_head/kernel{_B}", P("embed", "vocab")),
    (r"(scale|bias)$", P()),
)

AXIS_RULES: tuple[tuple[str, str | tuple[str, ...] | None], ...] = (
    ("batch", ("data", "fsdp")),
    ("embed", "fsdp"),
    ("heads", "tensor"),
    ("mlp", "tensor"),
    ("vocab", "tensor"),
)


def make_mesh(data: int = -1, fsdp: int = 1, tensor: int = 1, devices=None) -> Mesh:
  """A ("data", "fsdp", "tensor") mesh; one axis may be -1 (all remaining devices)."""
  devices = list(jax.devices() if devices is None else devices)
  sizes = {"data": data, "fsdp": fsdp, "tensor": tensor}
  free = [k for k, v in sizes.items() if v == -1]
  for k, v in sizes.items():
    if v != -1 and v < 1:
      raise ValueError(f"config.mesh.{k}={v} must be >= 1 or -1 (all remaining devices)")
  if len(free) > 1:
    raise ValueError(f"config.mesh: only one axis may be -1, got {free}")
  fixed = int(np.prod([v for v in sizes.values() if v != -1]))
  if free:
    if len(devices) % fixed:
      raise ValueError(f"config.mesh: {fixed} devices for the fixed axes {sizes} do not divide "
                       f"the {len(devices)} available devices")
    sizes[free[0]] = len(devices) // fixed
  n = int(np.prod(list(sizes.values())))
  if n != len(devices):
    raise ValueError(f"config.mesh={sizes} needs {n} devices; {len(devices)} are available")
  shape = tuple(sizes[a] for a in MESH_AXES)
  return Mesh(np.asarray(devices).reshape(shape), MESH_AXES)


def to_mesh_spec(logical: P, shape: tuple[int, ...], mesh,
                 axis_rules=AXIS_RULES) -> P:
  """Maps logical axis names to mesh axes, dropping any that don't divide the dimension."""
  if len(logical) > len(shape):
    return P()
  rules = dict(axis_rules)
  out = []
  for dim, name in zip(shape, logical, strict=False):
    axes = rules.get(name) if name is not None else None
    axes = (axes,) if isinstance(axes, str) else tuple(axes or ())
    axes = tuple(a for a in axes if mesh.shape[a] > 1)
    size = int(np.prod([mesh.shape[a] for a in axes])) if axes else 1
    out.append(None if not axes or dim % size else (axes[0] if len(axes) == 1 else axes))
  return P(*out)


def tree_specs(tree, mesh, rules: Rules = (), *, defaults: Rules = PARAM_RULES,
               axis_rules=AXIS_RULES):
  """Mesh PartitionSpec per array leaf of `tree` (`mesh` may be abstract).

  `rules` are the user's `(regex, logical PartitionSpec)` rules, tried before
  `defaults`; each must win a path (`model.tree.match_rules`). Unmatched leaves are
  replicated.
  """
  paths, leaves, treedef = flatten(tree, is_leaf=None)
  logical = match_rules(paths, rules, defaults, kind="sharding", unmatched=P())
  out = [to_mesh_spec(spec, tuple(getattr(x, "shape", ())), mesh, axis_rules)
         for spec, x in zip(logical, leaves, strict=True)]
  return jax.tree_util.tree_unflatten(treedef, out)


def tree_shardings(tree, mesh: Mesh, rules: Rules = (), *, defaults: Rules = PARAM_RULES,
                   axis_rules=AXIS_RULES):
  """NamedSharding per leaf of `tree` (arrays or ShapeDtypeStructs) from the path rules."""
  specs = tree_specs(tree, mesh, rules, defaults=defaults, axis_rules=axis_rules)
  return jax.tree.map(lambda s: NamedSharding(mesh, s), specs,
                      is_leaf=lambda x: isinstance(x, P))


def batch_sharding(mesh: Mesh, axis_rules=AXIS_RULES) -> NamedSharding:
  """Batch dimension over the logical 'batch' axes (data and fsdp)."""
  axes = dict(axis_rules)["batch"]
  return NamedSharding(mesh, P(axes))


def batch_divisor(mesh: Mesh, axis_rules=AXIS_RULES) -> int:
  """The number of shards of the batch dimension (the batch size must be a multiple)."""
  axes = dict(axis_rules)["batch"]
  axes = (axes,) if isinstance(axes, str) else axes
  return int(np.prod([mesh.shape[a] for a in axes]))

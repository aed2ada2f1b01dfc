"""Fused decode-time projections: q / k / v -> one `qkv` kernel, gate / up -> one `gate_up`.

A batch-1 decode step is a chain of matrix-vector products; where each dot runs alone
on the machine, three small q / k / v matvecs (and two gate / up ones) read their weights
below streaming bandwidth and one wide matvec reads the same bytes faster. Where the
backend runs independent dots concurrently the separate kernels can be faster: on
XLA:CPU with 2 cores a one-row dot runs on one core, and the separate q / k / v and
gate / up dots share both (measured in `docs/bench_decode_dots.md`: there fused is
slower, so `scripts.bench.decode` decodes unfused by default). `fuse_projections` is the
`Params -> Params` transform that concatenates, per layer, the kernels (and q / k / v
biases) along the output axis:

  attn/{q,k,v}/kernel [D, H Dh], [D, K Dh], [D, K Dh]  ->  attn/qkv/kernel [D, (H + 2K) Dh]
  mlp/{gate,up}/kernel [D, F], [D, F]                  ->  mlp/gate_up/kernel [D, 2F]

The fused tree runs under `cfg.replace(fused_projections=True)` (the modules then split
the fused output back into q, k, v / gate, up); training, pruning, quantization and
checkpoint export keep the separate kernels. Columns are independent in every leaf type,
so fusing is exact:
  * plain arrays and boolean masks (mask trees fuse with the same function);
  * `QArray`: codes concatenate along axis 1 (packing runs along axis 0), and scales /
    zero points too, after per-tensor ones ([1, 1]) are broadcast to one value per output
    column, which changes no dequantized value; a part without a zero point gets zero
    points of 0 when another has them (int formats). Formats, bit widths, group sizes and
    act_bits must agree;
  * `NMArray`: values (plain or QArray) and packed indices concatenate along axis 1.
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp

from model import ops
from model.nm_array import NMArray
from model.qarray import QArray

# module -> (the separate projections, the fused name), in concatenation order.
FUSED = {"attn": (("q", "k", "v"), "qkv"), "mlp": (("gate", "up"), "gate_up")}


def concat_columns(leaves: list, where: str):
  """One leaf holding `leaves` side by side along their last (output) axis."""
  first = leaves[0]
  if any(type(l) is not type(first) for l in leaves):
    raise ValueError(f"{where}: cannot fuse leaves of types "
                     f"{[type(l).__name__ for l in leaves]} (quantize / compress them alike)")
  if isinstance(first, QArray):
    return _concat_qarrays(leaves, where)
  if isinstance(first, NMArray):
    if any((l.n, l.m, l.dtype, l.shape[0]) != (first.n, first.m, first.dtype, first.shape[0])
           for l in leaves):
      raise ValueError(f"{where}: N:M leaves differ in n:m, dtype or input size: {leaves}")
    values = concat_columns([l.values for l in leaves], where)
    indices = jnp.concatenate([l.indices for l in leaves], axis=1)
    shape = (first.shape[0], sum(l.shape[1] for l in leaves))
    return dataclasses.replace(first, values=values, indices=indices, shape=shape)
  if any(l.shape[:-1] != first.shape[:-1] or l.dtype != first.dtype for l in leaves):
    raise ValueError(f"{where}: leaves {[(l.shape, str(l.dtype)) for l in leaves]} differ in "
                     "dtype or in every axis but the last")
  return jnp.concatenate(leaves, axis=-1)


def _concat_qarrays(leaves: list[QArray], where: str) -> QArray:
  first = leaves[0]
  static = lambda q: (q.fmt, q.bits, q.group_size, q.act_bits, q.dtype, q.shape[0], q.ndim)
  if any(static(q) != static(first) for q in leaves) or first.ndim != 2:
    raise ValueError(f"{where}: QArray leaves must share format, bits, group size, act_bits, "
                     f"dtype and input size (2-D) to fuse; got {leaves}")
  has_zero = [q.zero is not None for q in leaves]
  if any(has_zero) and first.fmt != "int":
    raise ValueError(f"{where}: zero points on a {first.fmt} QArray")

  def columns(q: QArray, x):  # [G or 1, N or 1] -> [G, N]
    rows = max(q.scale.shape[0], 1)
    return jnp.broadcast_to(x, (rows, q.shape[1]))

  rows = {q.scale.shape[0] for q in leaves}
  if len(rows) > 1:
    raise ValueError(f"{where}: scale rows differ {sorted(rows)} (per-group vs per-channel)")
  scale = jnp.concatenate([columns(q, q.scale) for q in leaves], axis=1)
  zero = None
  if any(has_zero):
    zdt = next(q.zero.dtype for q in leaves if q.zero is not None)
    zero = jnp.concatenate([columns(q, q.zero if q.zero is not None else jnp.zeros((1, 1), zdt))
                            for q in leaves], axis=1)
  values = jnp.concatenate([q.values for q in leaves], axis=1)
  shape = (first.shape[0], sum(q.shape[1] for q in leaves))
  return dataclasses.replace(first, values=values, scale=scale, zero=zero, shape=shape)


def is_fused(params) -> bool:
  """Whether a param tree holds fused projections (every layer's attention has `qkv`)."""
  layers = [v for k, v in params.items() if k.startswith("layers_")]
  return bool(layers) and all("qkv" in layer.get("attn", {}) for layer in layers)


def fuse_projections(params):
  """The param (or mask) tree with each layer's q / k / v and gate / up fused (see above)."""
  if is_fused(params):
    raise ValueError("fuse_projections: these params are already fused")
  out = dict(params)
  for name, layer in params.items():
    if not name.startswith("layers_"):
      continue
    layer = dict(layer)
    for module, (parts, fused) in FUSED.items():
      sub = dict(layer[module])
      missing = [p for p in parts if p not in sub]
      if missing:
        raise ValueError(f"fuse_projections: {name}/{module} lacks {missing}")
      group = {}
      for leaf in ("kernel", "bias"):
        present = [leaf in sub[p] for p in parts]
        if not any(present):
          continue
        if not all(present):
          raise ValueError(f"fuse_projections: {name}/{module}: {leaf} only on "
                           f"{[p for p, h in zip(parts, present, strict=True) if h]}")
        items = [sub[p][leaf] for p in parts]
        if all(x is None for x in items):  # a mask tree's dense leaves
          group[leaf] = None
          continue
        if any(x is None for x in items):
          raise ValueError(f"fuse_projections: {name}/{module}/{leaf}: masks on only some "
                           f"of {parts} (give every part a mask, or none)")
        group[leaf] = concat_columns(items, f"{name}/{module}/{leaf}")
      for p in parts:
        del sub[p]
      sub[fused] = group
      layer[module] = sub
    out[name] = layer
  return out


def decode_params(cfg, params, *, rows: int, layout: str | None = None, backend: str | None = None):
  """(cfg, params) for decoding `rows` rows in `layout` (None: `ops.pick_projection_layout`).

  "fused" returns `cfg.replace(fused_projections=True)` and `fuse_projections(params)`
  (built once: call this outside the decode loop); "separate" returns them unchanged.
  """
  layout = layout or ops.pick_projection_layout(rows, backend)
  if layout not in ops.PROJECTION_LAYOUTS:
    raise ValueError(f"layout={layout!r}; valid: {ops.PROJECTION_LAYOUTS} or None")
  if cfg.fused_projections:
    if layout == "separate":
      raise ValueError("layout='separate' but cfg.fused_projections=True: these params are "
                       "already fused; pass the checkpoint's separate kernels")
    return cfg, params
  if layout == "separate":
    return cfg, params
  return cfg.replace(fused_projections=True), fuse_projections(params)

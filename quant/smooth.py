"""Per-input-channel scales folded into the preceding op (AWQ, SmoothQuant).

For a group of kernels that read the same input x (the q / k / v projections after
`attn_norm`, say), `x @ W == (x / s) @ (s[:, None] * W)` for any positive `s[in]`.
The division is folded into the op that produces x, so the model keeps its shape and
every consumer of the tree (sparsity, decoding, checkpoints) sees an ordinary tree:

  * an RMSNorm's `scale` (x = scale * normalised): scale / s;
  * a preceding kernel's output columns (and bias), when nothing else reads its output
    channel by channel: v -> o (only when heads == kv heads, so each o input channel
    has exactly one v output channel) and up -> down (the MLP computes
    silu(gate) * up, linear in up's output).

The groups of a Llama-family block are those of llm-awq's `auto_scale_block`;
SmoothQuant's `smooth_lm` uses only the two norm groups.
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
from jaxtyping import Array, Float

from model.config import ModelConfig
from model.tree import get_path, replace_path


@dataclasses.dataclass(frozen=True)
class ScaleGroup:
  """Kernels sharing one input and the param whose output channels produce that input."""

  prev: str  # a norm `.../scale` or a kernel `.../kernel`
  kernels: tuple[str, ...]
  prev_bias: str | None = None  # the preceding kernel's bias, divided alike

  @property
  def prev_is_norm(self) -> bool:
    return self.prev.endswith("/scale")


def scale_groups(cfg: ModelConfig, *, norms_only: bool = False) -> list[ScaleGroup]:
  """The scale groups of every decoder block, in block order (AWQ's; SmoothQuant: norms_only)."""
  out = []
  for i in range(cfg.n_layers):
    p = f"layers_{i}"
    out.append(ScaleGroup(f"{p}/attn_norm/scale",
                          tuple(f"{p}/attn/{n}/kernel" for n in ("q", "k", "v"))))
    if not norms_only and cfg.n_heads == cfg.n_kv_heads:
      out.append(ScaleGroup(f"{p}/attn/v/kernel", (f"{p}/attn/o/kernel",),
                            f"{p}/attn/v/bias" if cfg.qkv_bias else None))
    out.append(ScaleGroup(f"{p}/mlp_norm/scale",
                          tuple(f"{p}/mlp/{n}/kernel" for n in ("gate", "up"))))
    if not norms_only:
      out.append(ScaleGroup(f"{p}/mlp/up/kernel", (f"{p}/mlp/down/kernel",)))
  return out


def apply_scale(params, group: ScaleGroup, s: Float[Array, " In"]):
  """params with `s` folded in: the group's kernels' rows times s, its producer divided by s."""
  s = jnp.asarray(s, jnp.float32)
  for path in group.kernels:
    w = get_path(params, path)
    params = replace_path(params, path, (w.astype(jnp.float32) * s[:, None]).astype(w.dtype))
  prev = get_path(params, group.prev)
  div = s if group.prev_is_norm else s[None, :]
  params = replace_path(params, group.prev, (prev.astype(jnp.float32) / div).astype(prev.dtype))
  if group.prev_bias is not None:
    b = get_path(params, group.prev_bias)
    params = replace_path(params, group.prev_bias, (b.astype(jnp.float32) / s).astype(b.dtype))
  return params


def smoothquant_scales(act_max: Float[Array, " In"], kernels: list[Array], alpha: float
                       ) -> Float[Array, " In"]:
  """SmoothQuant's s_j = max|X_j|^alpha / max|W_j|^(1 - alpha), as `smooth_ln_fcs`.

  max|W_j| runs over every kernel of the group (their rows j); it and the result are
  clamped at 1e-5, as upstream.
  """
  w_max = jnp.max(jnp.concatenate([jnp.abs(k.astype(jnp.float32)) for k in kernels], axis=1),
                  axis=1)
  w_max = jnp.maximum(w_max, 1e-5)
  a = jnp.asarray(act_max, jnp.float32)
  return jnp.maximum(a ** alpha / w_max ** (1.0 - alpha), 1e-5)

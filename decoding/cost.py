"""Cost accounting shared by generation, beam search and test-time search methods.

Every decoding or search method returns a `Cost` so methods can be compared at
equal compute. FLOPs and bytes are estimates from a simple model: a forward
pass over n tokens costs 2 * P * n matmul FLOPs (P = logical parameter count,
dequantized size for QArray leaves) plus the attention score / value products,
and moves the parameter bytes (as stored) plus the KV cache it reads once.
"""

from __future__ import annotations

import dataclasses

import jax
import numpy as np


@dataclasses.dataclass(frozen=True)
class Cost:
  """Compute spent by a decoding / search call. Fields add with `+`."""

  tokens: int = 0  # tokens generated (what the caller gets back)
  forward_passes: int = 0  # batched model calls (prefill counts once)
  forward_tokens: int = 0  # token positions the model processed, padding included
  reward_calls: int = 0  # reward / verifier model calls
  flops: float = 0.0  # estimated model FLOPs
  bytes_moved: float = 0.0  # estimated memory traffic (weights + KV cache reads)
  wall_time_s: float = 0.0

  def __add__(self, other: Cost) -> Cost:
    return Cost(**{f.name: getattr(self, f.name) + getattr(other, f.name)
                   for f in dataclasses.fields(self)})

  def times(self, n: int) -> Cost:
    """The cost of doing this n times (wall time included)."""
    return Cost(**{f.name: getattr(self, f.name) * n for f in dataclasses.fields(self)})

  def replace(self, **kw) -> Cost:
    return dataclasses.replace(self, **kw)

  def to_dict(self) -> dict:
    return dataclasses.asdict(self)


def param_count(params) -> int:
  """Logical number of weights (a QArray counts its dequantized size)."""
  return sum(int(np.prod(x.shape)) for x in _weight_leaves(params))


def param_bytes(params) -> int:
  """Bytes the parameters occupy as stored (packed codes + scales for QArray leaves)."""
  total = 0
  for x in _weight_leaves(params):
    total += x.nbytes if hasattr(x, "bits") else int(np.prod(x.shape)) * x.dtype.itemsize
  return total


def _weight_leaves(params):
  from quant.qarray import QArray  # decoding does not otherwise depend on quant

  return jax.tree.leaves(params, is_leaf=lambda x: isinstance(x, QArray))


def forward_cost(params, n_tokens: int, *, kv_read_bytes: float = 0.0,
                 attn_flops: float = 0.0) -> Cost:
  """Cost of one batched forward over `n_tokens` positions (all rows together)."""
  return Cost(forward_passes=1, forward_tokens=n_tokens,
              flops=2.0 * param_count(params) * n_tokens + attn_flops,
              bytes_moved=float(param_bytes(params)) + kv_read_bytes)


def query_heads(params, kv_heads: int, head_dim: int) -> int:
  """Query heads per layer, read from `layers_0/attn/q/kernel` (DESIGN.md param layout)."""
  q = params.get("layers_0", {}).get("attn", {}).get("q", {}).get("kernel") \
      if isinstance(params, dict) else None
  return int(q.shape[1]) // head_dim if q is not None else kv_heads


def attention_flops(n_layers: int, n_heads: int, head_dim: int, n_queries: int,
                    n_keys: int) -> float:
  """q.k^T and p.v FLOPs for `n_queries` queries each over `n_keys` keys, all layers."""
  return 4.0 * n_layers * n_heads * head_dim * n_queries * n_keys


def generation_cost(params, cache, *, prefill_rows: int, prefill_len: int, steps: int,
                    step_rows: int, tokens: int, wall_time_s: float) -> Cost:
  """A prefill of `prefill_rows` x `prefill_len` tokens, then `steps` one-token passes over
  `step_rows` rows, every query attending over the cache's `max_len` slots (as computed)."""
  kh, dh = cache.v[0].shape[1], cache.v[0].shape[3]
  n_layers, s, row_bytes = len(cache.k), cache.max_len, cache.nbytes / cache.batch
  h = query_heads(params, kh, dh)
  total = Cost(tokens=tokens, wall_time_s=wall_time_s)
  if prefill_len:
    n = prefill_rows * prefill_len
    total += forward_cost(params, n, kv_read_bytes=prefill_rows * row_bytes,
                          attn_flops=attention_flops(n_layers, h, dh, n, s))
  step = forward_cost(params, step_rows, kv_read_bytes=step_rows * row_bytes,
                      attn_flops=attention_flops(n_layers, h, dh, step_rows, s))
  return total + step.times(steps)

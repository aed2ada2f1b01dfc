"""Cost accounting shared by generation, beam search and test-time search methods.

Every decoding or search method returns a `Cost` so methods can be compared at
equal compute. FLOPs and bytes are estimates from one formula per forward call
(`forward_cost`): a forward over n tokens costs 2 * P * n matmul FLOPs (P = logical
parameter count, a QArray counts its dequantized size) plus the attention score /
value products, and moves the parameter bytes (as stored) plus the KV cache it
reads once.
"""

from __future__ import annotations

import dataclasses

from model.tree import tree_nbytes, tree_size


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


def forward_cost(step_fn, params, cache, tokens: float, *, calls: int = 1,
                 rows: int | None = None) -> Cost:
  """`calls` forwards of `step_fn` (a model.Decoder), each over `tokens` positions (all rows
  together) with every query attending over the cache's `read_len` slots (as computed).

  Weights: the params the step reads (`step_fn.read_params`), 2 FLOPs per logical
  weight per token and their stored bytes once per call. Cache: the layers the step
  runs, read once per call for `rows` rows (default: the cache's batch).
  """
  read = step_fn.read_params(params)
  rows = cache.batch if rows is None else rows
  kv_bytes = cache.nbytes * (rows / cache.batch) * (step_fn.n_layers / cache.n_layers)
  attn_flops = 4.0 * step_fn.n_layers * step_fn.n_heads * step_fn.head_dim * tokens * (
      cache.read_len)
  return Cost(forward_passes=calls, forward_tokens=round(calls * tokens),
              flops=calls * (2.0 * tree_size(read) * tokens + attn_flops),
              bytes_moved=calls * (float(tree_nbytes(read)) + kv_bytes))


def generation_cost(step_fn, params, cache, *, prefill_rows: int, prefill_len: int, steps: int,
                    step_rows: int, tokens: int, wall_time_s: float) -> Cost:
  """A prefill of `prefill_rows` x `prefill_len` tokens, then `steps` one-token forwards over
  `step_rows` rows (beams fan a cache of `prefill_rows` rows out to `step_rows`)."""
  total = Cost(tokens=tokens, wall_time_s=wall_time_s)
  if prefill_len:
    total += forward_cost(step_fn, params, cache, prefill_rows * prefill_len, rows=prefill_rows)
  if steps:
    total += forward_cost(step_fn, params, cache, step_rows, calls=steps, rows=step_rows)
  return total

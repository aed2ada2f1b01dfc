"""Per-row token samplers: settings are arrays, so changing them never recompiles.

Order of application (one order, everywhere):
  1. repetition penalty on the raw logits of tokens already seen (prompt and
     generated): positive logits are divided by the penalty, negative ones
     multiplied (CTRL / Hugging Face convention);
  2. temperature: logits / T; T == 0 means greedy (argmax of the penalised logits);
  3. top-k: keep the k most likely tokens (k == 0 keeps all);
  4. top-p: of what remains, renormalised, keep the smallest most-likely prefix
     whose mass is >= p (p == 1 keeps all);
  5. min-p: keep tokens whose probability is >= min_p * the top probability.
Steps 3-5 run in sorted order (ties broken by lower token id), so top-k keeps
exactly k tokens even when probabilities tie.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Bool, Float, Int

NEG_INF = -jnp.inf


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Sampler:
  """Per-row sampler settings, each an array [B] (see module docstring for semantics)."""

  temperature: Float[Array, " B"]
  top_k: Int[Array, " B"]
  top_p: Float[Array, " B"]
  min_p: Float[Array, " B"]
  repetition_penalty: Float[Array, " B"]

  @classmethod
  def create(cls, batch: int, *, temperature=0.0, top_k=0, top_p=1.0, min_p=0.0,
             repetition_penalty=1.0) -> Sampler:
    """Broadcasts scalars or per-row sequences to [batch] arrays, validating every value."""
    arrays = dict(
        temperature=_row_array("temperature", temperature, batch, np.float32, 0.0, None,
                               "[0, inf) (0 = greedy)"),
        top_k=_row_array("top_k", top_k, batch, np.int32, 0, None, "[0, inf) (0 = off)"),
        top_p=_row_array("top_p", top_p, batch, np.float32, 0.0, 1.0, "(0, 1] (1 = off)",
                         open_low=True),
        min_p=_row_array("min_p", min_p, batch, np.float32, 0.0, 1.0, "[0, 1] (0 = off)"),
        repetition_penalty=_row_array("repetition_penalty", repetition_penalty, batch,
                                      np.float32, 0.0, None, "(0, inf) (1 = off)",
                                      open_low=True),
    )
    return cls(**{k: jnp.asarray(v) for k, v in arrays.items()})

  @classmethod
  def greedy(cls, batch: int) -> Sampler:
    return cls.create(batch)

  @property
  def batch(self) -> int:
    return self.temperature.shape[0]

  def take(self, idx_B: Array) -> Sampler:
    """Rows `idx` of every setting (fan-out to beams or samples)."""
    return jax.tree.map(lambda x: jnp.take(x, idx_B, axis=0), self)


def _row_array(name, value, batch, dtype, low, high, valid, open_low=False) -> np.ndarray:
  arr = np.asarray(value, dtype=np.float64)
  if arr.ndim > 1 or (arr.ndim == 1 and arr.shape[0] != batch):
    raise ValueError(f"{name} must be a scalar or have one value per row ({batch}), "
                     f"got shape {arr.shape}")
  bad = ~np.isfinite(arr) | (arr <= low if open_low else arr < low)
  if high is not None:
    bad |= arr > high
  if dtype == np.int32:
    bad |= arr != np.round(arr)
  if bad.any():
    raise ValueError(f"{name}={value!r} is outside the valid range {valid}")
  return np.broadcast_to(arr, (batch,)).astype(dtype)


def apply_repetition_penalty(logits_BV: Float[Array, "B V"], seen_BV: Bool[Array, "B V"],
                             penalty_B: Float[Array, " B"]) -> Float[Array, "B V"]:
  """Divides positive / multiplies negative logits of seen tokens by the row's penalty."""
  p = penalty_B[:, None]
  penalised = jnp.where(logits_BV > 0, logits_BV / p, logits_BV * p)
  return jnp.where(seen_BV, penalised, logits_BV)


def _sorted_filtered(logits_BV, s: Sampler):
  """Sorted (descending) temperature-scaled logits with filtered entries at -inf, and ids."""
  b, v = logits_BV.shape
  ids_BV = jnp.broadcast_to(jnp.arange(v, dtype=jnp.int32), (b, v))
  # Sorting on (-logit, id) gives a stable descending order; ties go to the lower id.
  neg_BV, ids_BV = jax.lax.sort((-logits_BV, ids_BV), dimension=1, num_keys=1, is_stable=True)
  greedy_B1 = (s.temperature <= 0)[:, None]
  t_B1 = jnp.where(greedy_B1, 1.0, s.temperature[:, None])
  scaled_BV = -neg_BV / t_B1
  probs_BV = jax.nn.softmax(scaled_BV, axis=-1)
  rank_BV = jnp.arange(v)[None]
  keep_BV = (s.top_k[:, None] <= 0) | (rank_BV < s.top_k[:, None])
  kept_BV = jnp.where(keep_BV, probs_BV, 0.0)
  kept_BV = kept_BV / jnp.sum(kept_BV, axis=-1, keepdims=True)
  mass_before_BV = jnp.cumsum(kept_BV, axis=-1) - kept_BV
  keep_BV &= (mass_before_BV < s.top_p[:, None]) | (rank_BV == 0)
  keep_BV &= probs_BV >= s.min_p[:, None] * probs_BV[:, :1]
  keep_BV &= ~greedy_B1 | (rank_BV == 0)
  return jnp.where(keep_BV, scaled_BV, NEG_INF), ids_BV


def process_logits(logits_BV: Float[Array, "B V"], s: Sampler,
                   seen_BV: Bool[Array, "B V"] | None = None) -> Float[Array, "B V"]:
  """The logits the sampler draws from, in vocab order; removed tokens are -inf.

  Greedy rows keep only their argmax, so softmax of the result is the exact
  sampling distribution of every row (speculative decoding uses it as p and q).
  """
  logits_BV = logits_BV.astype(jnp.float32)
  if seen_BV is not None:
    logits_BV = apply_repetition_penalty(logits_BV, seen_BV, s.repetition_penalty)
  sorted_BV, ids_BV = _sorted_filtered(logits_BV, s)
  rows_B1 = jnp.arange(logits_BV.shape[0])[:, None]
  return jnp.full_like(logits_BV, NEG_INF).at[rows_B1, ids_BV].set(sorted_BV)


def sample(logits_BV: Float[Array, "B V"], s: Sampler, keys_B: Array,
           seen_BV: Bool[Array, "B V"] | None = None) -> Int[Array, " B"]:
  """Draws one token per row with that row's key (rows never share randomness)."""
  logits_BV = logits_BV.astype(jnp.float32)
  if seen_BV is not None:
    logits_BV = apply_repetition_penalty(logits_BV, seen_BV, s.repetition_penalty)

  def draw(_):
    sorted_BV, ids_BV = _sorted_filtered(logits_BV, s)
    gumbel_BV = jax.vmap(lambda k: jax.random.gumbel(k, sorted_BV.shape[1:]))(keys_B)
    pick_B = jnp.argmax(sorted_BV + gumbel_BV, axis=-1)
    return jnp.take_along_axis(ids_BV, pick_B[:, None], axis=1)[:, 0]

  def argmax(_):
    return jnp.argmax(logits_BV, axis=-1).astype(jnp.int32)

  # An all-greedy batch skips the sort entirely (a cheap run-time branch, not a retrace).
  return jax.lax.cond(jnp.all(s.temperature <= 0), argmax, draw, None)

"""KV-cache eviction policies for `model.Decoder(cfg, evict=policy)` (`model.kv_evict`).

A policy is a frozen (hashable) dataclass the model's attention calls duck-typed (model/
never imports this module): it answers `budget` (slots per row and kv head), `sinks`
(positions < sinks are never evicted), `window` (neither are the `window` most recent
positions) and `scores(...)`, which scores every candidate token of one layer after a
forward: the held slots, then the T new tokens. The cache then keeps, per (row, kv head),
the protected tokens and the highest-scoring rest (`model.kv_evict`).

  H2O(budget, sinks=4, window=32): heavy hitters: a token's score is the attention it
    has received, summed over every query so far (prefill and decode) and over the
    query heads of its kv group (Zhang et al., 2023).
  SnapKV(budget, sinks=4, window=32, obs_window=32, pool=7, pooling="max"): at a row's
    prefill (its first forward, from an empty cache), a token's score is the attention
    it gets from the last `obs_window` valid queries of that forward (summed over them
    and the group's heads), pooled along positions with a `pool`-wide window centred on
    it (offsets -(pool // 2) .. pool - 1 - pool // 2; "max" by default, the SnapKV
    LongBench configs; "avg" = the windowed sum / pool, zero padding, as in SnapKV's
    avg_pool1d). As in SnapKV, only keys before the observation window are pooled (and
    pool over each other); keys inside it keep their unpooled sum (they are protected
    anyway when window >= obs_window). SnapKV only compresses the prompt; at a fixed
    budget, later forwards (decode steps, speculative verifies) accumulate attention
    on top of those scores like H2O (our choice).
  StreamingLLM(budget, sinks=4): attention sinks plus the most recent budget - sinks
    tokens (score = position). Positions are never re-assigned inside the cache.

`parse_policy("h2o:budget=256:sinks=4:window=32")` builds one from a CLI string.
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp


def _check_ints(policy, names):
  for name in names:
    v = getattr(policy, name)
    if isinstance(v, bool) or not isinstance(v, int) or v < 0:
      raise ValueError(f"{type(policy).__name__}.{name}={v!r} must be an int >= 0")


def _check_budget(policy, minimum, what):
  if policy.budget < minimum:
    raise ValueError(f"{type(policy).__name__}.budget={policy.budget} is too small: the "
                     f"minimum is {minimum} ({what})")


def _accumulate(prev_BKC, attn_BKTC):
  return prev_BKC + jnp.sum(attn_BKTC, axis=2)


@dataclasses.dataclass(frozen=True)
class H2O:
  """Heavy-hitter oracle: keep sinks, the recent window and the most-attended tokens."""

  budget: int
  sinks: int = 4
  window: int = 32

  def __post_init__(self):
    _check_ints(self, ("budget", "sinks", "window"))
    _check_budget(self, self.sinks + self.window + 1, f"sinks {self.sinks} + window "
                  f"{self.window} + 1 evictable slot")

  def scores(self, prev_BKC, attn_BKTC, **_):
    """prev + the attention each candidate received from this forward's valid queries.

    prev_BKC: held slots' scores, then zeros for the T new tokens ([B, K, S + T]);
    attn_BKTC: this forward's probabilities summed over the group's query heads, rows of
    ignored queries zeroed ([B, K, T, S + T]).
    """
    return _accumulate(prev_BKC, attn_BKTC)


@dataclasses.dataclass(frozen=True)
class SnapKV:
  """Prompt tokens picked by the observation window's pooled attention (see module doc)."""

  budget: int
  sinks: int = 4
  window: int = 32
  obs_window: int = 32
  pool: int = 7
  pooling: str = "max"

  def __post_init__(self):
    _check_ints(self, ("budget", "sinks", "window", "obs_window", "pool"))
    if self.obs_window < 1 or self.pool < 1:
      raise ValueError(f"SnapKV obs_window={self.obs_window} and pool={self.pool} must be >= 1")
    if self.pooling not in ("max", "avg"):
      raise ValueError(f"SnapKV pooling={self.pooling!r}; valid: 'max', 'avg'")
    _check_budget(self, self.sinks + self.window + 1, f"sinks {self.sinks} + window "
                  f"{self.window} + 1 evictable slot")

  def scores(self, prev_BKC, attn_BKTC, *, q_pos_BT, q_valid_BT, kv_pos_BKC, cur_B, fresh_B,
             held, **_):
    """Pooled observation-window attention for fresh rows, else H2O accumulation."""
    acc = _accumulate(prev_BKC, attn_BKTC)
    start_B = cur_B - self.obs_window  # first position of the observation window
    obs_BT = q_valid_BT & (q_pos_BT >= start_B[:, None])
    col_BKC = jnp.sum(attn_BKTC * obs_BT[:, None, :, None], axis=2)
    # A fresh row's held slots are empty; its new tokens sit at consecutive positions.
    col_BKT, pos_BKT = col_BKC[..., held:], kv_pos_BKC[..., held:]
    prefix = (pos_BKT >= 0) & (pos_BKT < start_B[:, None, None])
    pooled = _pool(jnp.where(prefix, col_BKT, 0.0), self.pool, self.pooling)
    snap_new = jnp.where(prefix, pooled, col_BKT)
    snap = jnp.concatenate([col_BKC[..., :held], snap_new], axis=-1)
    return jnp.where(fresh_B[:, None, None], snap, acc)


def _pool(x_BKT, pool: int, pooling: str):
  """Windowed max / mean along the last axis (offsets -(pool // 2) .. pool - 1 - pool // 2),
  zero padding (scores are >= 0, so that is -inf padding for the max)."""
  t = x_BKT.shape[-1]
  left = pool // 2
  xp = jnp.pad(x_BKT, ((0, 0), (0, 0), (left, pool - 1 - left)))
  shifted = [xp[..., j:j + t] for j in range(pool)]
  if pooling == "max":
    return jnp.max(jnp.stack(shifted), axis=0)
  return jnp.sum(jnp.stack(shifted), axis=0) / pool


@dataclasses.dataclass(frozen=True)
class StreamingLLM:
  """Attention sinks + the most recent tokens (Xiao et al., 2023), at positions kept."""

  budget: int
  sinks: int = 4

  def __post_init__(self):
    _check_ints(self, ("budget", "sinks"))
    _check_budget(self, self.sinks + 1, f"sinks {self.sinks} + 1 recent slot")

  @property
  def window(self) -> int:
    """Recent positions protected: all but the slot the next token takes."""
    return self.budget - self.sinks - 1

  def scores(self, prev_BKC, attn_BKTC, *, kv_pos_BKC, **_):
    return kv_pos_BKC.astype(jnp.float32)  # the most recent survive


POLICIES = {"h2o": H2O, "snapkv": SnapKV, "streamingllm": StreamingLLM}


def parse_policy(spec: str | None):
  """A policy from "name:key=value:...", e.g. "h2o:budget=256:sinks=4:window=32",
  "snapkv:budget=512:pool=7:pooling=avg", "streamingllm:budget=256:sinks=4"; None or
  "none" -> None (no eviction). Raises ValueError naming what is wrong."""
  if spec is None or str(spec).strip().lower() in ("", "none"):
    return None
  name, *items = str(spec).strip().split(":")
  cls = POLICIES.get(name.strip().lower())
  if cls is None:
    raise ValueError(f"unknown eviction policy {name!r} in {spec!r}; valid: "
                     f"{', '.join(POLICIES)} (or 'none')")
  fields = {f.name: f for f in dataclasses.fields(cls)}
  kw = {}
  for item in items:
    key, eq, value = item.partition("=")
    key, value = key.strip(), value.strip()
    if not eq or key not in fields:
      raise ValueError(f"eviction spec {spec!r}: bad entry {item!r}; valid keys for {name}: "
                       f"{', '.join(fields)} (as key=value)")
    if key == "pooling":
      kw[key] = value
      continue
    try:
      kw[key] = int(value)
    except ValueError:
      raise ValueError(f"eviction spec {spec!r}: {key}={value!r} must be an integer") from None
  if "budget" not in kw:
    raise ValueError(f"eviction spec {spec!r} needs budget=N (slots per row and kv head)")
  return cls(**kw)

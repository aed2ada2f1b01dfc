"""LazyLLM (Fu et al. 2024): progressive prompt-token pruning in prefill, with revival.

`lazy_prefill` runs the layers one at a time. At each stage layer s (`LazyLLM.stages`)
the last prompt token's attention probabilities at layer s - 1 (averaged over query
heads; as in the paper, the previous layer's attention ranks tokens) score the tokens
still present, and only the top `keep[j] * T` of the prompt (cumulative) enter layers
s, s+1, ...: their hidden states are gathered with their true positions (RoPE, causal
mask), so those layers compute fewer rows. The last prompt token is never pruned; the
first `sinks` positions are kept when `sinks > 0` (default 0: the paper keeps none).

KV cache: layer i's slot p holds position p's key and value only if token p was
processed at layer i; other slots keep what the buffer held (zeros from `init_cache`)
and are marked absent in `LazyAux.present`, which every read here passes to attention
as `kv_valid`. A plain `model.Decoder` step does not know `present`: give it a cache
only once every prompt slot is present (keep all 1.0, or after `revive` of all tokens).

Aux cache (`LazyAux.hidden[j]`): the residual stream entering layer stages[j] of every
token pruned there. `revive` runs layers stages[j].. on chosen pruned tokens from it,
each attending causally to the keys present at that layer (plus the tokens revived with
it), and writes their KV: once every pruned token is revived, every layer holds every
prompt position. That cache equals a full-length forward in which, at layer i, a token
still present at i in the lazy prefill sees only the keys present at i, and a revived
token sees every earlier key (tests/sparsity/test_lazyllm.py builds that oracle).

Decoding (`lazy_decode_step`, `lazy_generate`): new tokens run every layer and see every
present key. revive="topk" revives, in each step and at each stage layer, the `revive_k`
tokens pruned there that the new token's attention at the layer before ranks highest
(the paper's per-step re-selection, restricted to pruned tokens coming back).
"""

from __future__ import annotations

import dataclasses
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jaxtyping import Array, Bool, Float, Int

from model import kv_cache
from model.attention import AttentionMask, cache_attention, cache_keys
from model.config import ModelConfig
from model.decoder import Decoder
from model.kv_cache import KVCache
from model.layers import Dense, Embed, RMSNorm
from model.rope import apply_rope
from model.transformer import MLP
from model.transformer import unembed as _unembed

REVIVE = ("none", "all", "topk")


@dataclasses.dataclass(frozen=True)
class LazyLLM:
  """The pruning schedule: before layer stages[j], keep keep[j] of the prompt's tokens.

  keep: cumulative fractions of the T prompt tokens in (0, 1], non-increasing.
  stages: layer indices in [1, n_layers), strictly ascending, one per keep entry.
  sinks: the first `sinks` positions are never pruned (0: none, as in the paper).
  """

  keep: tuple[float, ...]
  stages: tuple[int, ...]
  sinks: int = 0

  def __post_init__(self):
    object.__setattr__(self, "keep", tuple(self.keep))
    object.__setattr__(self, "stages", tuple(self.stages))
    if not self.keep:
      raise ValueError("LazyLLM.keep must hold at least one fraction")
    if len(self.keep) != len(self.stages):
      raise ValueError(f"LazyLLM.stages={self.stages} needs one layer per keep fraction "
                       f"(keep={self.keep})")
    for f in self.keep:
      if isinstance(f, bool) or not isinstance(f, (int, float)) or not 0 < f <= 1:
        raise ValueError(f"LazyLLM.keep={self.keep}: every fraction must lie in (0, 1]")
    if any(b > a for a, b in zip(self.keep, self.keep[1:], strict=False)):
      raise ValueError(f"LazyLLM.keep={self.keep} must be non-increasing (pruning is "
                       "progressive)")
    for s in self.stages:
      if isinstance(s, bool) or not isinstance(s, int) or s < 1:
        raise ValueError(f"LazyLLM.stages={self.stages}: layers must be ints >= 1 (layer "
                         "s is ranked by layer s - 1's attention)")
    if any(b <= a for a, b in zip(self.stages, self.stages[1:], strict=False)):
      raise ValueError(f"LazyLLM.stages={self.stages} must be strictly ascending")
    if isinstance(self.sinks, bool) or not isinstance(self.sinks, int) or self.sinks < 0:
      raise ValueError(f"LazyLLM.sinks={self.sinks!r} must be an int >= 0")

  def check(self, n_layers: int) -> None:
    if self.stages[-1] >= n_layers:
      raise ValueError(f"LazyLLM.stages={self.stages} must lie in [1, {n_layers}) (the "
                       f"model has {n_layers} layers)")

  def counts(self, t: int) -> tuple[int, ...]:
    """Prompt tokens kept from each stage on: ceil(keep * T), at least the forced ones."""
    forced = 1 + min(self.sinks, t - 1)
    return tuple(min(t, max(math.ceil(f * t), forced)) for f in self.keep)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class LazyAux:
  """Which slots each layer holds, and the aux cache of pruned tokens.

  present: [L, B, S] slot s of layer i holds a computed key / value.
  hidden: [J, B, T, D] the residual stream entering layer stages[j] of tokens pruned
    there (zeros elsewhere).
  pruned_at: [B, T] the stage index a token was pruned at and not yet revived, or -1.
  scores: [J, B, T] the importance (last token's head-mean attention) ranking stage j.
  stages / tokens_per_layer: the schedule and the rows the prefill ran at each layer.
  """

  present: Bool[Array, "L B S"]
  hidden: Float[Array, "J B T D"]
  pruned_at: Int[Array, "B T"]
  scores: Float[Array, "J B T"]
  stages: tuple[int, ...] = dataclasses.field(metadata=dict(static=True))
  tokens_per_layer: tuple[int, ...] = dataclasses.field(metadata=dict(static=True))

  def replace(self, **kw) -> LazyAux:
    return dataclasses.replace(self, **kw)


# --- One layer on N tokens at arbitrary positions (the thin glue of model.transformer).

def _norm(cfg: ModelConfig, p, x):
  return RMSNorm(cfg.norm_eps, cfg.jnp_dtype, cfg.jnp_param_dtype).apply({"params": p}, x)


def _proj(cfg: ModelConfig, p, x, features: int, bias: bool = False):
  dense = Dense(features, use_bias=bias, impl=cfg.matmul_impl, dtype=cfg.jnp_dtype,
                param_dtype=cfg.jnp_param_dtype)
  return dense.apply({"params": p}, x)


def _embed(cfg: ModelConfig, params, tokens_BT):
  emb = Embed(cfg.vocab_size, cfg.d_model, cfg.jnp_dtype, cfg.jnp_param_dtype)
  return emb.apply({"params": params["embed"]}, tokens_BT)


def _logits(cfg: ModelConfig, params, x_BND):
  return _unembed(cfg, params, _norm(cfg, params["final_norm"], x_BND))


def _qkv(cfg: ModelConfig, p, x_BND, pos_BN):
  b, n, _ = x_BND.shape
  h, k, dh = cfg.n_heads, cfg.n_kv_heads, cfg.dh
  x_BND = _norm(cfg, p["attn_norm"], x_BND)
  pa = p["attn"]
  q = _proj(cfg, pa["q"], x_BND, h * dh, cfg.qkv_bias).reshape(b, n, h, dh)
  kk = _proj(cfg, pa["k"], x_BND, k * dh, cfg.qkv_bias).reshape(b, n, k, dh)
  v = _proj(cfg, pa["v"], x_BND, k * dh, cfg.qkv_bias).reshape(b, n, k, dh)
  if cfg.qk_norm:
    q, kk = _norm(cfg, pa["q_norm"], q), _norm(cfg, pa["k_norm"], kk)
  rope = dict(theta=cfg.rope_theta, scaling=cfg.rope_scaling)
  return apply_rope(q, pos_BN, **rope), apply_rope(kk, pos_BN, **rope), v


_SLOT_AXIS = {"heads_major": (3, 2, 2), "seq_major": (1, 1, 1)}  # k, v, scales


def _scatter(buf, new_BN, slots_BN):
  """buf[b, slots[b, n]] = new[b, n] along buf's axis 1 (slot S or more: dropped)."""
  rows = jnp.arange(buf.shape[0])[:, None]
  return buf.at[rows, slots_BN].set(new_BN.astype(buf.dtype), mode="drop")


def _put(buf, new_BN, slots_BN, axis):
  return jnp.moveaxis(_scatter(jnp.moveaxis(buf, axis, 1), new_BN, slots_BN), 1, axis)


def _write(cache: KVCache, i: int, k_BNKD, v_BNKD, slots_BN) -> KVCache:
  """Layer i with the tokens' k, v at their slots (a quantized cache: codes and scales)."""
  ka, va, sa = _SLOT_AXIS[cache.layout]
  if cache.quant is None:
    return cache.with_layer(i, _put(cache.k[i], k_BNKD, slots_BN, ka),
                            _put(cache.v[i], v_BNKD, slots_BN, va))
  enc = kv_cache.encode(cache, i, k_BNKD, v_BNKD)  # k_mean from these rows at length 0
  return cache.with_layer(
      i, _put(cache.k[i], enc["k"], slots_BN, ka), _put(cache.v[i], enc["v"], slots_BN, va),
      _put(cache.k_scale[i], enc["k_scale"], slots_BN, sa),
      _put(cache.v_scale[i], enc["v_scale"], slots_BN, sa), enc.get("k_mean"))


def _layer(cfg: ModelConfig, p, x_BND, pos_BN, write_BN, cache: KVCache, present_LBS, i: int):
  """Layer i on N tokens: writes the k, v of those with `write`, then every token attends
  to the present keys at positions <= its own. Returns (x, cache, present)."""
  b, n, _ = x_BND.shape
  s = cache.max_len
  q, k, v = _qkv(cfg, p, x_BND, pos_BN)
  slots_BN = jnp.where(write_BN, pos_BN, s)
  cache = _write(cache, i, k, v, slots_BN)
  valid_BS = _scatter(present_LBS[i], jnp.ones_like(write_BN), slots_BN)
  present_LBS = present_LBS.at[i].set(valid_BS)
  mask = AttentionMask(q_positions=pos_BN,
                       kv_positions=jnp.broadcast_to(jnp.arange(s)[None], (b, s)),
                       kv_valid=valid_BS)
  out = cache_attention(q, cache, i, mask=mask, impl=cfg.attn_impl, qk=cfg.attn_qk)
  x_BND = x_BND + _proj(cfg, p["attn"]["o"], out.reshape(b, n, -1), cfg.d_model)
  x_BND = x_BND + MLP(cfg).apply({"params": p["mlp"]}, _norm(cfg, p["mlp_norm"], x_BND))
  return x_BND, cache, present_LBS


def _importance(cfg: ModelConfig, p, x_B1D, pos_B1, cache: KVCache, valid_BS, i: int):
  """One token's attention probabilities at layer i over the slots, mean over heads [B, S]
  (x: the residual stream entering layer i; f32 scores, whatever attn_qk)."""
  b, s = valid_BS.shape
  kh, g, dh = cfg.n_kv_heads, cfg.n_heads // cfg.n_kv_heads, cfg.dh
  q, _, _ = _qkv(cfg, p, x_B1D, pos_B1)
  q_BKGD = q[:, 0].reshape(b, kh, g, dh).astype(jnp.float32)
  logits_BKGS = jnp.einsum("bkgd,bksd->bkgs", q_BKGD, cache_keys(cache, i)) * dh ** -0.5
  seen_BS = valid_BS & (jnp.arange(s)[None] <= pos_B1)
  logits_BKGS = jnp.where(seen_BS[:, None, None], logits_BKGS, -1e30)
  return jnp.mean(jax.nn.softmax(logits_BKGS, axis=-1), axis=(1, 2))


# --- Prefill, revival, decoding.

def lazy_prefill(cfg: ModelConfig, params, tokens_BT: Int[Array, "B T"], policy: LazyLLM, *,
                 cache: KVCache) -> tuple[Float[Array, "B V"], KVCache, LazyAux]:
  """Prefills T prompt tokens (every row all T) with progressive pruning.

  cache: an empty KVCache (`model.Decoder(cfg).init_cache`) with max_len >= T; tokens go
  to slots 0..T-1 and lengths become T. Returns the last token's logits (f32), the cache
  and the LazyAux (module docstring). Jittable with cfg and policy static.
  """
  b, t = tokens_BT.shape
  _check(cfg, policy, cache, b, t)
  n_layers, s = cfg.n_layers, cache.max_len
  counts = policy.counts(t)
  stage_of = {layer: j for j, layer in enumerate(policy.stages)}
  rows = jnp.arange(b)[:, None]
  cache = cache.with_lengths(jnp.zeros((b,), jnp.int32))
  x = _embed(cfg, params, tokens_BT)
  pos = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32)[None], (b, t))
  present = jnp.zeros((n_layers, b, s), bool)
  n_st = len(policy.stages)
  hidden = jnp.zeros((n_st, b, t, cfg.d_model), x.dtype)
  pruned_at = jnp.full((b, t), -1, jnp.int32)
  scores = jnp.zeros((n_st, b, t), jnp.float32)
  x_in, per_layer = x, []
  for i in range(n_layers):
    if i in stage_of:
      j = stage_of[i]
      # pos is ascending and holds T - 1 last: x_in[:, -1] is the last prompt token.
      imp_BS = _importance(cfg, params[f"layers_{i - 1}"], x_in[:, -1:], pos[:, -1:], cache,
                           present[i - 1], i - 1)
      imp_BN = jnp.take_along_axis(imp_BS, pos, axis=1)
      scores = scores.at[j, rows, pos].set(imp_BN)
      if counts[j] < x.shape[1]:
        forced = (pos == t - 1) | (pos < policy.sinks)
        _, sel = jax.lax.top_k(jnp.where(forced, 2.0, imp_BN), counts[j])
        sel = jnp.sort(sel, axis=-1)
        kept_BN = jnp.zeros(pos.shape, bool).at[rows, sel].set(True)
        dropped = jnp.where(kept_BN, t, pos)
        hidden = hidden.at[j].set(_scatter(hidden[j], x, dropped))
        pruned_at = _scatter(pruned_at, jnp.full(pos.shape, j, jnp.int32), dropped)
        x = jnp.take_along_axis(x, sel[..., None], axis=1)
        pos = jnp.take_along_axis(pos, sel, axis=1)
    per_layer.append(x.shape[1])
    x_in = x
    x, cache, present = _layer(cfg, params[f"layers_{i}"], x, pos, jnp.ones(pos.shape, bool),
                               cache, present, i)
  logits_BV = _logits(cfg, params, x[:, -1:])[:, 0]
  aux = LazyAux(present=present, hidden=hidden, pruned_at=pruned_at, scores=scores,
                stages=policy.stages, tokens_per_layer=tuple(per_layer))
  return logits_BV, cache.with_lengths(jnp.full((b,), t, jnp.int32)), aux


def _check(cfg, policy, cache, b, t):
  if not isinstance(policy, LazyLLM):
    raise ValueError(f"policy must be a LazyLLM, got {type(policy).__name__}")
  policy.check(cfg.n_layers)
  if not isinstance(cache, KVCache):
    raise ValueError(f"cache must be a model.KVCache, got {type(cache).__name__}")
  if cache.n_layers != cfg.n_layers or cache.batch != b:
    raise ValueError(f"cache has {cache.n_layers} layers and batch {cache.batch}; the model "
                     f"has {cfg.n_layers} layers and the tokens batch {b}")
  if not 1 <= t <= cache.max_len:
    raise ValueError(f"prompt length {t} must lie in [1, cache max_len={cache.max_len}]")


def _revive(cfg, params, cache, aux: LazyAux, pos_BN, want_BN, first_layer: int):
  """Runs layers first_layer.. on the wanted pruned tokens from the aux cache (see revive)."""
  n_layers, t = cfg.n_layers, aux.pruned_at.shape[1]
  stage_of = {layer: j for j, layer in enumerate(aux.stages)}
  j_BN = jnp.take_along_axis(aux.pruned_at, pos_BN, axis=1)
  want_BN = want_BN & (j_BN >= 0)
  start_BN = jnp.where(want_BN, jnp.asarray(aux.stages)[jnp.maximum(j_BN, 0)], n_layers)
  x = jnp.zeros((*pos_BN.shape, cfg.d_model), aux.hidden.dtype)
  present = aux.present
  for i in range(first_layer, n_layers):
    if i in stage_of:
      h_BND = jnp.take_along_axis(aux.hidden[stage_of[i]], pos_BN[..., None], axis=1)
      x = jnp.where((want_BN & (j_BN == stage_of[i]))[..., None], h_BND, x)
    x, cache, present = _layer(cfg, params[f"layers_{i}"], x, pos_BN, want_BN & (start_BN <= i),
                               cache, present, i)
  pruned_at = _scatter(aux.pruned_at, jnp.full(pos_BN.shape, -1, jnp.int32),
                       jnp.where(want_BN, pos_BN, t))
  return cache, aux.replace(present=present, pruned_at=pruned_at)


def revive(cfg: ModelConfig, params, cache: KVCache, aux: LazyAux,
           positions_or_mask: Array) -> tuple[KVCache, LazyAux]:
  """Computes the missing KV of chosen pruned prompt tokens from the aux cache.

  positions_or_mask: bool [B, T] (True: revive that position) or int positions [B, N].
  Tokens not pruned are left alone. Each chosen token runs the layers from the one it was
  pruned before, attending causally to the keys present there (and to the tokens revived
  with it); its KV is written at its slot and `aux` marks it present. Jittable.
  """
  sel = jnp.asarray(positions_or_mask)
  b, t = aux.pruned_at.shape
  if sel.ndim != 2 or sel.shape[0] != b:
    raise ValueError(f"positions_or_mask has shape {sel.shape}; valid: bool [{b}, {t}] or "
                     f"int positions [{b}, N]")
  if sel.dtype == jnp.bool_:
    if sel.shape[1] != t:
      raise ValueError(f"a revive mask must be [{b}, {t}] (the prompt), got {sel.shape}")
    pos_BN, want_BN = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32)[None], (b, t)), sel
  else:
    pos_BN = sel.astype(jnp.int32)
    want_BN = (pos_BN >= 0) & (pos_BN < t)
    pos_BN = jnp.clip(pos_BN, 0, t - 1)
  return _revive(cfg, params, cache, aux, pos_BN, want_BN, aux.stages[0])


def lazy_decode_step(cfg: ModelConfig, params, tokens_B1: Int[Array, "B 1"], cache: KVCache,
                     aux: LazyAux, *, revive_k: int = 0):
  """One token per row at slot `lengths`: (logits [B, V] f32, cache, aux).

  The token sees every present key. revive_k > 0: at each stage layer s, first revive the
  revive_k tokens pruned at s that this token's attention at layer s - 1 ranks highest.
  """
  n_layers, t = cfg.n_layers, aux.pruned_at.shape[1]
  stage_of = {layer: j for j, layer in enumerate(aux.stages)}
  pos = cache.lengths[:, None]
  x = _embed(cfg, params, tokens_B1)
  x_in = x
  for i in range(n_layers):
    if revive_k and i in stage_of:
      imp = _importance(cfg, params[f"layers_{i - 1}"], x_in, pos, cache, aux.present[i - 1],
                        i - 1)[:, :t]
      rank = jnp.where(aux.pruned_at == stage_of[i], imp, -1.0)
      val, sel = jax.lax.top_k(rank, min(revive_k, t))
      cache, aux = _revive(cfg, params, cache, aux, sel, val >= 0, i)
    x_in = x
    x, cache, present = _layer(cfg, params[f"layers_{i}"], x, pos, jnp.ones(pos.shape, bool),
                               cache, aux.present, i)
    aux = aux.replace(present=present)
  return _logits(cfg, params, x)[:, 0], cache.with_lengths(cache.lengths + 1), aux


class LazyGenerateOutput(NamedTuple):
  tokens: Array  # i32[B, max_new_tokens], greedy; the first comes from the prefill
  cache: KVCache
  aux: LazyAux


def lazy_generate(params, prompt_tokens, cfg: ModelConfig, policy: LazyLLM, *,
                  max_new_tokens: int, revive: str = "none", revive_k: int = 8,
                  max_len: int | None = None) -> LazyGenerateOutput:
  """Greedy decoding after `lazy_prefill`, as one jitted program.

  prompt_tokens: int [B, T] (every row T tokens; no ragged prompts). revive: "none"
  (pruned tokens stay absent from the layers they were pruned before), "all" (every pruned
  token revived right after the prefill: afterwards an ordinary full cache), "topk"
  (`lazy_decode_step` with revive_k). max_len: cache slots (default T + max_new_tokens).
  """
  if revive not in REVIVE:
    raise ValueError(f"revive={revive!r}; valid: {', '.join(map(repr, REVIVE))}")
  if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or (
      max_new_tokens < 1):
    raise ValueError(f"max_new_tokens={max_new_tokens!r} must be an int >= 1")
  if revive == "topk" and (not isinstance(revive_k, int) or revive_k < 1):
    raise ValueError(f"revive_k={revive_k!r} must be an int >= 1 with revive='topk'")
  tokens_BT = jnp.asarray(prompt_tokens, jnp.int32)
  if tokens_BT.ndim != 2:
    raise ValueError(f"prompt_tokens must be [B, T], got shape {tokens_BT.shape}")
  b, t = tokens_BT.shape
  cache = Decoder(cfg).init_cache(b, max_len or t + max_new_tokens)
  if cache.max_len < t + max_new_tokens - 1:
    raise ValueError(f"max_len={cache.max_len} < prompt {t} + max_new_tokens - 1")
  return _generate_jit(params, tokens_BT, cache, cfg=cfg, policy=policy, new=max_new_tokens,
                       revive=revive, revive_k=revive_k if revive == "topk" else 0)


def _generate(params, tokens_BT, cache, *, cfg, policy, new, revive, revive_k):
  logits, cache, aux = lazy_prefill(cfg, params, tokens_BT, policy, cache=cache)
  b, t = tokens_BT.shape
  if revive == "all":
    cache, aux = _revive(cfg, params, cache, aux,
                         jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32)[None], (b, t)),
                         jnp.ones((b, t), bool), policy.stages[0])
  tok = jnp.argmax(logits, axis=-1).astype(jnp.int32)
  out = jnp.zeros((b, new), jnp.int32).at[:, 0].set(tok)

  def body(n, carry):
    out, tok, cache, aux = carry
    logits, cache, aux = lazy_decode_step(cfg, params, tok[:, None], cache, aux,
                                          revive_k=revive_k)
    tok = jnp.argmax(logits, axis=-1).astype(jnp.int32)
    return out.at[:, n].set(tok), tok, cache, aux

  out, _, cache, aux = jax.lax.fori_loop(1, new, body, (out, tok, cache, aux))
  return LazyGenerateOutput(out, cache, aux)


_generate_jit = jax.jit(_generate,
                        static_argnames=("cfg", "policy", "new", "revive", "revive_k"),
                        donate_argnames=("cache",))

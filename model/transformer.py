"""Llama-family decoder (Llama 2/3, Mistral, Qwen2/3) in Flax Linen.

`apply` is the one forward. Decoding tricks compose outside it: `hidden_states`
runs the first k layers (early-exit drafts add their own head on top, then
`unembed`), and cache variants (a shared prefix, `model.kv_cache.PrefixCache`)
are handled behind the attention door, not by keywords here.
"""

from __future__ import annotations

import operator

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float, Int

from model.attention import Context, attend, context, finish
from model.config import ModelConfig
from model.layers import Dense, Embed, RMSNorm
from model.rope import apply_rope


def _dense(cfg: ModelConfig, features: int, name: str, bias: bool = False) -> Dense:
  return Dense(features, use_bias=bias, impl=cfg.matmul_impl, dtype=cfg.jnp_dtype,
               param_dtype=cfg.jnp_param_dtype, name=name)


def _norm(cfg: ModelConfig, name: str | None = None) -> RMSNorm:
  return RMSNorm(cfg.norm_eps, cfg.jnp_dtype, cfg.jnp_param_dtype, name=name)


class Attention(nn.Module):
  """Projects, normalises (QK-norm), applies RoPE, calls the attention door, projects out."""

  cfg: ModelConfig

  @nn.compact
  def __call__(self, x_BTD, ctx: Context, layer: int):
    cfg = self.cfg
    b, t, _ = x_BTD.shape
    h, k, dh = cfg.n_heads, cfg.n_kv_heads, cfg.dh
    if cfg.fused_projections:  # one [D, (H + 2K) Dh] kernel (`model.fuse_projections`)
      qkv = _dense(cfg, (h + 2 * k) * dh, "qkv", cfg.qkv_bias)(x_BTD)
      q, kk, vv = jnp.split(qkv, [h * dh, (h + k) * dh], axis=-1)
    else:
      q = _dense(cfg, h * dh, "q", cfg.qkv_bias)(x_BTD)
      kk = _dense(cfg, k * dh, "k", cfg.qkv_bias)(x_BTD)
      vv = _dense(cfg, k * dh, "v", cfg.qkv_bias)(x_BTD)
    q_BTHD = q.reshape(b, t, h, dh)
    k_BTKD, v_BTKD = kk.reshape(b, t, k, dh), vv.reshape(b, t, k, dh)
    if cfg.qk_norm:
      q_BTHD, k_BTKD = _norm(cfg, "q_norm")(q_BTHD), _norm(cfg, "k_norm")(k_BTKD)
    rope = dict(theta=cfg.rope_theta, scaling=cfg.rope_scaling)
    q_BTHD = apply_rope(q_BTHD, ctx.positions, **rope)
    k_BTKD = apply_rope(k_BTKD, ctx.positions, **rope)
    out_BTHD, ctx = attend(ctx, layer, q_BTHD, k_BTKD, v_BTKD, impl=cfg.attn_impl,
                           qk=cfg.attn_qk)
    return _dense(cfg, cfg.d_model, "o")(out_BTHD.reshape(b, t, h * dh)), ctx


class MLP(nn.Module):
  cfg: ModelConfig

  @nn.compact
  def __call__(self, x_BTD):
    cfg = self.cfg
    if cfg.fused_projections:  # one [D, 2F] kernel (`model.fuse_projections`)
      gate_BTF, up_BTF = jnp.split(_dense(cfg, 2 * cfg.ffn_dim, "gate_up")(x_BTD), 2, axis=-1)
    else:
      gate_BTF = _dense(cfg, cfg.ffn_dim, "gate")(x_BTD)
      up_BTF = _dense(cfg, cfg.ffn_dim, "up")(x_BTD)
    return _dense(cfg, cfg.d_model, "down")(nn.silu(gate_BTF) * up_BTF)


class Block(nn.Module):
  cfg: ModelConfig

  @nn.compact
  def __call__(self, x_BTD, ctx: Context, layer: int):
    a_BTD, ctx = Attention(self.cfg, name="attn")(_norm(self.cfg, "attn_norm")(x_BTD), ctx, layer)
    x_BTD = x_BTD + a_BTD
    return x_BTD + MLP(self.cfg, name="mlp")(_norm(self.cfg, "mlp_norm")(x_BTD)), ctx


class Transformer(nn.Module):
  """Decoder-only LM. `__call__` returns (logits[B,T,V] f32, updated cache or None)."""

  cfg: ModelConfig

  def setup(self):
    cfg = self.cfg
    self.embed = Embed(cfg.vocab_size, cfg.d_model, cfg.jnp_dtype, cfg.jnp_param_dtype)
    self.layers = [Block(cfg, name=f"layers_{i}") for i in range(cfg.n_layers)]
    self.final_norm = _norm(cfg)
    if not cfg.tie_embeddings:
      self.lm_head = _dense(cfg, cfg.vocab_size, "lm_head")

  def __call__(self, tokens_BT, positions_BT=None, segment_ids_BT=None, cache=None):
    x_BTD, cache = self.hidden_states(tokens_BT, positions_BT, segment_ids_BT, cache)
    return self.unembed(self.final_norm(x_BTD)), cache

  def hidden_states(self, tokens_BT, positions_BT=None, segment_ids_BT=None, cache=None,
                    n_layers: int | None = None):
    """The residual stream after the first `n_layers` layers (all by default), and the cache.

    With a cache, layers past `n_layers` keep their buffers untouched.
    """
    b, t = tokens_BT.shape
    ctx = context(b, t, positions=positions_BT, segment_ids=segment_ids_BT,
                            cache=cache)
    x_BTD = self.embed(tokens_BT)
    for i, layer in enumerate(self.layers[:n_layers]):
      x_BTD, ctx = layer(x_BTD, ctx, i)
    return x_BTD, finish(ctx, t)

  def unembed(self, x_BTD):
    """The LM head (tied: x @ E^T), f32 logits; no final norm."""
    logits = self.embed.attend(x_BTD) if self.cfg.tie_embeddings else self.lm_head(x_BTD)
    return logits.astype(jnp.float32)


def init(cfg: ModelConfig, key: Array) -> dict:
  """Initialises params (a plain nested dict, without the 'params' collection key)."""
  return jax.jit(abstract_init_fn(cfg))(key)


def abstract_init_fn(cfg: ModelConfig):
  tokens = jnp.zeros((1, 1), jnp.int32)
  return lambda key: Transformer(cfg).init(key, tokens)["params"]


def param_shapes(cfg: ModelConfig):
  """Abstract params (ShapeDtypeStructs) without allocating memory."""
  return jax.eval_shape(abstract_init_fn(cfg), jax.random.key(0))


def _check_fused(cfg: ModelConfig, params) -> None:
  attn = params.get("layers_0", {}).get("attn", {}) if isinstance(params, dict) else {}
  if cfg.fused_projections and "q" in attn:
    raise ValueError("cfg.fused_projections=True but the params hold separate q / k / v "
                     "kernels; pass model.fuse_projections(params)")
  if not cfg.fused_projections and "qkv" in attn:
    raise ValueError("the params hold fused projections (attn/qkv, mlp/gate_up): use "
                     "cfg.replace(fused_projections=True)")


def check_token_ids(name: str, ids, vocab_size: int, *, valid=None) -> None:
  """ValueError naming `name` when `ids` are not integers or hold an id outside [0, vocab).

  An id >= vocab embeds as NaN (and poisons every row that attends to it) and a negative
  one wraps, so every public edge that takes token ids calls this before any compute. The
  dtype is checked always; the values only on concrete arrays (a jax Tracer, under jit, is
  skipped: jitted callers pay nothing). valid: a bool mask of the entries that are real
  tokens (padding past a row's length is not checked).
  """
  dtype = getattr(ids, "dtype", None)
  if isinstance(ids, jax.core.Tracer):
    if not jnp.issubdtype(dtype, jnp.integer):
      raise ValueError(f"{name} must hold integer token ids, got dtype {dtype}")
    return
  if isinstance(ids, jax.Array) and not ids.is_fully_addressable:
    return  # another host holds part of it: only a jitted (traced) check could see it all
  a = np.asarray(ids)
  if a.size and a.dtype.kind not in "iu":
    raise ValueError(f"{name} must hold integer token ids, got dtype {a.dtype}")
  bad = (a < 0) | (a >= vocab_size)
  if valid is not None:
    bad &= np.asarray(valid, bool)
  if bad.any():
    where = [int(i) for i in np.argwhere(bad)[0]]
    more = f" (and {int(bad.sum()) - 1} more)" if bad.sum() > 1 else ""
    raise ValueError(f"{name} holds token id {a[tuple(where)]} at {where}{more}; valid: "
                     f"[0, {vocab_size}) (vocab_size)")


def check_token_id(name: str, value, vocab_size: int) -> int:
  """`value` as an int in [0, vocab) (a pad / EOS id), or a ValueError naming `name`."""
  if isinstance(value, jax.core.Tracer):
    return value
  try:
    if isinstance(value, (bool, np.bool_)):
      raise TypeError
    v = operator.index(value)
  except TypeError:
    raise ValueError(f"{name}={value!r} must be an int token id in [0, {vocab_size}) "
                     "(vocab_size)") from None
  if not 0 <= v < vocab_size:
    raise ValueError(f"{name}={v}; valid: [0, {vocab_size}) (vocab_size)")
  return v


def _check(cfg: ModelConfig, tokens_BT, cache) -> None:
  if not hasattr(tokens_BT, "dtype") or len(tokens_BT.shape) != 2:
    raise ValueError(f"tokens_BT must be an int array [B, T], got "
                     f"{getattr(tokens_BT, 'shape', type(tokens_BT).__name__)}")
  check_token_ids("tokens_BT", tokens_BT, cfg.vocab_size)
  if cache is None and tokens_BT.shape[1] > cfg.max_seq_len:
    raise ValueError(
        f"sequence length {tokens_BT.shape[1]} exceeds max_seq_len={cfg.max_seq_len}")
  if cache is not None and cache.n_layers != cfg.n_layers:
    raise ValueError(f"cache has {cache.n_layers} layers, the model has {cfg.n_layers}")


def apply(cfg: ModelConfig, params, tokens_BT: Int[Array, "B T"], *, positions=None,
          segment_ids=None, cache=None):
  """The forward pass: (logits[B, T, V] f32, cache).

  positions: absolute positions [B, T] (default: 0.. without a cache, each row's next
    slots with one). segment_ids: packed documents [B, T] (no cache); a token sees
    only earlier tokens of its own segment.
  cache: a KVCache (tokens are written at each row's `lengths`, which advance by T)
    or a PrefixCache (rows continue after their group's shared prefix).
  """
  _check(cfg, tokens_BT, cache)
  _check_fused(cfg, params)
  return Transformer(cfg).apply({"params": params}, tokens_BT, positions, segment_ids, cache)


def hidden_states(cfg: ModelConfig, params, tokens_BT: Int[Array, "B T"], *,
                  n_layers: int | None = None, positions=None, segment_ids=None, cache=None):
  """(the residual stream [B, T, D] after the first `n_layers` layers, cache), as in `apply`."""
  if n_layers is not None and (not isinstance(n_layers, int) or not 1 <= n_layers <= cfg.n_layers):
    raise ValueError(f"n_layers={n_layers!r} must be an int in [1, {cfg.n_layers}]")
  _check(cfg, tokens_BT, cache)
  _check_fused(cfg, params)
  return Transformer(cfg).apply({"params": params}, tokens_BT, positions, segment_ids, cache,
                                n_layers, method=Transformer.hidden_states)


def unembed(cfg: ModelConfig, params, x_BTD: Float[Array, "B T D"]) -> Float[Array, "B T V"]:
  """The LM head applied to hidden states (no final norm), f32 logits."""
  return Transformer(cfg).apply({"params": params}, x_BTD, method=Transformer.unembed)

"""Llama-family decoder (Llama 2/3, Mistral, Qwen2/3) in Flax Linen.

`apply` is the one forward. Decoding tricks compose outside it: `hidden_states`
runs the first k layers (early-exit drafts add their own head on top, then
`unembed`), and cache variants (a shared prefix, `model.kv_cache.PrefixCache`)
are handled behind the attention door, not by keywords here.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
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


def _check(cfg: ModelConfig, tokens_BT, cache) -> None:
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

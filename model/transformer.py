"""Llama-family decoder (Llama 2/3, Mistral, Qwen2/3) in Flax Linen."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
from jaxtyping import Array, Int

from decoding.kv_cache import KVCache, write
from model.attention import AttentionMask, attention
from model.config import ModelConfig
from model.layers import Dense, Embed, RMSNorm
from model.rope import apply_rope


def _dense(cfg: ModelConfig, features: int, name: str, bias: bool = False) -> Dense:
  return Dense(features, use_bias=bias, impl=cfg.matmul_impl, dtype=cfg.jnp_dtype,
               param_dtype=cfg.jnp_param_dtype, name=name)


class Attention(nn.Module):
  cfg: ModelConfig

  @nn.compact
  def __call__(self, x_BTD, positions_BT, mask: AttentionMask, kv=None):
    """Returns (out[B,T,D], new (k, v) cache buffers or None)."""
    cfg = self.cfg
    b, t, _ = x_BTD.shape
    h, k, dh = cfg.n_heads, cfg.n_kv_heads, cfg.dh
    q_BTHD = _dense(cfg, h * dh, "q", cfg.qkv_bias)(x_BTD).reshape(b, t, h, dh)
    k_BTKD = _dense(cfg, k * dh, "k", cfg.qkv_bias)(x_BTD).reshape(b, t, k, dh)
    v_BTKD = _dense(cfg, k * dh, "v", cfg.qkv_bias)(x_BTD).reshape(b, t, k, dh)
    if cfg.qk_norm:
      norm = lambda n: RMSNorm(cfg.norm_eps, cfg.jnp_dtype, cfg.jnp_param_dtype, name=n)
      q_BTHD, k_BTKD = norm("q_norm")(q_BTHD), norm("k_norm")(k_BTKD)
    rope = dict(theta=cfg.rope_theta, scaling=cfg.rope_scaling)
    q_BTHD = apply_rope(q_BTHD, positions_BT, **rope)
    k_BTKD = apply_rope(k_BTKD, positions_BT, **rope)
    if kv is not None:
      k_cache, v_cache, start_B = kv
      k_BSKD = write(k_cache, k_BTKD, start_B)
      v_BSKD = write(v_cache, v_BTKD, start_B)
      new_kv = (k_BSKD, v_BSKD)
    else:
      k_BSKD, v_BSKD, new_kv = k_BTKD, v_BTKD, None
    out_BTHD = attention(q_BTHD, k_BSKD.astype(q_BTHD.dtype), v_BSKD.astype(q_BTHD.dtype),
                         mask=mask, impl=cfg.attn_impl)
    return _dense(cfg, cfg.d_model, "o")(out_BTHD.reshape(b, t, h * dh)), new_kv


class MLP(nn.Module):
  cfg: ModelConfig

  @nn.compact
  def __call__(self, x_BTD):
    cfg = self.cfg
    gate_BTF = _dense(cfg, cfg.ffn_dim, "gate")(x_BTD)
    up_BTF = _dense(cfg, cfg.ffn_dim, "up")(x_BTD)
    return _dense(cfg, cfg.d_model, "down")(nn.silu(gate_BTF) * up_BTF)


class Block(nn.Module):
  cfg: ModelConfig

  @nn.compact
  def __call__(self, x_BTD, positions_BT, mask, kv=None):
    cfg = self.cfg
    norm = lambda n: RMSNorm(cfg.norm_eps, cfg.jnp_dtype, cfg.jnp_param_dtype, name=n)
    a_BTD, new_kv = Attention(cfg, name="attn")(norm("attn_norm")(x_BTD), positions_BT, mask, kv)
    x_BTD = x_BTD + a_BTD
    x_BTD = x_BTD + MLP(cfg, name="mlp")(norm("mlp_norm")(x_BTD))
    return x_BTD, new_kv


class Transformer(nn.Module):
  """Decoder-only LM. `__call__` returns (logits[B,T,V] f32, updated cache or None)."""

  cfg: ModelConfig

  def setup(self):
    cfg = self.cfg
    self.embed = Embed(cfg.vocab_size, cfg.d_model, cfg.jnp_dtype, cfg.jnp_param_dtype)
    self.layers = [Block(cfg, name=f"layers_{i}") for i in range(cfg.n_layers)]
    self.final_norm = RMSNorm(cfg.norm_eps, cfg.jnp_dtype, cfg.jnp_param_dtype)
    if not cfg.tie_embeddings:
      self.lm_head = _dense(cfg, cfg.vocab_size, "lm_head")

  def __call__(self, tokens_BT, positions_BT=None, segment_ids_BT=None, cache=None,
               kv_valid_BS=None, return_hidden: bool = False):
    return self.forward(tokens_BT, positions_BT, segment_ids_BT, cache, kv_valid_BS,
                        return_hidden)

  def forward(self, tokens_BT, positions_BT=None, segment_ids_BT=None,
              cache: KVCache | None = None, kv_valid_BS=None, return_hidden=False):
    b, t = tokens_BT.shape
    if cache is not None:
      start_B = cache.lengths
      if positions_BT is None:
        positions_BT = start_B[:, None] + jnp.arange(t, dtype=jnp.int32)[None]
      s = cache.max_len
      mask = AttentionMask(q_positions=positions_BT,
                           kv_positions=jnp.broadcast_to(jnp.arange(s)[None], (b, s)),
                           kv_valid=kv_valid_BS)
    else:
      if positions_BT is None:
        positions_BT = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32)[None], (b, t))
      mask = AttentionMask(q_positions=positions_BT, kv_positions=positions_BT,
                           q_segment_ids=segment_ids_BT, kv_segment_ids=segment_ids_BT,
                           kv_valid=kv_valid_BS)
      if segment_ids_BT is not None:
        # Packed rows: positions restart per segment, so causality must use the
        # row index, which is monotone across segments.
        idx_BT = jnp.broadcast_to(jnp.arange(t)[None], (b, t))
        mask = mask.replace(q_positions=idx_BT, kv_positions=idx_BT)
    x_BTD = self.embed(tokens_BT)
    hidden = []
    new_k, new_v = [], []
    for i, layer in enumerate(self.layers):
      kv = None if cache is None else (cache.k[i], cache.v[i], cache.lengths)
      x_BTD, layer_kv = layer(x_BTD, positions_BT, mask, kv)
      if layer_kv is not None:
        new_k.append(layer_kv[0])
        new_v.append(layer_kv[1])
      if return_hidden:
        hidden.append(x_BTD)
    logits_BTV = self.head(x_BTD)
    new_cache = None
    if cache is not None:
      new_cache = KVCache(k=tuple(new_k), v=tuple(new_v), lengths=cache.lengths + t)
    if return_hidden:
      return logits_BTV, new_cache, hidden
    return logits_BTV, new_cache

  def head(self, x_BTD):
    """Final norm + LM head (shared by early-exit heads on intermediate layers)."""
    x_BTD = self.final_norm(x_BTD)
    if self.cfg.tie_embeddings:
      logits = self.embed.attend(x_BTD)
    else:
      logits = self.lm_head(x_BTD)
    return logits.astype(jnp.float32)


def init(cfg: ModelConfig, key: Array) -> dict:
  """Initialises params (a plain nested dict, without the 'params' collection key)."""
  return jax.jit(lambda k: abstract_init_fn(cfg)(k))(key)


def abstract_init_fn(cfg: ModelConfig):
  tokens = jnp.zeros((1, 1), jnp.int32)
  return lambda key: Transformer(cfg).init(key, tokens)["params"]


def param_shapes(cfg: ModelConfig):
  """Abstract params (ShapeDtypeStructs) without allocating memory."""
  return jax.eval_shape(abstract_init_fn(cfg), jax.random.key(0))


def apply(cfg: ModelConfig, params, tokens_BT: Int[Array, "B T"], *,
          positions_BT=None, segment_ids_BT=None, cache: KVCache | None = None,
          kv_valid_BS=None, return_hidden: bool = False):
  """Forward pass: (logits[B,T,V] f32, cache). With a cache, tokens are written at each
  row's `cache.lengths` and lengths advance by T."""
  if cache is None and tokens_BT.shape[1] > cfg.max_seq_len:
    raise ValueError(
        f"sequence length {tokens_BT.shape[1]} exceeds max_seq_len={cfg.max_seq_len}")
  return Transformer(cfg).apply({"params": params}, tokens_BT, positions_BT, segment_ids_BT,
                                cache, kv_valid_BS, return_hidden)


def count_params(params) -> int:
  return sum(int(x.size) for x in jax.tree.leaves(params))


def logits_fn(cfg: ModelConfig):
  """A `step_fn(params, tokens, cache) -> (logits, cache)` for decoding."""

  def step_fn(params, tokens_BT, cache):
    return apply(cfg, params, tokens_BT, cache=cache)

  return step_fn



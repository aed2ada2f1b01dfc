"""Llama-family decoder (Llama 2/3, Mistral, Qwen2/3) in Flax Linen."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
from jaxtyping import Array, Int

from decoding.kv_cache import KVCache, write
from model.attention import AttentionMask, attention, merge_partials
from model.config import ModelConfig
from model.layers import Dense, Embed, RMSNorm
from model.rope import apply_rope


def _dense(cfg: ModelConfig, features: int, name: str, bias: bool = False) -> Dense:
  return Dense(features, use_bias=bias, impl=cfg.matmul_impl, dtype=cfg.jnp_dtype,
               param_dtype=cfg.jnp_param_dtype, name=name)


class Attention(nn.Module):
  cfg: ModelConfig

  @nn.compact
  def __call__(self, x_BTD, positions_BT, mask: AttentionMask, kv=None, prefix_kv=None):
    """Returns (out[B,T,D], new (k, v) cache buffers or None).

    `prefix_kv = (k[Bp,P,K,Dh], v, mask)`: a prefix shared by groups of B / Bp
    consecutive rows (Hydragen); attended once per group, merged by log-sum-exp.
    """
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
    if kv is not None and prefix_kv is None and b == 1 and t <= SPLIT_MAX_TOKENS:
      # One row, one token (decode): attend before writing (see _cached_attention).
      k_cache, v_cache, start_B = kv
      out_BTHD = _cached_attention(cfg, q_BTHD, k_BTKD, v_BTKD, k_cache, v_cache, start_B, mask)
      # The writes must come after the reads for XLA to update the cache in place: a data
      # dependency on the attention output orders them (0 * finite = 0).
      dep = 0 * out_BTHD[:1, :1, :1, :1].astype(k_BTKD.dtype)
      k_BTKD, v_BTKD = k_BTKD + dep, v_BTKD + dep
      new_kv = (write(k_cache, k_BTKD, start_B, slot_axis=3),
                write(v_cache, v_BTKD, start_B, slot_axis=2))
      return _dense(cfg, cfg.d_model, "o")(out_BTHD.reshape(b, t, h * dh)), new_kv
    if kv is not None:  # cache buffers: k [B, K, Dh, S], v [B, K, S, Dh]
      k_cache, v_cache, start_B = kv
      k_all = write(k_cache, k_BTKD, start_B, slot_axis=3)
      v_all = write(v_cache, v_BTKD, start_B, slot_axis=2)
      new_kv = (k_all, v_all)
    else:  # [B, T, K, Dh]
      k_all, v_all, new_kv = k_BTKD, v_BTKD, None
    k_all, v_all = k_all.astype(q_BTHD.dtype), v_all.astype(q_BTHD.dtype)
    heads_major = kv is not None
    if prefix_kv is None:
      out_BTHD = attention(q_BTHD, k_all, v_all, mask=mask, impl=cfg.attn_impl,
                           kv_heads_major=heads_major)
    else:
      out_BTHD = _prefix_attention(cfg, q_BTHD, k_all, v_all, mask, *prefix_kv,
                                   heads_major=heads_major)
    return _dense(cfg, cfg.d_model, "o")(out_BTHD.reshape(b, t, h * dh)), new_kv


# Up to this many new tokens, a one-row cached forward attends before it writes. Measured
# (same process, batch 1): a win for 1-token decode steps (bench-25m 7.4 -> 6.6 ms at 256
# slots); a loss for 5-9-token speculative verifies of the 0.82M main-job model, where
# the extra attention and merge ops outweigh the copies they save.
SPLIT_MAX_TOKENS = 1


def _cached_attention(cfg, q_BTHD, k_BTKD, v_BTKD, k_cache, v_cache, start_B, mask):
  """Attention of T new tokens to a cache holding slots < start plus to themselves.

  Equals attending to the cache after writing the new tokens at slots start..start+T-1,
  merged by log-sum-exp. Used for one row: there the write is a dynamic_update_slice,
  which XLA:CPU duplicates into the reshaping attention read, so every layer's cache was
  copied on every decode step (~1.4 ms of 7 at 256 slots, more at long prompts). Reading
  first and writing after keeps the update in place. Several rows write by scatter,
  which stays in place anyway (and the extra merge costs more than it saves there).
  """
  b, t = q_BTHD.shape[:2]
  s = v_cache.shape[2]
  dtype = q_BTHD.dtype
  old_BS = jnp.arange(s)[None] < start_B[:, None]
  slots_BT = start_B[:, None] + jnp.arange(t, dtype=jnp.int32)[None]
  new_valid = None
  if mask.kv_valid is not None:
    old_BS &= mask.kv_valid
    new_valid = jnp.take_along_axis(mask.kv_valid, jnp.minimum(slots_BT, s - 1), axis=1)
  out_c, lse_c = attention(q_BTHD, k_cache.astype(dtype), v_cache.astype(dtype),
                           mask=mask.replace(kv_valid=old_BS), impl=cfg.attn_impl,
                           return_lse=True, kv_heads_major=True)
  out_n, lse_n = attention(q_BTHD, k_BTKD.astype(dtype), v_BTKD.astype(dtype),
                           mask=mask.replace(kv_positions=slots_BT, kv_valid=new_valid),
                           impl=cfg.attn_impl, return_lse=True)
  return merge_partials(out_c, lse_c, out_n, lse_n)[0]


def _prefix_attention(cfg, q_BTHD, k, v, mask, pk_PKDS, pv_PKSD, prefix_mask, *, heads_major):
  """Suffix attention per row, plus one batched attention of each row group to its prefix.

  The prefix buffers are a KV cache's (Bp rows); k, v as in `attention`."""
  b, t, h, dh = q_BTHD.shape
  bp = pk_PKDS.shape[0]
  q_PMHD = q_BTHD.reshape(bp, (b // bp) * t, h, dh)  # rows of a group become queries
  dtype = q_BTHD.dtype
  out_p, lse_p = attention(q_PMHD, pk_PKDS.astype(dtype), pv_PKSD.astype(dtype),
                           mask=prefix_mask, impl=cfg.attn_impl, return_lse=True,
                           kv_heads_major=True)
  out_s, lse_s = attention(q_BTHD, k, v, mask=mask, impl=cfg.attn_impl, return_lse=True,
                           kv_heads_major=heads_major)
  out_BTHD, _ = merge_partials(out_p.reshape(b, t, h, dh), lse_p.reshape(b, t, h), out_s, lse_s)
  return out_BTHD


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
  def __call__(self, x_BTD, positions_BT, mask, kv=None, prefix_kv=None):
    cfg = self.cfg
    norm = lambda n: RMSNorm(cfg.norm_eps, cfg.jnp_dtype, cfg.jnp_param_dtype, name=n)
    a_BTD, new_kv = Attention(cfg, name="attn")(norm("attn_norm")(x_BTD), positions_BT, mask, kv,
                                                prefix_kv)
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
    # Early-exit head; its params exist only once `decoding.early_exit` adds them.
    self.exit_proj = _dense(cfg, cfg.d_model, "exit_proj")
    self.exit_norm = RMSNorm(cfg.norm_eps, cfg.jnp_dtype, cfg.jnp_param_dtype)

  def __call__(self, tokens_BT, positions_BT=None, segment_ids_BT=None, cache=None,
               kv_valid_BS=None, return_hidden: bool = False, exit_layer: int | None = None,
               prefix_cache: KVCache | None = None):
    return self.forward(tokens_BT, positions_BT, segment_ids_BT, cache, kv_valid_BS,
                        return_hidden, exit_layer, prefix_cache)

  def forward(self, tokens_BT, positions_BT=None, segment_ids_BT=None,
              cache: KVCache | None = None, kv_valid_BS=None, return_hidden=False,
              exit_layer: int | None = None, prefix_cache: KVCache | None = None):
    b, t = tokens_BT.shape
    if prefix_cache is not None:
      # Suffix rows continue after their group's prefix: the mask works on
      # suffix-relative positions (suffix slot j == relative position j), RoPE on
      # absolute ones.
      plen_B = jnp.repeat(prefix_cache.lengths, b // prefix_cache.batch)
      if positions_BT is not None:
        positions_BT = positions_BT - plen_B[:, None]
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
    rope_BT, prefix_mask = positions_BT, None
    if prefix_cache is not None:
      rope_BT = positions_BT + plen_B[:, None]
      p = prefix_cache.max_len
      prefix_mask = AttentionMask(causal=False, kv_valid=jnp.arange(p)[None]
                                  < prefix_cache.lengths[:, None])
    x_BTD = self.embed(tokens_BT)
    hidden = []
    new_k, new_v = [], []
    n_run = self.cfg.n_layers if exit_layer is None else exit_layer
    for i, layer in enumerate(self.layers[:n_run]):
      kv = None if cache is None else (cache.k[i], cache.v[i], cache.lengths)
      prefix_kv = None
      if prefix_cache is not None:
        prefix_kv = (prefix_cache.k[i], prefix_cache.v[i], prefix_mask)
      x_BTD, layer_kv = layer(x_BTD, rope_BT, mask, kv, prefix_kv)
      if layer_kv is not None:
        new_k.append(layer_kv[0])
        new_v.append(layer_kv[1])
      if return_hidden:
        hidden.append(x_BTD)
    if exit_layer is not None and self.has_variable("params", "exit_norm"):
      logits_BTV = self.exit_head(x_BTD)
    else:
      logits_BTV = self.head(x_BTD)
    new_cache = None
    if cache is not None:
      # Layers past an early exit keep their buffers untouched.
      new_cache = KVCache(k=(*new_k, *cache.k[n_run:]), v=(*new_v, *cache.v[n_run:]),
                          lengths=cache.lengths + t)
    if return_hidden:
      return logits_BTV, new_cache, hidden
    return logits_BTV, new_cache

  def exit_head(self, x_BTD):
    """Early-exit head: x + exit_proj(x), its own norm, then the shared LM head."""
    x_BTD = self.exit_norm(x_BTD + self.exit_proj(x_BTD))
    logits = self.embed.attend(x_BTD) if self.cfg.tie_embeddings else self.lm_head(x_BTD)
    return logits.astype(jnp.float32)

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
          kv_valid_BS=None, return_hidden: bool = False, exit_layer: int | None = None,
          prefix_cache: KVCache | None = None):
  """Forward pass: (logits[B,T,V] f32, cache). With a cache, tokens are written at each
  row's `cache.lengths` and lengths advance by T.

  exit_layer: run only the first k layers, then the early-exit head (params
    `exit_proj`, `exit_norm`; `decoding.early_exit.init_exit_head`) or, without
    one, the final norm and LM head. A cache may hold all layers: those past k
    are returned untouched (self-speculation shares the target's cache).
  prefix_cache: a filled KVCache with Bp rows (Bp divides B) shared by groups of
    B / Bp consecutive rows (Hydragen). Their tokens continue after the prefix:
    `cache` holds only the suffix (slot j == prefix length + j), explicit
    `positions_BT` are absolute.
  """
  if cache is None and tokens_BT.shape[1] > cfg.max_seq_len:
    raise ValueError(
        f"sequence length {tokens_BT.shape[1]} exceeds max_seq_len={cfg.max_seq_len}")
  if exit_layer is not None:
    if not isinstance(exit_layer, int) or not 1 <= exit_layer <= cfg.n_layers:
      raise ValueError(f"exit_layer={exit_layer!r} must be an int in [1, {cfg.n_layers}]")
    if cache is not None and len(cache.k) < exit_layer:
      raise ValueError(f"cache has {len(cache.k)} layers, exit_layer={exit_layer} needs "
                       f">= {exit_layer}")
  if prefix_cache is not None:
    b = tokens_BT.shape[0]
    if prefix_cache.batch < 1 or b % prefix_cache.batch:
      raise ValueError(f"prefix_cache batch {prefix_cache.batch} must divide the token "
                       f"batch {b}")
    if segment_ids_BT is not None:
      raise ValueError("segment_ids_BT (packed rows) cannot be combined with prefix_cache")
    if len(prefix_cache.k) != cfg.n_layers:
      raise ValueError(f"prefix_cache has {len(prefix_cache.k)} layers, the model has "
                       f"{cfg.n_layers}")
  return Transformer(cfg).apply({"params": params}, tokens_BT, positions_BT, segment_ids_BT,
                                cache, kv_valid_BS, return_hidden, exit_layer, prefix_cache)


def count_params(params) -> int:
  return sum(int(x.size) for x in jax.tree.leaves(params))


def logits_fn(cfg: ModelConfig):
  """A `step_fn(params, tokens, cache) -> (logits, cache)` for decoding."""

  def step_fn(params, tokens_BT, cache):
    return apply(cfg, params, tokens_BT, cache=cache)

  return step_fn



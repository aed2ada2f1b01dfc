"""Frozen model configuration and named presets.

Dimension glossary used across sparq: B batch, T/L length, S cache length,
D model, H heads, K kv heads, Dh head dim, F ffn, V vocab.
"""

from __future__ import annotations

import dataclasses
from typing import Literal

import jax.numpy as jnp

AttnImpl = Literal["reference", "xla", "pallas"]
MatmulImpl = Literal["xla", "pallas"]
_DTYPES = ("float32", "bfloat16", "float16")
ROPE_SCALING_TYPES = ("llama3", "linear")
KV_QUANTS = ("int8", "int4", "fp8")  # KV-cache code formats (model.kv_cache); None: float
ATTN_QK = ("int8",)  # Q.K^T numerics (model.attention); None: float


@dataclasses.dataclass(frozen=True)
class RopeScaling:
  """RoPE frequency scaling (Llama-3 style or linear position interpolation)."""

  type: str = "llama3"
  factor: float = 8.0
  low_freq_factor: float = 1.0
  high_freq_factor: float = 4.0
  original_max_position_embeddings: int = 8192

  def __post_init__(self):
    if self.type not in ROPE_SCALING_TYPES:
      raise ValueError(
          f"rope_scaling.type={self.type!r} is not supported; valid: {ROPE_SCALING_TYPES}")
    if self.factor <= 0:
      raise ValueError(f"rope_scaling.factor={self.factor} must be > 0")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """Llama-family decoder hyper-parameters. Frozen and hashable (a jit static arg)."""

  vocab_size: int = 259
  d_model: int = 64
  n_layers: int = 2
  n_heads: int = 4
  n_kv_heads: int = 2
  head_dim: int | None = None  # None: d_model // n_heads
  ffn_dim: int = 128
  max_seq_len: int = 256
  rope_theta: float = 10_000.0
  rope_scaling: RopeScaling | None = None
  norm_eps: float = 1e-5
  qk_norm: bool = False  # Qwen3: RMSNorm on q and k per head, before RoPE
  qkv_bias: bool = False  # Qwen2: biases on the q/k/v projections
  tie_embeddings: bool = True
  param_dtype: str = "float32"
  dtype: str = "float32"  # compute dtype
  attn_impl: AttnImpl = "xla"
  matmul_impl: MatmulImpl = "xla"
  # KV cache codes per (token, kv head) with absmax scales: "int8", "int4" (packed two per
  # byte along Dh), "fp8" (e4m3); None keeps the cache in `dtype`.
  kv_quant: str | None = None
  # "int8": SageAttention Q.K^T, int8 x int8 -> int32 against keys smoothed by their mean
  # (a cached forward needs kv_quant="int8"); None: in `dtype`.
  attn_qk: str | None = None
  # Decode-time fused projections: attn/qkv and mlp/gate_up kernels in place of q / k / v
  # and gate / up (params from `model.fuse_projections`); training and export keep them
  # separate.
  fused_projections: bool = False

  def __post_init__(self):
    for name in ("vocab_size", "d_model", "n_layers", "n_heads", "n_kv_heads", "ffn_dim",
                 "max_seq_len"):
      v = getattr(self, name)
      if not isinstance(v, int) or v < 1:
        raise ValueError(f"ModelConfig.{name}={v!r} must be a positive integer")
    if self.head_dim is None and self.d_model % self.n_heads:
      raise ValueError(
          f"ModelConfig.n_heads={self.n_heads} must divide d_model={self.d_model} "
          "(or set head_dim explicitly)")
    if self.n_heads % self.n_kv_heads:
      raise ValueError(
          f"ModelConfig.n_kv_heads={self.n_kv_heads} must divide n_heads={self.n_heads}")
    for name in ("param_dtype", "dtype"):
      if getattr(self, name) not in _DTYPES:
        raise ValueError(f"ModelConfig.{name}={getattr(self, name)!r}; valid: {_DTYPES}")
    if self.attn_impl not in ("reference", "xla", "pallas"):
      raise ValueError(
          f"ModelConfig.attn_impl={self.attn_impl!r}; valid: 'reference', 'xla', 'pallas'")
    if self.matmul_impl not in ("xla", "pallas"):
      raise ValueError(f"ModelConfig.matmul_impl={self.matmul_impl!r}; valid: 'xla', 'pallas'")
    if self.kv_quant is not None and self.kv_quant not in KV_QUANTS:
      raise ValueError(f"ModelConfig.kv_quant={self.kv_quant!r}; valid: None, "
                       f"{', '.join(map(repr, KV_QUANTS))}")
    if self.kv_quant == "int4" and self.dh % 2:
      raise ValueError(f"ModelConfig.kv_quant='int4' packs two codes per byte along the head "
                       f"dim, which must be even; head dim is {self.dh}")
    if not isinstance(self.fused_projections, bool):
      raise ValueError(f"ModelConfig.fused_projections={self.fused_projections!r}; valid: "
                       "True, False")
    if self.attn_qk is not None and self.attn_qk not in ATTN_QK:
      raise ValueError(f"ModelConfig.attn_qk={self.attn_qk!r}; valid: None, "
                       f"{', '.join(map(repr, ATTN_QK))}")
    if isinstance(self.rope_scaling, dict):  # allow dicts from configs / json
      object.__setattr__(self, "rope_scaling", RopeScaling(**self.rope_scaling))

  @property
  def dh(self) -> int:
    return self.head_dim if self.head_dim is not None else self.d_model // self.n_heads

  @property
  def jnp_param_dtype(self):
    return jnp.dtype(self.param_dtype)

  @property
  def jnp_dtype(self):
    return jnp.dtype(self.dtype)

  def replace(self, **kw) -> ModelConfig:
    return dataclasses.replace(self, **kw)

  def to_dict(self) -> dict:
    return dataclasses.asdict(self)

  @classmethod
  def from_dict(cls, d: dict) -> ModelConfig:
    d = dict(d)
    if d.get("rope_scaling") is not None:
      d["rope_scaling"] = RopeScaling(**d["rope_scaling"])
    return cls(**d)


PRESETS: dict[str, ModelConfig] = {
    # ~90K params: unit tests.
    "test": ModelConfig(),
    # ~0.9M params: the main job on 2 CPU cores.
    "tiny": ModelConfig(d_model=128, n_layers=4, n_heads=4, n_kv_heads=2, ffn_dim=384,
                        max_seq_len=512),
    # ~3.3M params.
    "small": ModelConfig(d_model=256, n_layers=4, n_heads=8, n_kv_heads=4, ffn_dim=768,
                         max_seq_len=1024),
    # ~25M params: decode benchmarks (d=512, 8 layers, 8 heads / 4 kv, ffn 1536, vocab 256).
    "bench-25m": ModelConfig(vocab_size=256, d_model=512, n_layers=8, n_heads=8, n_kv_heads=4,
                             ffn_dim=1536, max_seq_len=2048),
    # SmolLM-135M shape.
    "smollm-135m": ModelConfig(vocab_size=49152, d_model=576, n_layers=30, n_heads=9,
                               n_kv_heads=3, ffn_dim=1536, max_seq_len=2048,
                               rope_theta=10_000.0),
    # Llama-3.2-1B shape (1.24B params).
    "llama-3.2-1b": ModelConfig(
        vocab_size=128256, d_model=2048, n_layers=16, n_heads=32, n_kv_heads=8, head_dim=64,
        ffn_dim=8192, max_seq_len=131072, rope_theta=500_000.0,
        rope_scaling=RopeScaling("llama3", 32.0, 1.0, 4.0, 8192), norm_eps=1e-5,
        tie_embeddings=True, param_dtype="bfloat16", dtype="bfloat16"),
}


def get_preset(name: str, **overrides) -> ModelConfig:
  """Returns the named preset, optionally with fields replaced."""
  if name not in PRESETS:
    raise ValueError(f"unknown model preset {name!r}; valid: {sorted(PRESETS)}")
  return PRESETS[name].replace(**overrides) if overrides else PRESETS[name]

"""Frozen model configuration and named presets.

Dimension glossary used across sparq: B batch, T/L length, S cache length,
D model, H heads, K kv heads, Dh head dim, F ffn, V vocab.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Literal

import jax.numpy as jnp

AttnImpl = Literal["reference", "xla", "pallas"]
MatmulImpl = Literal["xla", "pallas"]
_DTYPES = ("float32", "bfloat16", "float16")
ROPE_SCALING_TYPES = ("llama3", "linear")
KV_QUANTS = ("int8", "int4", "fp8")  # KV-cache code formats (model.kv_cache); None: float
ATTN_QK = ("int8",)  # Q.K^T numerics (model.attention); None: float


def _is_int(v) -> bool:
  return isinstance(v, int) and not isinstance(v, bool)


def _is_real(v) -> bool:
  return isinstance(v, (int, float)) and not isinstance(v, bool)


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
    for name in ("factor", "low_freq_factor", "high_freq_factor"):
      v = getattr(self, name)
      if not _is_real(v) or not 0 < v < math.inf:
        raise ValueError(f"rope_scaling.{name}={v!r}; valid: a finite number > 0")
    if self.type == "llama3" and self.high_freq_factor <= self.low_freq_factor:
      raise ValueError(f"rope_scaling.high_freq_factor={self.high_freq_factor!r} must exceed "
                       f"low_freq_factor={self.low_freq_factor!r} (llama3 scaling divides by "
                       "their difference)")
    v = self.original_max_position_embeddings
    if not _is_int(v) or v < 1:
      raise ValueError(f"rope_scaling.original_max_position_embeddings={v!r}; valid: an int >= 1")


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
    if isinstance(self.rope_scaling, dict):  # allow dicts from configs / json
      object.__setattr__(self, "rope_scaling", RopeScaling(**self.rope_scaling))
    validate(self)

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
    if not isinstance(d, dict):
      raise ValueError(f"a model config must be a JSON object / dict; got {type(d).__name__}")
    unknown = sorted(set(d) - {f.name for f in dataclasses.fields(cls)})
    if unknown:
      raise ValueError(f"unknown ModelConfig fields {unknown}")
    d = dict(d)
    rs = d.get("rope_scaling")
    if isinstance(rs, dict):
      unknown = sorted(set(rs) - {f.name for f in dataclasses.fields(RopeScaling)})
      if unknown:
        raise ValueError(f"unknown rope_scaling fields {unknown}")
      d["rope_scaling"] = RopeScaling(**rs)
    return cls(**d)


_POSITIVE_INTS = ("vocab_size", "d_model", "n_layers", "n_heads", "n_kv_heads", "ffn_dim",
                  "max_seq_len")
_BOOLS = ("qk_norm", "qkv_bias", "tie_embeddings", "fused_projections")
_CHOICES = {"param_dtype": (False, _DTYPES), "dtype": (False, _DTYPES),
            "attn_impl": (False, ("reference", "xla", "pallas")),
            "matmul_impl": (False, ("xla", "pallas")), "kv_quant": (True, KV_QUANTS),
            "attn_qk": (True, ATTN_QK)}


def validate(cfg: ModelConfig) -> None:
  """Every ModelConfig field in one place: a ValueError naming the field, its value and the
  valid range (raised at construction, so no forward ever sees a bad config)."""
  def bad(name, valid):
    raise ValueError(f"ModelConfig.{name}={getattr(cfg, name)!r}; valid: {valid}")

  for name in _POSITIVE_INTS:
    if not _is_int(getattr(cfg, name)) or getattr(cfg, name) < 1:
      bad(name, "a positive integer")
  for name in _BOOLS:
    if not isinstance(getattr(cfg, name), bool):
      bad(name, "True, False")
  for name, (optional, valid) in _CHOICES.items():
    if getattr(cfg, name) not in valid and not (optional and getattr(cfg, name) is None):
      bad(name, ("None, " if optional else "") + ", ".join(map(repr, valid)))
  if cfg.head_dim is not None and (not _is_int(cfg.head_dim) or cfg.head_dim < 2
                                   or cfg.head_dim % 2):
    bad("head_dim", "None (d_model // n_heads) or an even integer >= 2 (RoPE rotates pairs)")
  if cfg.head_dim is None and cfg.d_model % cfg.n_heads:
    raise ValueError(f"ModelConfig.n_heads={cfg.n_heads} must divide d_model={cfg.d_model} "
                     "(or set head_dim explicitly)")
  if cfg.head_dim is None and (cfg.dh < 2 or cfg.dh % 2):
    raise ValueError(f"ModelConfig.d_model={cfg.d_model} / n_heads={cfg.n_heads} gives head "
                     f"dim {cfg.dh}; RoPE needs an even head dim >= 2 (or set head_dim)")
  if cfg.n_heads % cfg.n_kv_heads:
    raise ValueError(
        f"ModelConfig.n_kv_heads={cfg.n_kv_heads} must divide n_heads={cfg.n_heads}")
  if not _is_real(cfg.rope_theta) or not 0 < cfg.rope_theta < math.inf:
    bad("rope_theta", "a finite number > 0")
  if not _is_real(cfg.norm_eps) or not 0 <= cfg.norm_eps < math.inf:
    bad("norm_eps", "a finite number >= 0")
  if cfg.rope_scaling is not None and not isinstance(cfg.rope_scaling, RopeScaling):
    bad("rope_scaling", "None, a RopeScaling or a dict of its fields")


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

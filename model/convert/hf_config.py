"""Hugging Face `config.json` <-> `ModelConfig` for the Llama / Mistral / Qwen2 / Qwen3 families.

Sliding window (Mistral v0.1, Qwen with `use_sliding_window`): sparq's model has
full causal attention, which equals windowed attention on any sequence no longer
than the window. So a window W smaller than `max_position_embeddings` is mapped
to `max_seq_len = W`: the import is exact, and sparq refuses longer inputs and
caches instead of silently computing a different function.
"""

from __future__ import annotations

from model.config import ModelConfig, RopeScaling

ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM",
                 "Qwen3ForCausalLM")
_MODEL_TYPE = {"LlamaForCausalLM": "llama", "MistralForCausalLM": "mistral",
               "Qwen2ForCausalLM": "qwen2", "Qwen3ForCausalLM": "qwen3"}
# transformers' defaults for keys a config.json may omit.
_MAX_POSITIONS = {"LlamaForCausalLM": 2048, "MistralForCausalLM": 131072,
                  "Qwen2ForCausalLM": 32768, "Qwen3ForCausalLM": 32768}
_REQUIRED = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
             "num_attention_heads")
ROPE_TYPES = ("default", "linear", "llama3")
_FLOAT_DTYPES = ("float32", "bfloat16", "float16")


def architecture_of(hf: dict) -> str:
  """The one supported architecture a config.json names (by `architectures` or `model_type`)."""
  archs = hf.get("architectures") or [
      a for a, t in _MODEL_TYPE.items() if t == hf.get("model_type")]
  if len(archs) != 1 or archs[0] not in ARCHITECTURES:
    found = archs or hf.get("model_type")
    raise ValueError(f"config.json architecture {found!r} is not supported; supported: "
                     f"{', '.join(ARCHITECTURES)}")
  return archs[0]


def checkpoint_dtype(hf: dict) -> str | None:
  """The floating dtype the config declares for the weights, if it is one sparq supports."""
  d = hf.get("dtype") or hf.get("torch_dtype")
  return d if d in _FLOAT_DTYPES else None


def _rope(hf: dict, max_positions: int) -> tuple[float, RopeScaling | None]:
  # transformers 4.x writes `rope_theta` + `rope_scaling`; 5.x writes `rope_parameters`.
  rope = dict(hf.get("rope_scaling") or hf.get("rope_parameters") or {})
  theta = float(rope.get("rope_theta", hf.get("rope_theta", 10_000.0)))
  partial = rope.get("partial_rotary_factor", hf.get("partial_rotary_factor", 1.0))
  if partial not in (None, 1, 1.0):
    raise ValueError(f"config.json partial_rotary_factor={partial} is not supported; "
                     "sparq rotates the whole head (1.0)")
  kind = rope.get("rope_type", rope.get("type", "default"))
  if kind == "default":
    return theta, None
  if kind == "linear":
    return theta, RopeScaling("linear", factor=float(rope["factor"]))
  if kind == "llama3":
    return theta, RopeScaling(
        "llama3", factor=float(rope["factor"]), low_freq_factor=float(rope["low_freq_factor"]),
        high_freq_factor=float(rope["high_freq_factor"]),
        original_max_position_embeddings=int(
            rope.get("original_max_position_embeddings", max_positions)))
  raise ValueError(f"config.json rope_scaling type {kind!r} is not supported; supported: "
                   f"{', '.join(ROPE_TYPES)}")


def _sliding_window(arch: str, hf: dict) -> int | None:
  if arch == "MistralForCausalLM":
    return hf.get("sliding_window", 4096)
  if arch == "LlamaForCausalLM" or not hf.get("use_sliding_window", False):
    return None
  n = hf["num_hidden_layers"]
  types = hf.get("layer_types") or [
      "sliding_attention" if i >= hf.get("max_window_layers", 28) else "full_attention"
      for i in range(n)]
  return hf.get("sliding_window", 4096) if "sliding_attention" in types else None


def from_hf_config(hf: dict, *, param_dtype: str | None = None,
                   dtype: str | None = None) -> ModelConfig:
  """A `ModelConfig` for a config.json dict; raises ValueError for what sparq can't run."""
  arch = architecture_of(hf)
  missing = [k for k in _REQUIRED if hf.get(k) is None]
  if missing:
    raise ValueError(f"config.json lacks required keys {missing}")
  if hf.get("quantization_config"):
    raise ValueError("config.json has a quantization_config: pre-quantized checkpoints are not "
                     "supported; import the float model and quantize it with sparq")
  for key, ok in (("hidden_act", "silu"), ("mlp_bias", False)):
    if hf.get(key, ok) != ok:
      raise ValueError(f"config.json {key}={hf[key]!r} is not supported; valid: {ok!r}")
  if arch != "Qwen2ForCausalLM" and hf.get("attention_bias", False):
    raise ValueError("config.json attention_bias=True (biases on q/k/v/o) is not supported; "
                     "sparq supports q/k/v biases only, as in Qwen2ForCausalLM")
  max_len = int(hf.get("max_position_embeddings") or _MAX_POSITIONS[arch])
  theta, scaling = _rope(hf, max_len)
  window = _sliding_window(arch, hf)
  if window is not None and window < max_len:
    max_len = int(window)
  d, h = int(hf["hidden_size"]), int(hf["num_attention_heads"])
  head_dim = hf.get("head_dim") or (128 if arch == "Qwen3ForCausalLM" else d // h)
  param_dtype = param_dtype or checkpoint_dtype(hf) or "float32"
  return ModelConfig(
      vocab_size=int(hf["vocab_size"]), d_model=d, n_layers=int(hf["num_hidden_layers"]),
      n_heads=h, n_kv_heads=int(hf.get("num_key_value_heads") or h),
      head_dim=None if d % h == 0 and head_dim == d // h else int(head_dim),
      ffn_dim=int(hf["intermediate_size"]), max_seq_len=max_len, rope_theta=theta,
      rope_scaling=scaling, norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
      qk_norm=arch == "Qwen3ForCausalLM", qkv_bias=arch == "Qwen2ForCausalLM",
      tie_embeddings=bool(hf.get("tie_word_embeddings", False)), param_dtype=param_dtype,
      dtype=dtype or param_dtype)


def default_architecture(cfg: ModelConfig) -> str:
  """The family whose structure matches `cfg` (QK-norm -> Qwen3, q/k/v bias -> Qwen2)."""
  if cfg.qk_norm:
    return "Qwen3ForCausalLM"
  return "Qwen2ForCausalLM" if cfg.qkv_bias else "LlamaForCausalLM"


def check_architecture(cfg: ModelConfig, architecture: str) -> None:
  """Raises ValueError unless `architecture` can express `cfg` exactly."""
  if architecture not in ARCHITECTURES:
    raise ValueError(f"architecture={architecture!r} is not supported; supported: "
                     f"{', '.join(ARCHITECTURES)}")
  want = (architecture == "Qwen3ForCausalLM", architecture == "Qwen2ForCausalLM")
  if (cfg.qk_norm, cfg.qkv_bias) != want:
    raise ValueError(
        f"architecture={architecture!r} needs qk_norm={want[0]}, qkv_bias={want[1]}; the model "
        f"has qk_norm={cfg.qk_norm}, qkv_bias={cfg.qkv_bias} (use {default_architecture(cfg)})")
  if architecture == "LlamaForCausalLM" and cfg.d_model % cfg.n_heads:
    raise ValueError(f"LlamaForCausalLM needs n_heads={cfg.n_heads} to divide "
                     f"d_model={cfg.d_model}")


def to_hf_config(cfg: ModelConfig, architecture: str | None = None, *,
                 dtype: str | None = None) -> dict:
  """The config.json dict for `cfg` (readable by transformers 4.x and 5.x)."""
  arch = architecture or default_architecture(cfg)
  check_architecture(cfg, arch)
  dtype = dtype or cfg.param_dtype
  rope = {"rope_type": "default"}
  if cfg.rope_scaling is not None and cfg.rope_scaling.type == "linear":
    rope = {"rope_type": "linear", "factor": cfg.rope_scaling.factor}
  elif cfg.rope_scaling is not None:
    s = cfg.rope_scaling
    rope = {"rope_type": "llama3", "factor": s.factor, "low_freq_factor": s.low_freq_factor,
            "high_freq_factor": s.high_freq_factor,
            "original_max_position_embeddings": s.original_max_position_embeddings}
  hf = {
      "architectures": [arch], "model_type": _MODEL_TYPE[arch],
      "vocab_size": cfg.vocab_size, "hidden_size": cfg.d_model,
      "intermediate_size": cfg.ffn_dim, "num_hidden_layers": cfg.n_layers,
      "num_attention_heads": cfg.n_heads, "num_key_value_heads": cfg.n_kv_heads,
      "head_dim": cfg.dh, "hidden_act": "silu", "max_position_embeddings": cfg.max_seq_len,
      "rms_norm_eps": cfg.norm_eps, "rope_theta": cfg.rope_theta,
      "rope_scaling": None if rope["rope_type"] == "default" else rope,
      "rope_parameters": {**rope, "rope_theta": cfg.rope_theta},
      "tie_word_embeddings": cfg.tie_embeddings, "dtype": dtype, "torch_dtype": dtype,
      "bos_token_id": None, "eos_token_id": None, "pad_token_id": None,
      "initializer_range": 0.02, "attention_dropout": 0.0, "use_cache": True,
  }
  if arch == "MistralForCausalLM":
    hf["sliding_window"] = None
  if arch in ("Qwen2ForCausalLM", "Qwen3ForCausalLM"):
    hf.update(use_sliding_window=False, sliding_window=None, max_window_layers=cfg.n_layers)
  if arch != "Qwen2ForCausalLM":
    hf["attention_bias"] = False
  if arch == "LlamaForCausalLM":
    hf["mlp_bias"] = False
  return hf

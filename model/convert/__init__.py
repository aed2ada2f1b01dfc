"""Hugging Face checkpoint import / export: the only sparq code that knows foreign names.

Supported: LlamaForCausalLM (Llama 2 / 3 / 3.1 / 3.2, TinyLlama, SmolLM),
MistralForCausalLM, Qwen2ForCausalLM (Qwen2 / 2.5) and Qwen3ForCausalLM, with
safetensors weights (single file or sharded) in f32 / bf16 / f16. Pickle
weights are refused, never unpickled.

  cfg, params = model.convert.load_hf("path/to/hf_dir", param_dtype="float32")
  model.convert.export_hf(cfg, params, "out_dir", dtype="bfloat16")
"""

import json
import os

from model.convert.hf_config import (
    ARCHITECTURES,
    ROPE_TYPES,
    architecture_of,
    check_architecture,
    default_architecture,
    from_hf_config,
    to_hf_config,
)
from model.convert.hf_params import (
    DEFAULT_MAX_SHARD_BYTES,
    export_hf,
    load_hf,
    name_map,
    read_config,
)


def is_hf_dir(path: str) -> bool:
  """True when `path` is a Hugging Face model dir: its config.json names a model type.

  sparq training workdirs also hold a config.json (the run's ml_collections config),
  which has neither "model_type" nor "architectures".
  """
  file = os.path.join(path, "config.json")
  if not os.path.isfile(file):
    return False
  try:
    with open(file) as f:
      cfg = json.load(f)
  except (OSError, ValueError):
    return False
  return isinstance(cfg, dict) and ("model_type" in cfg or "architectures" in cfg)


__all__ = [
    "ARCHITECTURES", "DEFAULT_MAX_SHARD_BYTES", "ROPE_TYPES", "architecture_of",
    "check_architecture", "default_architecture", "export_hf",
    "from_hf_config", "is_hf_dir", "load_hf", "name_map", "read_config", "to_hf_config",
]

"""sparq model: Llama-family decoder, ops dispatch, attention, tokenizers."""

from model.attention import AttentionMask, attention, merge_partials
from model.config import PRESETS, ModelConfig, RopeScaling, get_preset
from model.tokenizer import ByteTokenizer, Tokenizer, get_tokenizer
from model.transformer import Transformer, apply, count_params, init, logits_fn, param_shapes

__all__ = [
    "AttentionMask", "ByteTokenizer", "ModelConfig", "PRESETS", "RopeScaling", "Tokenizer",
    "Transformer", "apply", "attention", "count_params", "get_preset", "get_tokenizer", "init",
    "logits_fn", "merge_partials", "param_shapes",
]

"""sparq model: the param tree's vocabulary, Llama-family decoder, ops, attention, KV cache."""

from model.attention import (
    AttentionMask,
    BlockLayout,
    attention,
    cache_attention,
    cache_layout,
    merge_partials,
)
from model.calibration import Calibration, KernelStats, calibrate, calibrate_sequential
from model.config import PRESETS, ModelConfig, RopeScaling, get_preset
from model.decoder import Decoder
from model.fuse import decode_params, fuse_projections
from model.kv_cache import KVCache, PrefixCache, init_cache
from model.kv_evict import EvictingCache
from model.nm_array import NMArray, compress_nm, is_nmarray
from model.nm_array import decompress as decompress_nm
from model.qarray import QArray
from model.tokenizer import ByteTokenizer, Tokenizer, get_tokenizer
from model.transformer import (
    Transformer,
    apply,
    hidden_states,
    init,
    param_shapes,
    unembed,
)
from model.tree import flatten, is_weight_leaf, match_rules, path_str, tree_nbytes, tree_size

count_params = tree_size  # logical parameters: an int4 tree counts as its float original

__all__ = [
    "Calibration", "KernelStats", "calibrate", "calibrate_sequential",
    "AttentionMask", "BlockLayout", "ByteTokenizer", "Decoder", "EvictingCache", "KVCache",
    "ModelConfig", "NMArray", "PRESETS",
    "PrefixCache", "QArray", "RopeScaling", "Tokenizer", "Transformer", "apply", "attention",
    "cache_attention", "cache_layout", "compress_nm", "count_params", "decompress_nm", "flatten",
    "decode_params", "fuse_projections", "get_preset", "get_tokenizer", "hidden_states", "init",
    "init_cache", "is_nmarray",
    "is_weight_leaf", "match_rules", "merge_partials", "param_shapes", "path_str", "tree_nbytes",
    "tree_size", "unembed",
]

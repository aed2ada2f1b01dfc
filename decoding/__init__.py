"""Decoding: KV cache, samplers, jitted generation, search."""

from decoding.beam import BeamOutput, beam_search
from decoding.cost import Cost
from decoding.early_exit import init_exit_head, self_speculative_decode, with_exit_head
from decoding.generate import Finish, GenerateOutput, generate, prefill
from decoding.kv_cache import KVCache, gather_rows, init_cache
from decoding.sampling import Sampler, process_logits, sample
from decoding.shared_prefix import prefill_prefix, sample_shared_prefix
from decoding.speculative import (
    SpeculativeOutput,
    SpeculativeStats,
    speculative_decode,
    speculative_generate,
)

__all__ = ["KVCache", "gather_rows", "init_cache"]
__all__ += ["BeamOutput", "Cost", "Finish", "GenerateOutput", "Sampler", "beam_search",
            "generate", "prefill", "process_logits", "sample"]
__all__ += ["SpeculativeOutput", "SpeculativeStats", "init_exit_head", "prefill_prefix",
            "sample_shared_prefix", "self_speculative_decode", "speculative_decode",
            "speculative_generate", "with_exit_head"]

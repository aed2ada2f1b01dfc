"""Decoding: one request path, samplers, jitted generation, beam, speculative, shared prefix,
verifiable tasks (`decoding.tasks`) and test-time search (`decoding.search`)."""

from decoding import search, tasks
from decoding.beam import BeamOutput, beam_search
from decoding.cost import Cost, forward_cost
from decoding.early_exit import ExitDecoder, init_exit_head, self_speculative_decode, with_exit_head
from decoding.generate import Finish, GenerateOutput, generate, prefill
from decoding.request import Request, prepare
from decoding.sampling import Sampler, process_logits, sample
from decoding.shared_prefix import prefill_prefix, sample_shared_prefix
from decoding.speculative import (
    SpeculativeOutput,
    SpeculativeStats,
    speculative_decode,
    speculative_generate,
)

__all__ = ["BeamOutput", "Cost", "ExitDecoder", "Finish", "GenerateOutput", "Request",
           "Sampler", "SpeculativeOutput", "SpeculativeStats", "beam_search", "forward_cost",
           "generate", "init_exit_head", "search", "tasks", "prefill", "prefill_prefix", "prepare",
           "process_logits", "sample", "sample_shared_prefix", "self_speculative_decode",
           "speculative_decode", "speculative_generate", "with_exit_head"]

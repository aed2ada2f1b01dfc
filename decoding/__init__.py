"""Decoding: KV cache, samplers, jitted generation, search."""

from decoding.kv_cache import KVCache, gather_rows, init_cache

__all__ = ["KVCache", "gather_rows", "init_cache"]

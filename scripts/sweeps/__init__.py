"""Sweep mains: a config grid -> resumable results.jsonl -> table + PNG."""

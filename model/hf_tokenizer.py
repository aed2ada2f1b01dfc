"""Hugging Face `tokenizer.json` behind sparq's `Tokenizer` interface (needs `tokenizers`)."""

from __future__ import annotations

import json
import os

import tokenizers

# Used only when no tokenizer_config.json / config.json names the special tokens.
_FALLBACK = {
    "bos": ("<s>", "<|begin_of_text|>", "<bos>", "<|startoftext|>"),
    "eos": ("</s>", "<|end_of_text|>", "<|endoftext|>", "<eos>"),
    "pad": ("<pad>", "<|pad|>", "[PAD]", "<|finetune_right_pad_id|>"),
}


def _read_json(path: str) -> dict:
  if not os.path.isfile(path):
    return {}
  with open(path) as f:
    return json.load(f)


def _first_id(value) -> int | None:
  if isinstance(value, list):
    return int(value[0]) if value else None
  return None if value is None else int(value)


class HFTokenizer:
  """A `tokenizers.Tokenizer` with sparq's encode / decode and special-token ids.

  Special tokens are never added implicitly: `encode` returns the text's tokens,
  plus BOS only when `add_bos=True`. Without a pad token, `pad_id` is the EOS id
  (or 0), as is usual for Llama-3-style vocabularies.
  """

  def __init__(self, tokenizer: tokenizers.Tokenizer, *, bos_id: int | None = None,
               eos_id: int | None = None, pad_id: int | None = None,
               stop_ids: tuple[int, ...] = ()):
    self.tokenizer = tokenizer
    self.vocab_size = tokenizer.get_vocab_size(with_added_tokens=True)
    for name, v in (("bos_id", bos_id), ("eos_id", eos_id), ("pad_id", pad_id)):
      if v is not None and not 0 <= v < self.vocab_size:
        raise ValueError(f"{name}={v} is outside the vocabulary [0, {self.vocab_size})")
    self.bos_id = bos_id
    self.eos_id = eos_id
    self.pad_id = pad_id if pad_id is not None else (eos_id if eos_id is not None else 0)
    # Every id that ends generation (Llama-3 instruct models have several).
    self.stop_ids = tuple(dict.fromkeys([*(() if eos_id is None else (eos_id,)), *stop_ids]))

  @classmethod
  def from_file(cls, path: str) -> HFTokenizer:
    """Loads `tokenizer.json` (or a dir holding it) and the special tokens beside it."""
    file = os.path.join(path, "tokenizer.json") if os.path.isdir(path) else path
    if not os.path.isfile(file):
      raise FileNotFoundError(f"tokenizer file {file!r} does not exist")
    tok = tokenizers.Tokenizer.from_file(file)
    folder = os.path.dirname(os.path.abspath(file))
    tok_cfg = _read_json(os.path.join(folder, "tokenizer_config.json"))
    model_cfg = {**_read_json(os.path.join(folder, "config.json")),
                 **_read_json(os.path.join(folder, "generation_config.json"))}

    def resolve(kind: str) -> int | None:
      if f"{kind}_token" in tok_cfg:  # explicit, even when null (Qwen2 has no BOS)
        token = tok_cfg[f"{kind}_token"]
        token = token.get("content") if isinstance(token, dict) else token
        return tok.token_to_id(token) if isinstance(token, str) else None
      if f"{kind}_token_id" in model_cfg:
        return _first_id(model_cfg[f"{kind}_token_id"])
      return next((tok.token_to_id(t) for t in _FALLBACK[kind]
                   if tok.token_to_id(t) is not None), None)

    stops = model_cfg.get("eos_token_id")
    stops = tuple(int(i) for i in (stops if isinstance(stops, list) else [stops])
                  if i is not None)
    return cls(tok, bos_id=resolve("bos"), eos_id=resolve("eos"), pad_id=resolve("pad"),
               stop_ids=stops)

  def encode(self, text: str, *, add_bos: bool = False) -> list[int]:
    ids = self.tokenizer.encode(text, add_special_tokens=False).ids
    if add_bos:
      if self.bos_id is None:
        raise ValueError("add_bos=True, but this tokenizer has no BOS token")
      return [self.bos_id, *ids]
    return list(ids)

  def decode(self, ids) -> str:
    """Text of `ids`, skipping special tokens and ids past the vocabulary (padded heads)."""
    ids = [int(i) for i in ids]
    return self.tokenizer.decode([i for i in ids if 0 <= i < self.vocab_size],
                                 skip_special_tokens=True)

"""Tokenizers behind one small interface (byte-level by default)."""

from __future__ import annotations

import os
from typing import Protocol, runtime_checkable


@runtime_checkable
class Tokenizer(Protocol):
  vocab_size: int
  bos_id: int | None
  eos_id: int | None
  pad_id: int

  def encode(self, text: str, *, add_bos: bool = False) -> list[int]: ...

  def decode(self, ids) -> str: ...


class ByteTokenizer:
  """UTF-8 bytes are ids 0..255; specials follow: BOS 256, EOS 257, PAD 258."""

  vocab_size = 259
  bos_id = 256
  eos_id = 257
  pad_id = 258

  def encode(self, text: str, *, add_bos: bool = False) -> list[int]:
    ids = list(text.encode("utf-8"))
    return [self.bos_id, *ids] if add_bos else ids

  def decode(self, ids) -> str:
    data = bytes(int(i) for i in ids if 0 <= int(i) < 256)
    return data.decode("utf-8", errors="replace")


def get_tokenizer(spec: str = "byte") -> Tokenizer:
  """`byte` or a path to a Hugging Face `tokenizer.json` (needs the `hf` extra).

  A file the `tokenizers` library cannot read (junk JSON, not a tokenizer) is a ValueError
  naming it: the library raises a bare `Exception` with no file name.
  """
  if spec == "byte":
    return ByteTokenizer()
  from model import hf_tokenizer  # optional dependency

  try:
    return hf_tokenizer.HFTokenizer.from_file(spec)
  except (OSError, ValueError):
    raise
  except Exception as e:  # noqa: BLE001 (tokenizers' Rust errors are untyped)
    file = os.path.join(spec, "tokenizer.json") if os.path.isdir(spec) else spec
    lines = str(e).strip().strip("'\"").splitlines()
    raise ValueError(f"{file} is not a valid tokenizer.json ({lines[0] if lines else e!r})"
                     ) from None

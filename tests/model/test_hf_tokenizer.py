"""HFTokenizer: tokenizer.json behind the sparq Tokenizer interface."""

import json

import pytest

tokenizers = pytest.importorskip("tokenizers")

from model import get_tokenizer  # noqa: E402
from model.hf_tokenizer import HFTokenizer  # noqa: E402
from model.tokenizer import Tokenizer  # noqa: E402

pytestmark = pytest.mark.hf
TEXTS = ["the quick brown fox jumps over the lazy dog", "def f(x):\n  return x * 2\n",
         "naïve café — 東京 🚀", "sparq prunes and quantizes transformers"] * 20


@pytest.fixture(scope="module")
def tok_file(tmp_path_factory):
  from tokenizers import decoders, models, pre_tokenizers, trainers

  tok = tokenizers.Tokenizer(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<pad>", "<s>", "</s>"],
                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
  tok.train_from_iterator(TEXTS, trainer)
  path = tmp_path_factory.mktemp("tok") / "tokenizer.json"
  tok.save(str(path))
  return path


@pytest.mark.parametrize("text", ["hello world", "naïve café — 東京 🚀\n\tend", "", "  x  "])
def test_round_trip_and_protocol(tok_file, text):
  tok = get_tokenizer(str(tok_file))
  assert isinstance(tok, HFTokenizer) and isinstance(tok, Tokenizer)
  ids = tok.encode(text)
  assert all(0 <= i < tok.vocab_size for i in ids)
  assert tok.decode(ids) == text
  assert tok.encode(text, add_bos=True) == [tok.bos_id, *ids]
  assert tok.decode([tok.bos_id, *ids, tok.eos_id, tok.vocab_size + 5]) == text


def test_encoding_matches_the_tokenizers_library(tok_file):
  tok = HFTokenizer.from_file(str(tok_file.parent))  # a dir works too
  raw = tokenizers.Tokenizer.from_file(str(tok_file))
  text = "the lazy fox quantizes"
  assert tok.encode(text) == raw.encode(text, add_special_tokens=False).ids
  assert len(tok.encode(text)) < len(text.encode())  # merges were learned


def test_special_tokens_fallback_by_name(tok_file):
  tok = HFTokenizer.from_file(str(tok_file))
  assert (tok.pad_id, tok.bos_id, tok.eos_id) == (0, 1, 2)
  assert tok.stop_ids == (2,)


def test_special_tokens_from_side_files(tok_file, tmp_path):
  (tmp_path / "tokenizer.json").write_text(tok_file.read_text())
  (tmp_path / "tokenizer_config.json").write_text(json.dumps(
      {"bos_token": None, "eos_token": {"content": "</s>"}, "pad_token": None}))
  (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 1]}))
  tok = HFTokenizer.from_file(str(tmp_path / "tokenizer.json"))
  assert tok.bos_id is None and tok.eos_id == 2
  assert tok.pad_id == 2  # no pad token: pad with EOS
  assert tok.stop_ids == (2, 1)
  with pytest.raises(ValueError, match="no BOS token"):
    tok.encode("x", add_bos=True)


def test_bad_input(tok_file, tmp_path):
  with pytest.raises(FileNotFoundError, match="does not exist"):
    HFTokenizer.from_file(str(tmp_path / "missing.json"))
  raw = tokenizers.Tokenizer.from_file(str(tok_file))
  with pytest.raises(ValueError, match=r"eos_id=100000 is outside the vocabulary \[0, \d+\)"):
    HFTokenizer(raw, eos_id=100_000)

"""HF dir -> orbax checkpoint -> HF dir: exact, with tokenizer and special ids preserved."""

import json
import os

import jax
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")

from model import get_tokenizer  # noqa: E402
from scripts import checkpoint_lib, convert_lib  # noqa: E402

pytestmark = pytest.mark.hf
transformers.logging.set_verbosity_error()


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
  cfg = transformers.Qwen3Config(
      vocab_size=37, hidden_size=32, intermediate_size=48, num_hidden_layers=1,
      num_attention_heads=4, num_key_value_heads=2, head_dim=16, tie_word_embeddings=True,
      max_position_embeddings=64, bos_token_id=None, eos_token_id=3, pad_token_id=0)
  torch.manual_seed(0)
  m = transformers.Qwen3ForCausalLM(cfg).to(torch.bfloat16)
  path = tmp_path_factory.mktemp("hf")
  m.save_pretrained(str(path), safe_serialization=True)
  vocab = {w: i for i, w in enumerate(["<pad>", "<unk>", "<s>", "</s>", *"abcdefgh"])}
  tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="<unk>"))
  tok.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
  tok.save(str(path / "tokenizer.json"))
  return path


def test_round_trip_through_a_checkpoint(hf_dir, tmp_path):
  cfg, folder = convert_lib.hf_to_checkpoint(str(hf_dir), str(tmp_path / "w"))
  assert cfg.param_dtype == "bfloat16" and cfg.qk_norm and os.path.isdir(folder)
  params, cfg2, step = checkpoint_lib.load_params(str(tmp_path / "w"))
  assert cfg2 == cfg and step == 0
  assert convert_lib.tokenizer_path(str(tmp_path / "w")).endswith("hf/tokenizer.json")
  assert get_tokenizer(convert_lib.tokenizer_path(str(tmp_path / "w"))).encode("a b") == [4, 5]
  arch = convert_lib.checkpoint_to_hf(str(tmp_path / "w"), str(tmp_path / "out"))
  assert arch == "Qwen3ForCausalLM"
  with open(tmp_path / "out" / "config.json") as f:
    written = json.load(f)
  assert (written["eos_token_id"], written["pad_token_id"]) == (3, 0)
  assert os.path.isfile(tmp_path / "out" / "tokenizer.json")
  a = transformers.AutoModelForCausalLM.from_pretrained(str(hf_dir)).float()
  b = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "out")).float()
  toks = torch.tensor([[1, 5, 9, 2, 7]])
  with torch.no_grad():
    np.testing.assert_array_equal(a(toks).logits.numpy(), b(toks).logits.numpy())
  cfg3, params3 = convert_lib.load_model(str(tmp_path / "out"))
  assert cfg3 == cfg
  jax.tree.map(np.testing.assert_array_equal, params3, params)


def test_refuses_a_used_workdir(hf_dir, tmp_path):
  os.makedirs(tmp_path / checkpoint_lib.CKPT_SUBDIR)
  with pytest.raises(ValueError, match="already holds checkpoints"):
    convert_lib.hf_to_checkpoint(str(hf_dir), str(tmp_path))
  assert os.listdir(tmp_path) == [checkpoint_lib.CKPT_SUBDIR]

"""ModelConfig validation and presets."""

import pytest

import model
from model.rope import inv_frequencies


def test_unknown_preset_lists_valid():
  with pytest.raises(ValueError, match="unknown model preset 'nope'.*test"):
    model.get_preset("nope")


def test_heads_must_divide():
  with pytest.raises(ValueError, match="n_heads=3 must divide d_model=64"):
    model.ModelConfig(n_heads=3, n_kv_heads=1)
  with pytest.raises(ValueError, match="n_kv_heads=3 must divide n_heads=4"):
    model.ModelConfig(n_kv_heads=3)


def test_sequence_longer_than_max():
  import jax.numpy as jnp

  cfg = model.get_preset("test", max_seq_len=8)
  with pytest.raises(ValueError, match="exceeds max_seq_len=8"):
    model.apply(cfg, {}, jnp.zeros((1, 9), jnp.int32))


def test_config_round_trip_and_hashable():
  cfg = model.get_preset("llama-3.2-1b")
  assert model.ModelConfig.from_dict(cfg.to_dict()) == cfg
  assert hash(cfg) == hash(model.ModelConfig.from_dict(cfg.to_dict()))


def test_llama3_rope_scaling_bands():
  """Llama-3 scaling: high frequencies kept, low ones divided by factor."""
  sc = model.RopeScaling("llama3", 8.0, 1.0, 4.0, 8192)
  base = inv_frequencies(64, 500_000.0, None)
  scaled = inv_frequencies(64, 500_000.0, sc)
  assert scaled[0] == pytest.approx(base[0])  # shortest wavelength: unchanged
  assert scaled[-1] == pytest.approx(base[-1] / 8.0)  # longest: divided by factor
  assert (scaled <= base + 1e-12).all()


def test_bad_rope_scaling_type():
  with pytest.raises(ValueError, match="rope_scaling.type='yarn'"):
    model.RopeScaling("yarn")

"""Shared tiny-model params for the sparsity tests (initialised once per session)."""

import jax
import pytest

import model

CFG = model.get_preset("test")


@pytest.fixture(scope="session")
def params():
  return model.init(CFG, jax.random.key(0))

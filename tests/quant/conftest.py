"""Shared fixtures: one "test"-preset model, initialised once per session."""

import jax
import pytest

import model


@pytest.fixture(scope="session")
def cfg():
  return model.get_preset("test")


@pytest.fixture(scope="session")
def params(cfg):
  return model.init(cfg, jax.random.key(0))

"""Shared tiny models for the decoding tests (module-level so jitted functions are reused)."""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import model

CFG = model.get_preset("test")
STEP_CALLS = [0]  # Python-side trace counter: bumps each time step_fn is traced


@dataclasses.dataclass(frozen=True)
class CountingDecoder(model.Decoder):
  """model.Decoder that counts its traces."""

  def __call__(self, params, tokens_BT, cache):
    STEP_CALLS[0] += 1
    return super().__call__(params, tokens_BT, cache)


counting_step_fn = CountingDecoder(CFG)


# Ragged batch used by most generate tests: 4 rows, lengths 1..9 (prefill bucket 16).
PROMPTS = [[5, 17, 33, 2, 90, 11, 7], [100], [3, 1, 4, 1, 5, 9, 2, 6, 5], [42, 42, 8]]


def random_params(cfg, seed=0, scale=1.0):
  """Random weights drawn with NumPy on `model.param_shapes` (skips compiling model.init)."""
  rng = np.random.RandomState(seed)

  def draw(path, sds):
    if path[-1].key == "scale":
      return jnp.asarray(1.0 + 0.1 * rng.randn(*sds.shape), sds.dtype)
    return jnp.asarray(scale * rng.randn(*sds.shape) / np.sqrt(sds.shape[-1]), sds.dtype)

  return jax.tree_util.tree_map_with_path(draw, model.param_shapes(cfg))


@pytest.fixture(scope="session")
def params():
  return random_params(CFG)


@functools.cache
def _uncached_fn(cfg):
  return jax.jit(lambda p, t: jax.nn.log_softmax(model.apply(cfg, p, t)[0], axis=-1))


def uncached_logprobs(cfg, params, seqs, width=32):
  """log p over the vocab at every position of right-padded `seqs`, no cache: [B, width, V]."""
  buf = np.zeros((len(seqs), width), np.int32)
  for i, s in enumerate(seqs):
    buf[i, : len(s)] = s
  return np.asarray(_uncached_fn(cfg)(params, jnp.asarray(buf)))


def argmax_loop(cfg, params, prompts, n_new, width=32):
  """Greedy continuation by repeated uncached forwards over a fixed-width buffer."""
  seqs = [list(p) for p in prompts]
  for _ in range(n_new):
    lp = uncached_logprobs(cfg, params, seqs, width)
    for i, s in enumerate(seqs):
      s.append(int(np.argmax(lp[i, len(s) - 1])))
  return [s[len(p):] for s, p in zip(seqs, prompts)]

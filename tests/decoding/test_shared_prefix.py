"""Shared-prefix (Hydragen) attention and sampling are exact against naive batching."""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import model
from decoding import Sampler
from decoding.shared_prefix import prefill_prefix, sample_shared_prefix
from model import KVCache, PrefixCache, init_cache
from tests.decoding.conftest import CFG, argmax_loop, random_params

PREFIX = [5, 17, 33, 2, 90, 11, 7, 64, 3, 200, 41]
N, N_NEW = 6, 10


@pytest.fixture(scope="module")
def params():
  return random_params(CFG, seed=2)


def _tokens(b, t, seed):
  return jax.random.randint(jax.random.key(seed), (b, t), 0, CFG.vocab_size)


_apply = jax.jit(functools.partial(model.apply, CFG))


def test_prefix_logits_equal_full_sequence(params):
  """Two prefix groups (Bp = 2, B = 4): cached suffix steps == the uncached full sequences."""
  pre = _tokens(2, 9, seed=1)
  lens = jnp.array([9, 6])  # ragged prefixes: row 1's prefix is its first 6 tokens
  _, prefix = _apply(params, pre, cache=init_cache(CFG, 2, 16))
  prefix = prefix.with_lengths(lens)
  suf = _tokens(4, 5, seed=2)
  cache = PrefixCache(prefix=prefix, suffix=init_cache(CFG, 4, 8))
  a, cache = _apply(params, suf[:, :3], cache=cache)
  b, cache = _apply(params, suf[:, 3:], cache=cache)
  got = jnp.concatenate([a, b], axis=1)
  assert cache.lengths.tolist() == [5, 5, 5, 5] and cache.read_len == 16 + 8
  # Oracle: each row's full sequence, right-padded to 14 (causality ignores the padding).
  full = np.zeros((4, 14), np.int32)
  for row in range(4):
    n = int(lens[row // 2])
    full[row, : n + 5] = np.concatenate([pre[row // 2, :n], suf[row]])
  want = _apply(params, jnp.asarray(full))[0]
  for row in range(4):
    n = int(lens[row // 2])
    np.testing.assert_allclose(got[row], want[row, n : n + 5], atol=2e-5)
  # One 5-token call with explicit absolute positions gives the same logits.
  pos = lens.repeat(2)[:, None] + jnp.arange(5)[None]
  fresh = PrefixCache(prefix=prefix, suffix=init_cache(CFG, 4, 8))
  np.testing.assert_allclose(_apply(params, suf, positions=pos, cache=fresh)[0], got, atol=2e-5)


@dataclasses.dataclass(frozen=True)
class NaiveDecoder(model.Decoder):
  """Oracle: the prefix KV copied into every row, then a plain cached forward (no LSE merge)."""

  plen: int = 0

  def __call__(self, params, tokens_BT, cache: PrefixCache):
    b, plen, prefix, suffix = tokens_BT.shape[0], self.plen, cache.prefix, cache.suffix
    # Slots are axis 3 of k [B, K, Dh, S] and axis 2 of v [B, K, S, Dh].
    def cat(p, s, axis):
      head = jnp.repeat(jax.lax.slice_in_dim(p, 0, plen, axis=axis), b, axis=0)
      return jnp.concatenate([head, s], axis=axis)

    full = KVCache(k=tuple(cat(p, s, 3) for p, s in zip(prefix.k, suffix.k, strict=True)),
                   v=tuple(cat(p, s, 2) for p, s in zip(prefix.v, suffix.v, strict=True)),
                   lengths=suffix.lengths + plen)
    logits, full = model.apply(CFG, params, tokens_BT, cache=full)
    cut = lambda x, axis: jax.lax.slice_in_dim(x, plen, x.shape[axis], axis=axis)
    suffix = KVCache(k=tuple(cut(x, 3) for x in full.k), v=tuple(cut(x, 2) for x in full.v),
                     lengths=full.lengths - plen)
    return logits, PrefixCache(prefix=prefix, suffix=suffix)


_NAIVE = NaiveDecoder(CFG, len(PREFIX) - 1)


def test_sampling_equals_naive_batching(params):
  """Same keys -> same tokens; greedy rows equal the uncached argmax continuation."""
  sampler = Sampler.create(N, temperature=[0.0, 0.0, 1.0, 1.0, 0.7, 1.3], top_k=[0, 0, 0, 20, 0, 0])
  kw = dict(max_new_tokens=N_NEW, sampler=sampler, key=jax.random.key(4), eos_id=257)
  shared = sample_shared_prefix(CFG, params, PREFIX, N, **kw)
  naive = sample_shared_prefix(CFG, params, PREFIX, N, step_fn=_NAIVE, **kw)
  np.testing.assert_array_equal(shared.tokens, naive.tokens)
  np.testing.assert_array_equal(shared.lengths, naive.lengths)
  np.testing.assert_allclose(shared.logprobs, naive.logprobs, atol=1e-4)
  assert len({tuple(r) for r in np.asarray(shared.tokens[2:]).tolist()}) > 1  # rows differ
  greedy = argmax_loop(CFG, params, [PREFIX], N_NEW)[0]
  assert shared.tokens[0].tolist() == shared.tokens[1].tolist() == greedy
  # Cost: one prefix prefill plus generate's steps; the prefix is read once per step.
  steps = int(shared.lengths.max())
  assert shared.cost.forward_passes == 1 + steps
  assert shared.cost.tokens == naive.cost.tokens == int(shared.lengths.sum())
  prefix, _, _ = prefill_prefix(CFG, params, PREFIX)
  copies = sample_shared_prefix(CFG, params, PREFIX, N, share_prefix=False, **kw)
  np.testing.assert_array_equal(copies.tokens, shared.tokens)
  assert copies.cost.bytes_moved - shared.cost.bytes_moved == pytest.approx(
      steps * (N - 1) * prefix.nbytes)


def test_bad_input(params):
  with pytest.raises(ValueError, match="prefix_tokens is empty"):
    sample_shared_prefix(CFG, params, [], 4, max_new_tokens=4)
  with pytest.raises(ValueError, match="n_samples=0"):
    sample_shared_prefix(CFG, params, PREFIX, 0, max_new_tokens=4)
  with pytest.raises(ValueError, match="max_seq_len"):
    sample_shared_prefix(CFG, params, PREFIX, 2, max_new_tokens=CFG.max_seq_len)
  with pytest.raises(ValueError, match="repetition_penalty"):
    sample_shared_prefix(CFG, params, PREFIX, 2, max_new_tokens=4,
                         sampler=Sampler.create(2, repetition_penalty=1.2))
  prefix, _, _ = prefill_prefix(CFG, params, PREFIX)
  bad = PrefixCache(prefix=KVCache(prefix.k, prefix.v, jnp.zeros((3,), jnp.int32)),
                    suffix=init_cache(CFG, 4, 8))
  with pytest.raises(ValueError, match="prefix cache batch 3 must divide"):
    model.apply(CFG, params, _tokens(4, 1, 0), cache=bad)
  with pytest.raises(ValueError, match="cannot be reordered"):
    bad.take(jnp.arange(4))

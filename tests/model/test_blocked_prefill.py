"""Blocked causal attention for long forwards (prefill, long-context eval).

`attention.blocked_causal` against the dense masked attention, and whole-model forwards
with the blocked path on (small thresholds patched in, plus one run at the real ones)
against the same forwards with it off: uncached, cached prefills (fresh, ragged, chunked
after a non-empty cache, both cache layouts), gradients, and the cache contents.
"""

import importlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import model
from model import init_cache
from model.attention import AttentionMask

attention = importlib.import_module("model.attention")  # the module (`model.attention` is the door)

CFG = model.ModelConfig(max_seq_len=640)


@pytest.fixture(scope="module")
def params():
  return model.init(CFG, jax.random.key(0))


def _apply(params, tokens, **kw):
  """model.apply, jitted afresh (each call traces under the thresholds patched in now)."""
  return jax.jit(lambda p, t, kw: model.apply(CFG, p, t, **kw))(params, tokens, kw)


def _tokens(b, t, seed=1):
  return jax.random.randint(jax.random.key(seed), (b, t), 0, CFG.vocab_size)


@pytest.fixture
def small_blocks(monkeypatch):
  monkeypatch.setattr(attention, "BLOCKED_MIN_TOKENS", 16)
  monkeypatch.setattr(attention, "BLOCKED_BLOCK", 8)


@pytest.fixture
def blocked_off(monkeypatch):
  def off():
    monkeypatch.setattr(attention, "BLOCKED_MIN_TOKENS", 1 << 30)
  return off


def _qkv(b, t, h, kh, dh, seed=0):
  ks = jax.random.split(jax.random.key(seed), 3)
  return (jax.random.normal(ks[0], (b, t, h, dh)), jax.random.normal(ks[1], (b, t, kh, dh)),
          jax.random.normal(ks[2], (b, t, kh, dh)))


@pytest.mark.parametrize("kind", ["causal", "window_sinks", "segments", "kv_valid", "offset"])
@pytest.mark.parametrize("h, kh", [(4, 2), (4, 1)])
def test_blocked_causal_equals_dense(kind, h, kh):
  b, t = 2, 32
  q, k, v = _qkv(b, t, h, kh, 8)
  pos = jnp.broadcast_to(jnp.arange(t)[None], (b, t))
  mask = AttentionMask(q_positions=pos, kv_positions=pos)
  if kind == "window_sinks":
    mask = mask.replace(window=5, sinks=2)
  elif kind == "segments":
    seg = jnp.array([[0] * 10 + [1] * 22, [0] * 3 + [1] * 17 + [2] * 12])
    mask = mask.replace(q_segment_ids=seg)
  elif kind == "kv_valid":
    mask = mask.replace(kv_valid=jnp.arange(t)[None] < jnp.array([[20], [32]]))
  elif kind == "offset":  # a second prefill chunk: positions start past 0
    mask = mask.replace(q_positions=pos + 7, kv_positions=pos + 7)
  want, want_lse = jax.jit(lambda q, k, v, m: attention.attention(
      q, k, v, mask=m, impl="reference", return_lse=True))(q, k, v, mask)
  got, lse = jax.jit(lambda q, k, v, m: attention.blocked_causal(
      q, k, v, m, block=8, return_lse=True))(q, k, v, mask)
  visible = want_lse > -1e29  # rows that see no key (kv_valid) differ only in convention
  np.testing.assert_allclose(jnp.where(visible[..., None], got, 0),
                             jnp.where(visible[..., None], want, 0), atol=1e-5)
  np.testing.assert_allclose(jnp.where(visible, lse, 0), jnp.where(visible, want_lse, 0),
                             atol=1e-5)


def test_blocked_causal_rejects_untiled_length():
  q, k, v = _qkv(1, 12, 2, 2, 8)
  with pytest.raises(ValueError, match="T=12 is not a multiple of block=8"):
    attention.blocked_causal(q, k, v, AttentionMask(), block=8)


def _apply_both(blocked_off, fn):
  got = fn()
  blocked_off()
  return got, fn()


def test_uncached_forward_and_gradients(params, small_blocks, blocked_off):
  tokens = _tokens(2, 48)

  def run():
    loss = lambda p: model.apply(CFG, p, tokens)[0].mean()
    return _apply(params, tokens)[0], jax.jit(jax.grad(loss))(params)

  (got, g_got), (want, g_want) = _apply_both(blocked_off, run)
  np.testing.assert_allclose(got, want, atol=1e-5)
  for a, b in zip(jax.tree.leaves(g_got), jax.tree.leaves(g_want), strict=True):
    np.testing.assert_allclose(a, b, atol=1e-6)


def test_uncached_packed_segments(params, small_blocks, blocked_off):
  tokens = _tokens(1, 32, seed=3)
  seg = jnp.array([[0] * 12 + [1] * 20])
  pos = jnp.concatenate([jnp.arange(12), jnp.arange(20)])[None]
  got, want = _apply_both(blocked_off, lambda: _apply(
      params, tokens, positions=pos, segment_ids=seg)[0])
  np.testing.assert_allclose(got, want, atol=1e-5)


def test_explicit_positions_take_the_dense_path(params, small_blocks):
  """Positions the caller passes may not increase, so nothing may be skipped."""
  t = 32
  pos = jnp.arange(t)[::-1][None]  # reversed: every key block after a query block is visible
  ctx = attention.context(1, t, positions=pos)
  assert not ctx.consecutive
  assert attention.context(1, t).consecutive


@pytest.mark.parametrize("layout", ["heads_major", "seq_major"])
@pytest.mark.parametrize("b", [1, 3])
def test_cached_prefill_equals_uncached(params, small_blocks, layout, b):
  """A fresh prefill, then a non-empty cache's second long chunk, then one decode step:
  logits equal the uncached forward and the cache equals the unblocked prefill's."""
  tokens = _tokens(b, 57, seed=b)
  full = _apply(params, tokens)[0]
  step = jax.jit(lambda t, c: model.apply(CFG, params, t, cache=c))
  cache = init_cache(CFG, b, 64, layout=layout)
  outs = []
  for lo, hi in ((0, 24), (24, 56), (56, 57)):
    logits, cache = step(tokens[:, lo:hi], cache)
    outs.append(logits)
  np.testing.assert_allclose(jnp.concatenate(outs, 1), full, atol=1e-5)
  ref = None
  with pytest.MonkeyPatch.context() as mp:
    mp.setattr(attention, "BLOCKED_MIN_TOKENS", 1 << 30)
    ref = _apply(params, tokens, cache=init_cache(CFG, b, 64, layout=layout))[1]
  for got, want in zip(cache.k + cache.v, ref.k + ref.v, strict=True):
    np.testing.assert_allclose(got, want, atol=1e-5)


def test_ragged_rows_after_a_blocked_prefill(params, small_blocks):
  """Right-padded rows (as decoding pads them): each row's next token equals it alone."""
  long_, short = _tokens(1, 32, seed=4), _tokens(1, 20, seed=5)
  batch = jnp.concatenate([long_, jnp.pad(short, ((0, 0), (0, 12)))], 0)
  _, cache = _apply(params, batch, cache=init_cache(CFG, 2, 40))
  cache = cache.replace(lengths=jnp.array([32, 20]))
  nxt = _tokens(2, 1, seed=6)
  logits, _ = _apply(params, nxt, cache=cache)
  want_short = _apply(params, jnp.concatenate([short, nxt[1:]], 1))[0][0, -1]
  want_long = _apply(params, jnp.concatenate([long_, nxt[:1]], 1))[0][0, -1]
  np.testing.assert_allclose(logits[1, -1], want_short, atol=1e-5)
  np.testing.assert_allclose(logits[0, -1], want_long, atol=1e-5)


def test_default_thresholds_prefill(params, blocked_off):
  """The shipped BLOCKED_MIN_TOKENS / BLOCKED_BLOCK on a 512-token prefill."""
  t = attention.BLOCKED_MIN_TOKENS
  assert t % attention.BLOCKED_BLOCK == 0
  tokens = _tokens(1, t + 1, seed=9)
  step = lambda: _apply(params, tokens[:, t:], cache=_apply(
      params, tokens[:, :t], cache=init_cache(CFG, 1, t + 8))[1])[0]
  got, want = _apply_both(blocked_off, step)
  np.testing.assert_allclose(got, want, atol=1e-5)

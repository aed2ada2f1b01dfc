"""model.BlockLayout and the XLA block-sparse attention path: equal to dense attention with
`layout.to_dense` ANDed into the element mask (forward, log-sum-exp and gradients)."""

import dataclasses
import importlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import model
from model import AttentionMask, BlockLayout
from model import attention as attention_fn
from model.attention import _attend, _mask5
from model.kv_cache import write_layer

RNG = np.random.default_rng(0)


def _qkv(b, t, s, h, kh, dh=8, dtype=jnp.float32):
  f = lambda *shape: jnp.asarray(RNG.normal(size=shape), dtype)
  return f(b, t, h, dh), f(b, s, kh, dh), f(b, s, kh, dh)


def _layout(b, hl, t, s, bq, bk, *, density=0.5, empty_first=True, full=False, full_row=False):
  qb, sb = -(-t // bq), -(-s // bk)
  bm = RNG.random((b, hl, qb, sb)) < density
  if empty_first:
    bm[..., 0, :] = False  # a q block with no active kv block
  if full_row:
    bm[..., -1, :] = True  # one q block sees every kv block
  fm = (RNG.random(bm.shape) < 0.5) & bm if full else None
  return BlockLayout.from_block_mask(bm, block_q=bq, block_kv=bk, full_mask=fm)


def _visible(mask, b, t, s, h, kh):
  """bool[B, T, H]: queries with at least one visible key."""
  m5 = np.asarray(jnp.broadcast_to(_mask5(mask, b, t, s, h, kh), (b, kh, h // kh, t, s)))
  return m5.any(-1).transpose(0, 3, 1, 2).reshape(b, t, h)


CASES = [  # b, t, s, h, kh, bq, bk, layout heads, element-mask kwargs, full lists
    (2, 10, 12, 4, 2, 4, 4, 1, {}, False),
    (2, 10, 12, 4, 2, 4, 4, 4, {}, True),
    (2, 10, 12, 4, 2, 4, 4, 2, {}, False),
    (1, 16, 16, 2, 2, 4, 8, 2, dict(window=5, sinks=2), True),
    (2, 9, 20, 4, 1, 3, 5, 4, dict(causal=False), False),
    (1, 7, 7, 2, 1, 7, 1, 1, {}, False),  # one q block, one-slot kv blocks
]


@pytest.mark.parametrize("case", CASES)
def test_block_sparse_equals_dense(case):
  b, t, s, h, kh, bq, bk, hl, kw, full = case
  q, k, v = _qkv(b, t, s, h, kh)
  mask = AttentionMask(layout=_layout(b, hl, t, s, bq, bk, full=full, full_row=True), **kw)
  out, lse = attention_fn(q, k, v, mask=mask, impl="xla", return_lse=True)
  ref, ref_lse = attention_fn(q, k, v, mask=mask, impl="reference", return_lse=True)
  vis = _visible(mask, b, t, s, h, kh)
  assert vis.any()
  np.testing.assert_allclose(np.asarray(out)[vis], np.asarray(ref)[vis], atol=2e-6)
  np.testing.assert_allclose(np.asarray(lse)[vis], np.asarray(ref_lse)[vis], atol=2e-6)
  assert np.all(np.asarray(out)[~vis] == 0)  # no visible key: zeros, as FlexAttention
  # The heads-major cache layout reads the same blocks.
  hm = _attend(q, jnp.transpose(k, (0, 2, 3, 1)), jnp.swapaxes(v, 1, 2), mask, "xla",
               "heads_major", None, False)
  np.testing.assert_allclose(np.asarray(hm), np.asarray(out), atol=1e-6)


def test_packed_segments_and_chunked_online_softmax(monkeypatch):
  b, t, h, kh = 2, 13, 4, 2
  q, k, v = _qkv(b, t, t, h, kh)
  seg = jnp.asarray(np.sort(RNG.integers(0, 3, size=(b, t)), axis=1))
  mask = AttentionMask(q_segment_ids=seg, kv_segment_ids=seg,
                       layout=_layout(b, h, t, t, 3, 2, density=0.7, full=True, full_row=True))
  want = attention_fn(q, k, v, mask=mask, impl="xla")
  monkeypatch.setattr(importlib.import_module("model.attention"), "BLOCK_CHUNK_BYTES", 1)
  got = attention_fn(q, k, v, mask=mask, impl="xla")  # one kv block per scan step
  ref = attention_fn(q, k, v, mask=mask, impl="reference")
  vis = _visible(mask, b, t, t, h, kh)
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=2e-6)
  np.testing.assert_allclose(np.asarray(got)[vis], np.asarray(ref)[vis], atol=2e-6)


def test_gradients_equal_dense():
  b, t, h, kh, bq, bk = 2, 12, 4, 2, 4, 4
  q, k, v = _qkv(b, t, t, h, kh)
  bm = RNG.random((b, h, 3, 3)) < 0.6
  bm[..., 0] = True  # every query sees a block
  mask = AttentionMask(layout=BlockLayout.from_block_mask(bm, block_q=bq, block_kv=bk))

  def grads(impl):
    loss = lambda q, k, v: jnp.sum(jnp.sin(attention_fn(q, k, v, mask=mask, impl=impl)))
    return jax.grad(loss, argnums=(0, 1, 2))(q, k, v)

  for got, want in zip(grads("xla"), grads("reference"), strict=True):
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=5e-6)


def test_all_blocks_equals_plain_attention_and_jits():
  b, t, h, kh = 1, 16, 2, 1
  q, k, v = _qkv(b, t, t, h, kh, dtype=jnp.bfloat16)
  every = BlockLayout.from_block_mask(np.ones((1, 1, 4, 4), bool), block_q=4, block_kv=4)
  got = jax.jit(lambda q, k, v, m: attention_fn(q, k, v, mask=m))(
      q, k, v, AttentionMask(layout=every))
  want = attention_fn(q, k, v, mask=AttentionMask())
  assert got.dtype == jnp.bfloat16
  np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(want, np.float32),
                             atol=2e-2)


def test_layout_lists_and_to_dense():
  bm = np.array([[[[1, 0, 1], [0, 1, 1]]]], bool)
  lay = BlockLayout.from_block_mask(bm, block_q=2, block_kv=3)
  assert lay.kv_num_blocks.tolist() == [[[2, 2]]]
  assert lay.kv_indices.tolist() == [[[[0, 2], [1, 2]]]]
  dense = np.asarray(lay.to_dense(3, 8))  # crops the padded last blocks
  assert dense.shape == (1, 1, 3, 8)
  assert dense[0, 0].astype(int).tolist() == [[1, 1, 1, 0, 0, 0, 1, 1]] * 2 + [
      [0, 0, 0, 1, 1, 1, 1, 1]]
  full = BlockLayout.from_block_mask(bm, block_q=2, block_kv=3, full_mask=bm & [1, 0, 0])
  assert full.kv_num_blocks.tolist() == [[[1, 2]]] and full.full_num_blocks.tolist() == [[[1, 0]]]
  np.testing.assert_array_equal(full.to_dense(3, 8), lay.to_dense(3, 8))
  assert float(lay.density(4, 9)[0, 0]) == pytest.approx(4 / 6)
  leaves = jax.tree.leaves(lay)  # a pytree: block sizes are static
  assert len(leaves) == 2 and jax.tree.structure(lay) == jax.tree.structure(
      dataclasses.replace(lay, kv_indices=lay.kv_indices + 0))


def test_bad_layouts():
  bm = np.ones((1, 1, 2, 3), bool)
  lay = BlockLayout.from_block_mask(bm, block_q=4, block_kv=4)
  with pytest.raises(ValueError, match="block_q=0 must be a positive int"):
    BlockLayout.from_block_mask(bm, block_q=0, block_kv=4)
  with pytest.raises(ValueError, match="3 q blocks|need ceil"):
    lay.check(12, 12)  # 2 q blocks of 4 cannot cover 12 queries
  with pytest.raises(ValueError, match="holds block 2; valid: 0..1"):
    lay.check(8, 8)  # 3 kv blocks listed, 8 keys have 2
  unsorted = lay.replace(kv_indices=lay.kv_indices[..., ::-1])
  with pytest.raises(ValueError, match="strictly ascending"):
    unsorted.check(8, 12)
  with pytest.raises(ValueError, match=r"kv_num_blocks must lie in \[0, 3\]"):
    lay.replace(kv_num_blocks=lay.kv_num_blocks + 1).check(8, 12)
  with pytest.raises(ValueError, match="max_kv_blocks=2 but a q block has 3"):
    BlockLayout.from_block_mask(bm, block_q=4, block_kv=4, max_kv_blocks=2)
  with pytest.raises(ValueError, match="heads 3; valid: 1, 2, 4"):
    q, k, v = _qkv(1, 8, 12, 4, 2)
    three = BlockLayout.from_block_mask(np.ones((1, 3, 2, 3), bool), block_q=4, block_kv=4)
    attention_fn(q, k, v, mask=AttentionMask(layout=three))
  with pytest.raises(ValueError, match="full_num_blocks and full_indices"):
    BlockLayout(kv_num_blocks=lay.kv_num_blocks, kv_indices=lay.kv_indices,
                full_num_blocks=lay.kv_num_blocks, block_q=4, block_kv=4)


def test_cache_read_with_layout_and_quantized_cache():
  """A decode read of a (quantized) cache through a layout equals the dense reference."""
  cfg = model.get_preset("tiny").replace(kv_quant="int8")
  for kv_quant in (None, "int8", "int4"):
    c = cfg.replace(kv_quant=kv_quant)
    cache = model.init_cache(c, 2, 32)
    k = jnp.asarray(RNG.normal(size=(2, 32, c.n_kv_heads, c.dh)), jnp.float32)
    cache = cache.with_layer(0, *write_layer(cache, 0, k, k * 0.5)).with_lengths(
        jnp.array([32, 20]))
    q = jnp.asarray(RNG.normal(size=(2, 1, c.n_heads, c.dh)), jnp.float32)
    bm = RNG.random((2, 1, 1, 4)) < 0.6
    bm[..., 0] = True
    mask = AttentionMask(q_positions=jnp.array([[31], [19]]),
                         kv_positions=jnp.arange(32)[None].repeat(2, 0),
                         layout=BlockLayout.from_block_mask(bm, block_q=1, block_kv=8))
    got = model.cache_attention(q, cache, 0, mask=mask, impl="xla")
    want = model.cache_attention(q, cache, 0, mask=mask, impl="reference")
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=2e-5)

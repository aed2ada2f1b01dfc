"""Block-sparse layout metadata and the reference, against model.attention (independent)."""

import jax.numpy as jnp
import numpy as np
import pytest

import model
from pallas_kernels import block_sparse as bs


def random_layout(rng, b, hl, qb, sb, bq, bkv, *, p=0.5, full_p=0.3, empty_row=True):
  active = rng.random((b, hl, qb, sb)) < p
  if empty_row:
    active[0, 0, 0] = False
  full = active & (rng.random(active.shape) < full_p)
  return model.BlockLayout.from_block_mask(jnp.asarray(active), block_q=bq, block_kv=bkv,
                                           full_mask=jnp.asarray(full)), active, full


def test_meta_lists_match_block_masks():
  rng = np.random.default_rng(0)
  layout, active, full = random_layout(rng, 2, 3, 4, 5, 8, 8)
  meta = bs.build_meta(layout, 40)
  num, idx, is_full = map(np.asarray, (meta.num, meta.idx, meta.full))
  for b, h, i in np.ndindex(*num.shape):
    n = num[b, h, i]
    assert list(idx[b, h, i, :n]) == list(np.flatnonzero(active[b, h, i]))
    assert list(is_full[b, h, i, :n]) == list(full[b, h, i, idx[b, h, i, :n]].astype(int))
    # Past the count: the last active block again (no new DMA), or 0 for an empty row.
    assert set(idx[b, h, i, n:]) <= {idx[b, h, i, n - 1] if n else 0}
    assert not is_full[b, h, i, n:].any()
  t_num, t_idx, t_full = map(np.asarray, (meta.t_num, meta.t_idx, meta.t_full))
  for b, h, j in np.ndindex(*t_num.shape):
    n = t_num[b, h, j]
    assert list(t_idx[b, h, j, :n]) == list(np.flatnonzero(active[b, h, :, j]))
    assert list(t_full[b, h, j, :n]) == list(full[b, h, t_idx[b, h, j, :n], j].astype(int))
  for n_, i_, m_ in ((meta.p_num, meta.p_idx, active & ~full), (meta.f_num, meta.f_idx, full),
                     (meta.tp_num, meta.tp_idx, np.swapaxes(active & ~full, -1, -2)),
                     (meta.tf_num, meta.tf_idx, np.swapaxes(full, -1, -2))):
    n_, i_ = np.asarray(n_), np.asarray(i_)
    for pos in np.ndindex(*n_.shape):
      assert list(i_[pos][:n_[pos]]) == list(np.flatnonzero(m_[pos]))


@pytest.mark.parametrize("hl", [1, 2, 4])
@pytest.mark.parametrize("causal,window,segments", [(False, None, False), (True, None, True),
                                                    (True, 9, False)])
def test_reference_matches_model_block_sparse(hl, causal, window, segments):
  rng = np.random.default_rng(hl)
  b, t, h, kh, dh, bq, bkv = 2, 16, 4, 2, 8, 4, 8
  layout, active, _ = random_layout(rng, b, hl, t // bq, t // bkv, bq, bkv, full_p=0.0)
  q = jnp.asarray(rng.normal(size=(b, t, h, dh)), jnp.float32)
  k = jnp.asarray(rng.normal(size=(b, t, kh, dh)), jnp.float32)
  v = jnp.asarray(rng.normal(size=(b, t, kh, dh)), jnp.float32)
  seg = jnp.asarray(np.sort(rng.integers(0, 3, size=(b, t)), axis=1)) if segments else None
  mask = bs.Mask(causal=causal, window=window, q_segment_ids=seg)
  out, lse = bs.reference(q, k, v, layout, mask=mask, return_lse=True)
  am = model.AttentionMask(causal=causal, window=window, q_segment_ids=seg, layout=layout)
  want, want_lse = model.attention(q, k, v, mask=am, impl="xla", return_lse=True)
  np.testing.assert_allclose(out, want, rtol=1e-5, atol=1e-5)
  seen = np.asarray(want_lse) > -1e29
  np.testing.assert_allclose(np.asarray(lse)[seen], np.asarray(want_lse)[seen], rtol=1e-5,
                             atol=1e-5)
  assert np.all(np.asarray(lse)[~seen] == bs.NEG_INF)
  assert np.all(np.asarray(out)[~seen] == 0)


@pytest.mark.parametrize("t,s,causal,window,sinks,segments", [
    (32, 32, True, None, 0, False), (32, 32, True, 12, 4, False), (8, 32, True, None, 0, False),
    (16, 32, False, None, 0, False), (32, 32, True, None, 0, True)])
def test_dense_layout_claims_are_true(t, s, causal, window, sinks, segments):
  rng = np.random.default_rng(t)
  seg = jnp.asarray(np.sort(rng.integers(0, 3, size=(2, s)), axis=1)) if segments else None
  qpos = jnp.broadcast_to(jnp.arange(s - t, s), (2, t))  # a chunk: the last T positions
  mask = bs.Mask(causal=causal, window=window, sinks=sinks, q_positions=qpos,
                 q_segment_ids=None if seg is None else seg[:, s - t:], kv_segment_ids=seg)
  m = bs.mask_arrays(mask, 2, t, s)
  layout = bs.dense_layout(m, 4, 8)
  vis = np.asarray(bs.element_mask(
      m, m.q_pos[:, :, None], m.kv_pos[:, None], None if seg is None else m.q_seg[:, :, None],
      None if seg is None else m.kv_seg[:, None]))
  partial, full = map(np.asarray, bs.block_masks(layout, s))
  blocks = vis.reshape(2, t // 4, 4, s // 8, 8)
  # Full claims are true and nothing visible is dropped; without sinks (a block half sink,
  # half window stays partial) the full claims are exact.
  assert not np.any(full[:, 0] & ~blocks.all(axis=(2, 4)))
  assert not np.any(blocks.any(axis=(2, 4)) & ~(partial[:, 0] | full[:, 0]))
  if not segments:  # segment-id ranges can overlap without a shared id: kept partial
    assert np.array_equal(partial[:, 0] | full[:, 0], blocks.any(axis=(2, 4)))
  if not sinks:
    assert np.array_equal(full[:, 0], blocks.all(axis=(2, 4)))


@pytest.mark.parametrize("make,match", [
    (lambda l: l.replace(kv_indices=l.kv_indices.at[0, 0, 1, 0].set(7)), "valid: 0..4"),
    (lambda l: l.replace(kv_indices=jnp.flip(l.kv_indices, -1),
                         kv_num_blocks=jnp.full_like(l.kv_num_blocks, 2)), "ascending"),
    (lambda l: l.replace(kv_num_blocks=l.kv_num_blocks + 9), "must lie in"),
])
def test_bad_layouts(make, match):
  active = np.ones((1, 1, 4, 5), bool)
  layout = model.BlockLayout.from_block_mask(jnp.asarray(active), block_q=4, block_kv=8)
  q = jnp.zeros((1, 16, 2, 8))
  k = jnp.zeros((1, 40, 2, 8))
  with pytest.raises(ValueError, match=match):
    bs.reference(q, k, k, make(layout))


def test_bad_blocks_and_shapes():
  q = jnp.zeros((1, 16, 2, 8))
  with pytest.raises(ValueError, match="block_kv=6 must divide S=40"):
    bs.check_blocks(16, 40, 4, 6)
  with pytest.raises(ValueError, match="kv heads K=3 must divide"):
    bs.reference(q, jnp.zeros((1, 40, 3, 8)), jnp.zeros((1, 40, 3, 8)))
  with pytest.raises(ValueError, match="q.dtype=float16"):
    bs.reference(q.astype(jnp.float16), q, q)

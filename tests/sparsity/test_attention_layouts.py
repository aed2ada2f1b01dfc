"""Block layouts: static builders exact, dynamic builders (top-k, HiP, SALE), selectors in a
cached decode, Delta attention, recall metrics."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import decoding
import model
from model import AttentionMask, attention
from sparsity import attention as sa
from tests.decoding.conftest import random_params

RNG = np.random.RandomState(0)
# Jitted entry points: one compile per shape instead of op-by-op dispatch (10x faster here).
ATT = jax.jit(attention, static_argnames=("impl",))
_BLK = ("block_q", "block_kv", "sinks", "local")
TOPK = jax.jit(sa.topk_layout, static_argnames=_BLK + ("k", "pool"))
HIP = jax.jit(sa.hip_layout, static_argnames=_BLK + ("k",))
SALE = jax.jit(sa.sale_layout, static_argnames=_BLK + ("tau", "max_blocks"))
DELTA = jax.jit(sa.delta_attention, static_argnames=("gamma", "impl"))
RECALL = jax.jit(sa.attention_recall)
TOPK_RECALL = jax.jit(sa.topk_recall, static_argnames=("k",))


def lists(layout, row=0, head=0):
  """([partial lists], [full lists]) per q block, as Python lists."""
  def one(num, idx):
    num, idx = np.asarray(num)[row, head], np.asarray(idx)[row, head]
    return [list(map(int, idx[i, :num[i]])) for i in range(len(num))]
  part = one(layout.kv_num_blocks, layout.kv_indices)
  full = [] if layout.full_indices is None else one(layout.full_num_blocks, layout.full_indices)
  return part, full


def expected_blocks(elem_TS, bq, bk):
  """(active, full) block masks of an element mask: any / all of each block's real pairs."""
  t, s = elem_TS.shape
  qb, sb = -(-t // bq), -(-s // bk)
  act, full = np.zeros((qb, sb), bool), np.zeros((qb, sb), bool)
  for i in range(qb):
    for j in range(sb):
      blk = elem_TS[i * bq:(i + 1) * bq, j * bk:(j + 1) * bk]
      act[i, j], full[i, j] = blk.any(), blk.all()
  return act, full


def check_exact(layout, elem_TS):
  """The layout is exactly the block cover of elem (active = any, full = all), its dense
  form covers elem, and equals it where elem is block-aligned."""
  t, s = elem_TS.shape
  act, full = expected_blocks(elem_TS, layout.block_q, layout.block_kv)
  sb = act.shape[1]
  np.testing.assert_array_equal(np.asarray(layout.block_mask(sb))[0, 0], act)
  got_full = np.zeros_like(act)
  for i, fl in enumerate(lists(layout)[1]):
    got_full[i, fl] = True
  np.testing.assert_array_equal(got_full, full & act)
  dense = np.asarray(layout.to_dense(t, s))[0, 0]
  assert not np.any(elem_TS & ~dense)  # superset always
  aligned = np.kron(act, np.ones((layout.block_q, layout.block_kv), bool))[:t, :s]
  np.testing.assert_array_equal(dense, aligned)
  if np.array_equal(np.kron(full, np.ones((layout.block_q, layout.block_kv)))[:t, :s] > 0,
                    elem_TS):
    np.testing.assert_array_equal(dense, elem_TS)  # block-aligned mask: exact


def qkv(b=1, t=16, s=16, h=4, kh=2, dh=8, seed=0):
  r = np.random.RandomState(seed)
  f = lambda *sh: jnp.asarray(r.randn(*sh), jnp.float32)
  return f(b, t, h, dh), f(b, s, kh, dh), f(b, s, kh, dh)


def to_bksd(k_BSKD):
  return jnp.swapaxes(k_BSKD, 1, 2)


def sparse_equals_dense(q, k, v, mask, layout, atol=2e-5):
  m = mask.replace(layout=layout)
  out_x = ATT(q, k, v, mask=m, impl="xla")
  out_r = ATT(q, k, v, mask=m, impl="reference")
  np.testing.assert_allclose(np.asarray(out_x), np.asarray(out_r), atol=atol, rtol=1e-5)
  return out_x


# --- Static builders: hand-made cases.

def test_causal_lists():
  lay = sa.causal_layout(8, 8, block_q=4, block_kv=4)
  assert lists(lay) == ([[0], [1]], [[], [0]])
  lay = sa.causal_layout(2, 8, block_q=2, block_kv=4, q_offset=6)  # decode-like chunk
  assert lists(lay) == ([[1]], [[0]])
  lay = sa.causal_layout(6, 6, block_q=2, block_kv=3)
  assert lists(lay) == ([[0], [1], [1]], [[], [0], [0]])


def test_window_lists():
  lay = sa.window_layout(8, 8, 3, block_q=2, block_kv=2, sinks=2)
  # q block 3 (queries 6, 7): sinks block 0, window keys 4..7 (blocks 2, 3); block 1 hidden.
  part, full = lists(lay)
  assert part == [[0], [1], [1, 2], [2, 3]]
  assert full == [[], [0], [0], [0]]


def test_global_lists():
  lay = sa.global_layout(8, 8, 2, block_q=2, block_kv=2)
  part, full = lists(lay)
  assert part == [[], [1], [2], [3]]
  assert full == [[0, 1, 2, 3], [0], [0, 1], [0, 1, 2]]


def test_segment_lists():
  seg = jnp.asarray([[0, 0, 0, 1, 1, 1, 1, 1], [0, 0, 1, 1, 2, 2, 2, 2]])
  lay = sa.segment_layout(seg, block_q=2, block_kv=2)
  assert lay.batch == 2 and lay.heads == 1
  assert lists(lay, 0) == ([[0], [0, 1], [1, 2], [1, 3]], [[], [], [], [2]])
  assert lists(lay, 1) == ([[0], [1], [2], [3]], [[], [], [], [2]])
  lay = sa.segment_layout(seg, block_q=2, block_kv=2, causal=False)
  assert lists(lay, 1) == ([[], [], [], []], [[0], [1], [2, 3], [2, 3]])


@pytest.mark.parametrize("t,s,bq,bk,off", [(7, 11, 3, 4, 0), (5, 13, 2, 3, 8), (6, 6, 4, 2, 0)])
def test_static_vs_element_mask(t, s, bq, bk, off):
  qpos = jnp.arange(t)[None] + off
  causal = AttentionMask(q_positions=qpos).materialize(1, t, s)[0]
  check_exact(sa.causal_layout(t, s, block_q=bq, block_kv=bk, q_offset=off), np.asarray(causal))
  for window, sinks in ((1, 0), (4, 2), (100, 1)):
    m = AttentionMask(q_positions=qpos, window=window, sinks=sinks).materialize(1, t, s)[0]
    lay = sa.window_layout(t, s, window, block_q=bq, block_kv=bk, sinks=sinks, q_offset=off)
    check_exact(lay, np.asarray(m))
  for g in (0, 2, 3):
    qp, kp = np.arange(t)[:, None] + off, np.arange(s)[None]
    elem = (kp <= qp) | (qp < g) | (kp < g)
    check_exact(sa.global_layout(t, s, g, block_q=bq, block_kv=bk, q_offset=off), elem)


def test_segment_vs_element_mask():
  seg = jnp.asarray(np.sort(RNG.randint(0, 4, size=(3, 11)), axis=1))
  for causal in (True, False):
    lay = sa.segment_layout(seg, block_q=3, block_kv=2, causal=causal)
    idx = jnp.broadcast_to(jnp.arange(11)[None], (3, 11))
    m = AttentionMask(q_positions=idx, kv_positions=idx, q_segment_ids=seg, causal=causal)
    elem = np.asarray(m.materialize(3, 11, 11))
    for row in range(3):
      one = lay.replace(**{f: getattr(lay, f)[row:row + 1] for f in
                           ("kv_num_blocks", "kv_indices", "full_num_blocks", "full_indices")})
      check_exact(one, elem[row])


def test_block_aligned_is_exact():
  # A window of whole blocks with block-aligned sinks: the element mask is block-aligned
  # off the diagonal; with block size 1 every mask is, so to_dense equals it.
  m = AttentionMask(window=5, sinks=2).materialize(1, 12, 12)[0]
  lay = sa.window_layout(12, 12, 5, block_q=1, block_kv=1, sinks=2)
  np.testing.assert_array_equal(np.asarray(lay.to_dense(12, 12))[0, 0], np.asarray(m))


def test_union_intersection():
  c = sa.causal_layout(8, 8, block_q=2, block_kv=2)
  w = sa.window_layout(8, 8, 2, block_q=2, block_kv=2)
  g = sa.global_layout(8, 8, 2, block_q=2, block_kv=2)
  dense = lambda lay: np.asarray(lay.to_dense(8, 8))[0, 0]
  np.testing.assert_array_equal(dense(sa.union(c, w)), dense(c))
  np.testing.assert_array_equal(dense(sa.intersection(c, w)), dense(w))
  np.testing.assert_array_equal(dense(sa.union(w, g)), dense(w) | dense(g))
  assert lists(sa.intersection(c, g)) == lists(c)  # full where both are full
  assert lists(sa.union(w, g))[1] == lists(g)[1]


def test_union_errors():
  c = sa.causal_layout(8, 8, block_q=2, block_kv=2)
  with pytest.raises(ValueError, match="block sizes differ"):
    sa.union(c, sa.causal_layout(8, 8, block_q=2, block_kv=4))
  with pytest.raises(ValueError, match="q blocks"):
    sa.intersection(c, sa.causal_layout(4, 8, block_q=2, block_kv=2))


@pytest.mark.parametrize("bad", [dict(block_q=0), dict(block_kv=-1), dict(block_q=1.5)])
def test_block_size_errors(bad):
  kw = dict(block_q=2, block_kv=2) | bad
  name = next(iter(bad))
  with pytest.raises(ValueError, match=name):
    sa.causal_layout(8, 8, **kw)
  q, k, _ = qkv()
  with pytest.raises(ValueError, match=name):
    sa.topk_layout(q, to_bksd(k), k=1, **kw)


def test_static_sparse_equals_reference():
  q, k, v = qkv(b=2, t=13, s=13)
  for lay, m in [(sa.causal_layout(13, 13, block_q=4, block_kv=3), AttentionMask()),
                 (sa.window_layout(13, 13, 4, block_q=2, block_kv=4, sinks=1),
                  AttentionMask(window=4, sinks=1)),
                 (sa.global_layout(13, 13, 4, block_q=4, block_kv=4),
                  AttentionMask(causal=False))]:
    out = sparse_equals_dense(q, k, v, m, lay)
    if m.causal:  # the layout covers the mask: same as no layout
      dense = ATT(q, k, v, mask=m, impl="reference")
      np.testing.assert_allclose(np.asarray(out), np.asarray(dense), atol=2e-5)
  seg = jnp.asarray([[0] * 5 + [1] * 8, [0] * 9 + [1] * 4])
  idx = jnp.broadcast_to(jnp.arange(13)[None], (2, 13))
  m = AttentionMask(q_positions=idx, kv_positions=idx, q_segment_ids=seg)
  out = sparse_equals_dense(q, k, v, m, sa.segment_layout(seg, block_q=4, block_kv=4))
  dense = ATT(q, k, v, mask=m, impl="reference")
  np.testing.assert_allclose(np.asarray(out), np.asarray(dense), atol=2e-5)


# --- Dynamic builders.

def planted_decode(pos=15, s=16, dh=8, hot=2, bk=4, amp=3.0):
  """One decode query at `pos`; block `hot` holds keys aligned with it (head 0's)."""
  r = np.random.RandomState(1)
  q = r.randn(1, 1, 2, dh).astype(np.float32)
  k = 0.1 * r.randn(1, 1, s, dh).astype(np.float32)
  k[0, 0, hot * bk:(hot + 1) * bk] += amp * q[0, 0, 0]
  mask = AttentionMask(q_positions=jnp.asarray([[pos]]))
  return jnp.asarray(q), jnp.asarray(k), mask


@pytest.mark.parametrize("pool", ["minmax", "mean"])
def test_topk_hand_case(pool):
  q, k, mask = planted_decode()
  lay = TOPK(q, k, mask, block_q=8, block_kv=4, k=1, pool=pool)
  assert lay.block_q == 1 and lay.heads == 1  # T = 1; one list per kv head (GQA group)
  assert lists(lay) == ([[0, 2, 3]], [])  # sink, the planted block, the local block
  lay = TOPK(q, k, mask, block_q=1, block_kv=4, k=1, pool=pool, sinks=0, local=0)
  assert lists(lay) == ([[2]], [])
  # Position 9: blocks 3 are invisible (unwritten cache slots), block 2 is local.
  q, k, mask = planted_decode(pos=9, hot=1)
  lay = TOPK(q, k, mask, block_q=1, block_kv=4, k=1, pool=pool, sinks=0)
  assert lists(lay) == ([[1, 2]], [])


def test_topk_prefill_and_all_blocks_dense():
  q, k, v = qkv(b=2, t=16, s=16)
  lay = TOPK(q, to_bksd(k), block_q=4, block_kv=4, k=1, sinks=1, local=1)
  part, _ = lists(lay, 1, 1)
  assert part[0] == [0] and part[1] == [0, 1]  # nothing else visible yet
  assert all(len(p) <= 3 and p[0] == 0 and p[-1] == i for i, p in enumerate(part))
  assert lay.kv_indices.shape == (2, 2, 4, 3)  # lists of k + sinks + local entries
  sparse_equals_dense(q, k, v, AttentionMask(), lay)
  for pool in ("minmax", "mean"):
    full = TOPK(q, to_bksd(k), block_q=4, block_kv=4, k=4, pool=pool)
    out = sparse_equals_dense(q, k, v, AttentionMask(), full)
    dense = ATT(q, k, v, mask=AttentionMask(), impl="reference")
    np.testing.assert_allclose(np.asarray(out), np.asarray(dense), atol=2e-5)


def test_topk_jit_and_minmax_bound():
  q, k, v = qkv(b=1, t=12, s=12, seed=3)
  f = jax.jit(lambda q, k: TOPK(q, k, block_q=4, block_kv=3, k=2))
  lay = f(q, to_bksd(k))
  ref = TOPK(q, to_bksd(k), block_q=4, block_kv=3, k=2)
  np.testing.assert_array_equal(np.asarray(lay.block_mask(4)), np.asarray(ref.block_mask(4)))
  # With no sinks / local and k = 1, each (kv head, q block) keeps the visible block of
  # largest Quest bound (max over the block's rows and the group's heads).
  one = TOPK(q, to_bksd(k), block_q=4, block_kv=3, k=1, sinks=0, local=0)
  kb = np.asarray(to_bksd(k)).reshape(1, 2, 4, 3, 8)
  qn = np.asarray(q).reshape(1, 12, 2, 2, 8)
  ub = (np.maximum(qn, 0)[:, :, :, :, None] * kb.max(3)[:, None, :, None]
        + np.minimum(qn, 0)[:, :, :, :, None] * kb.min(3)[:, None, :, None]).sum(-1)
  for kv in range(2):
    for i in range(3):
      best = ub[0, 4 * i:4 * i + 4, kv].max(axis=(0, 1))  # [Sb]
      best[np.arange(4) * 3 > 4 * i + 3] = -np.inf
      assert lists(one, 0, kv)[0][i] == [int(np.argmax(best))]


def test_topk_errors():
  q, k, _ = qkv(t=16, s=16)
  with pytest.raises(ValueError, match=r"k=5 must be an int in \[1, 4\]"):
    sa.topk_layout(q, to_bksd(k), block_q=4, block_kv=4, k=5)
  with pytest.raises(ValueError, match="pool"):
    sa.topk_layout(q, to_bksd(k), block_q=4, block_kv=4, k=1, pool="max")
  with pytest.raises(ValueError, match="max_blocks"):
    sa.sale_layout(q, to_bksd(k), block_q=4, block_kv=4, tau=0.1, max_blocks=9)
  with pytest.raises(ValueError, match="k=0"):
    sa.hip_layout(q, to_bksd(k), block_q=4, block_kv=4, k=0)


def test_hip_hand_case_and_rounds():
  assert [sa.hip_rounds(n, 2) for n in (1, 2, 3, 4, 8, 9)] == [0, 0, 1, 1, 2, 3]
  # One group over blocks [1, 7) (sink 0, local 7): halves [1, 4) / [4, 7) have
  # representatives 2 / 5, then [1, 2) / [2, 4) -> 1 / 2, then [2, 3) / [3, 4) -> 2 / 3.
  q, k, mask = planted_decode(pos=31, s=32, hot=2)
  lay = HIP(q, k, mask, block_q=1, block_kv=4, k=1)
  assert lists(lay) == ([[0, 2, 7]], [])
  # Two groups [0, 4), [4, 8): block 4 represents [4, 6), then [4, 5).
  q, k, mask = planted_decode(pos=31, s=32, hot=4)
  lay = HIP(q, k, mask, block_q=1, block_kv=4, k=2, sinks=0, local=0)
  assert 4 in lists(lay)[0][0] and len(lists(lay)[0][0]) == 2


def test_hip_planted_recall():
  """Attention locality (HiP's premise): keys near 4 random centers (Gaussian bumps, sigma
  1.5 blocks) lean towards the query. HiP with k = 4 must recall the exact top-4 blocks
  (by true attention mass) at >= 0.8 on average over 8 seeds; observed 0.875, where Quest
  block top-k scores 0.81 and a random pick of 4 of 32 blocks 0.125."""
  s, bk, dh, k = 512, 16, 16, 4
  mask = AttentionMask(q_positions=jnp.asarray([[s - 1]]))
  recalls = []
  for seed in range(8):
    r = np.random.RandomState(seed)
    q = r.randn(1, 1, 1, dh).astype(np.float32)
    keys = r.randn(1, s, 1, dh).astype(np.float32)
    centers = r.choice(np.arange(2, 30), size=k, replace=False) * bk + bk // 2
    bump = sum(np.exp(-0.5 * ((np.arange(s) - c) / (1.5 * bk)) ** 2) for c in centers)
    keys[0, :, 0] += 4.0 * bump[:, None] * q[0, 0, 0] / np.linalg.norm(q[0, 0, 0])
    q, keys = jnp.asarray(q), jnp.asarray(keys)
    lay = HIP(q, to_bksd(keys), mask, block_q=1, block_kv=bk, k=k, sinks=0, local=0)
    assert lay.kv_indices.shape[-1] == k
    recalls.append(float(TOPK_RECALL(q, keys, mask, lay, k=k).mean()))
  assert np.mean(recalls) >= 0.8, recalls


def test_hip_sale_sparse_equals_reference():
  q, k, v = qkv(b=2, t=16, s=16, seed=5)
  hip = HIP(q, to_bksd(k), block_q=4, block_kv=2, k=2)
  sparse_equals_dense(q, k, v, AttentionMask(), hip)
  sale = SALE(q, to_bksd(k), block_q=4, block_kv=2, tau=0.05, max_blocks=3)
  sparse_equals_dense(q, k, v, AttentionMask(), sale)
  # Full budgets keep every visible block: dense.
  dense = ATT(q, k, v, mask=AttentionMask(), impl="reference")
  for lay in (HIP(q, to_bksd(k), block_q=4, block_kv=2, k=8),
              SALE(q, to_bksd(k), block_q=4, block_kv=2, tau=0.0, max_blocks=8)):
    out = ATT(q, k, v, mask=AttentionMask(layout=lay), impl="xla")
    np.testing.assert_allclose(np.asarray(out), np.asarray(dense), atol=2e-5)


def sale_weights(q, k, pos, bk):
  """NumPy SALE estimate for one decode query: int4 (absmax / 7) pooled q and mean block
  keys, softmax over visible blocks: [H, Sb]."""
  q, k = np.asarray(q)[0, 0], np.asarray(k)[0, 0]  # [H, Dh], [S, Dh]
  sb = k.shape[0] // bk
  kmean = k.reshape(sb, bk, -1).mean(1)
  quant = lambda x: (np.clip(np.round(x / (np.abs(x).max(-1, keepdims=True) / 7)), -7, 7),
                     np.abs(x).max(-1, keepdims=True) / 7)
  (qc, qs), (kc, ks) = quant(q), quant(kmean)
  logit = (qc @ kc.T) * qs * ks.T / np.sqrt(q.shape[-1])
  logit[:, np.arange(sb) * bk > pos] = -np.inf
  w = np.exp(logit - logit.max(-1, keepdims=True))
  return w / w.sum(-1, keepdims=True)


def test_sale_threshold_and_budget():
  q, k, mask = planted_decode(pos=27, s=32, hot=3, amp=1.0)
  kw = dict(block_q=1, block_kv=4)
  w = sale_weights(q, k, 27, 4)  # block 7 (slots 28..31) is not written yet
  assert w[0, 3] == w.max() and w[:, 7].max() == 0.0
  forced = {0, 6}  # sink, local (the last visible block)
  for tau in (0.05, 0.2, float(w[0, 3]) - 1e-3, float(w[0, 3]) + 1e-3, 0.9999):
    want = sorted(forced | {j for j in range(1, 6) if w[:, j].max() > tau})
    got = lists(sa.sale_layout(q, k, mask, tau=tau, max_blocks=5, **kw))
    assert got == ([want], []), (tau, w)
  assert 3 in lists(sa.sale_layout(q, k, mask, tau=float(w[0, 3]) - 1e-3, max_blocks=5,
                                   **kw))[0][0]
  budget = lists(sa.sale_layout(q, k, mask, tau=0.0, max_blocks=2, **kw))[0][0]
  order = [j for j in np.argsort(-w.max(0)) if j in range(1, 6)]
  assert budget == sorted(forced | set(order[:2]))  # the 2 highest, then sink + local
  per_head = sa.sale_layout(q, k, mask, tau=(float(w[0, 3]) - 1e-3, 0.9999), max_blocks=5,
                            **kw)
  assert 3 in lists(per_head)[0][0]  # head 0's threshold keeps it for the group
  per_head = sa.sale_layout(q, k, mask, tau=(0.9999, float(w[1].max()) + 1e-3), max_blocks=5,
                            **kw)
  assert lists(per_head) == ([sorted(forced)], [])
  with pytest.raises(ValueError, match="tau"):
    sa.sale_layout(q, k, mask, tau=(0.1,), max_blocks=4, **kw)


# --- Delta attention and recall.

def test_delta_attention():
  q, k, v = qkv(b=2, t=12, s=12, seed=7)
  m = AttentionMask(layout=sa.window_layout(12, 12, 4, block_q=4, block_kv=4))
  dense = ATT(q, k, v, mask=m.replace(layout=None), impl="xla")
  np.testing.assert_array_equal(np.asarray(DELTA(q, k, v, mask=m, gamma=1)),
                                np.asarray(dense))
  sparse = ATT(q, k, v, mask=m, impl="xla")
  out = np.asarray(DELTA(q, k, v, mask=m, gamma=5))
  sp, de = np.asarray(sparse), np.asarray(dense)
  for i in range(12):
    a = min((i // 5 + 1) * 5, 12) - 1  # anchors 4, 9, 11
    want = de[:, i] if i == a else sp[:, i] + de[:, a] - sp[:, a]
    np.testing.assert_allclose(out[:, i], want, atol=1e-5)
  assert not np.allclose(sp, de)  # the window does drop mass here
  with pytest.raises(ValueError, match="gamma"):
    sa.delta_attention(q, k, v, mask=m, gamma=0)


def test_recall_metrics():
  q, k, _ = qkv(b=1, t=16, s=16, seed=2)
  c = sa.causal_layout(16, 16, block_q=4, block_kv=4)
  np.testing.assert_allclose(np.asarray(RECALL(q, k, None, c)), 1.0, atol=1e-6)
  w = sa.window_layout(16, 16, 4, block_q=4, block_kv=4)
  rw = np.asarray(RECALL(q, k, None, w))
  assert rw.shape == (1, 4) and np.all(rw < 1.0) and np.all(rw > 0.2)
  top = TOPK(q, to_bksd(k), block_q=4, block_kv=4, k=1, sinks=0, local=0)
  r1 = np.asarray(TOPK_RECALL(q, k, None, top, k=4))
  assert r1.shape == (1, 4) and np.all(r1 < 1.0)
  np.testing.assert_allclose(np.asarray(TOPK_RECALL(q, k, None, c, k=2)), 1.0)


# --- Selectors.

def test_parse_selector():
  assert sa.parse_selector("topk:k=8:block=64") == sa.TopK(k=8, block=64)
  assert sa.parse_selector("hip:k=4:block=32:dense_layers=0") == sa.HiP(
      k=4, block=32, dense_layers=(0,))
  assert sa.parse_selector("sale:tau=0.01:max_blocks=16:block=64") == sa.SALE(
      tau=0.01, max_blocks=16, block=64)
  assert sa.parse_selector("topk:pool=mean:dense_layers=0,1").dense_layers == (0, 1)
  assert hash(sa.SALE(tau=[0.1, 0.2])) == hash(sa.SALE(tau=(0.1, 0.2)))
  with pytest.raises(ValueError, match="valid: topk, hip, sale"):
    sa.parse_selector("quest:k=2")
  with pytest.raises(ValueError, match="valid options: k=.*block="):
    sa.parse_selector("topk:kk=2")
  with pytest.raises(ValueError, match="TopK.k=0 must be an int >= 1"):
    sa.parse_selector("topk:k=0")
  with pytest.raises(ValueError, match="SALE.tau"):
    sa.SALE(tau=1.5)
  with pytest.raises(ValueError, match="HiP.dense_layers"):
    sa.HiP(dense_layers=(-1,))
  with pytest.raises(ValueError, match="TopK.pool"):
    sa.TopK(pool="sum")


CFG = model.get_preset("test")
PROMPTS = [[5, 17, 33, 2, 90, 11, 7, 8, 9, 10, 3], [100, 4, 4]]


@pytest.fixture(scope="module")
def params():
  return random_params(CFG)


def test_selectors_call_builders():
  q, k, _ = qkv(t=1, s=16)
  mask = AttentionMask(q_positions=jnp.asarray([[13]]))
  kb = to_bksd(k)
  pairs = [(sa.TopK(k=2, block=4, pool="mean"),
            sa.topk_layout(q, kb, mask, block_q=1, block_kv=4, k=2, pool="mean")),
           (sa.HiP(k=9, block=2, sinks=2), sa.hip_layout(q, kb, mask, block_q=1, block_kv=2,
                                                        k=8, sinks=2)),  # k clamped to Sb
           (sa.SALE(tau=0.1, max_blocks=3, block=4),
            sa.sale_layout(q, kb, mask, block_q=1, block_kv=4, tau=0.1, max_blocks=3))]
  for sel, want in pairs:
    got = sel(q, kb, mask, 0)
    assert lists(got, 0, 1) == lists(want, 0, 1) and got.heads == 2
    assert dataclasses.replace(sel, dense_layers=(0,))(q, kb, mask, 0) is None


def test_selector_wired_into_cache(params):
  tokens = jnp.asarray([[5, 17, 33, 2, 90, 11, 7, 8, 9, 10, 3, 12, 14, 1, 2, 60]])

  def logits(sel):
    dec = model.Decoder(CFG, attn_select=sel)
    return np.asarray(jax.jit(dec)(params, tokens, dec.init_cache(1, 32))[0])

  dense = logits(None)
  np.testing.assert_allclose(logits(sa.TopK(k=64, block=4)), dense, atol=1e-4)  # k >= Sb
  sel = sa.TopK(k=1, block=4, dense_layers=(1,))
  q, k = jnp.ones((1, 4, 4, 16)), jnp.ones((1, 2, 8, 16))
  assert sel(q, k, None, 1) is None and sel(q, k, None, 0) is not None
  assert not np.allclose(logits(sa.TopK(k=1, block=2, sinks=0)), dense, atol=1e-3)


@pytest.fixture(scope="module")
def dense_tokens(params):
  return np.asarray(decoding.generate(params, PROMPTS, model.Decoder(CFG),
                                      max_new_tokens=6).tokens)


def test_selector_generate_equals_dense(params, dense_tokens):
  """Greedy decode (ragged prefill, then 1-token steps) through a cache carrying TopK with
  k >= the cache's kv blocks: every step's layout keeps every visible block."""
  out = decoding.generate(params, PROMPTS, model.Decoder(CFG, attn_select=sa.TopK(k=64,
                                                                                  block=4)),
                          max_new_tokens=6)
  np.testing.assert_array_equal(np.asarray(out.tokens), dense_tokens)

"""KV-cache eviction (model.kv_evict + sparsity.eviction): exactness when nothing is evicted,
budget / sink / window invariants, H2O and SnapKV selection against NumPy brute force, ragged
rows, quantized caches, beam search, speculative decoding, and input validation."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import decoding
import model
from model import kv_evict
from model.attention import attend, context, finish
from model.kv_cache import KVCache
from sparsity.eviction import H2O, SnapKV, StreamingLLM, parse_policy
from tests.decoding.conftest import CFG, PROMPTS, random_params

BIG = H2O(32, sinks=2, window=4)  # >= every prompt + new tokens below: nothing is evicted
SMALL = dict(sinks=2, window=4)


@pytest.fixture(scope="module")
def params():
  return random_params(CFG)


def _np(x):
  return np.asarray(x)


# --- Attention-level brute force: one layer, hand-built caches.


def _one_layer(policy, b, kh, dh, s, layout="heads_major"):
  if layout == "heads_major":
    inner = KVCache(k=(jnp.zeros((b, kh, dh, s)),), v=(jnp.zeros((b, kh, s, dh)),),
                    lengths=jnp.zeros((b,), jnp.int32))
  else:
    z = jnp.zeros((b, s, kh, dh))
    inner = KVCache(k=(z,), v=(z,), lengths=jnp.zeros((b,), jnp.int32), layout=layout)
  return kv_evict.EvictingCache.wrap(inner, policy, 64)


@jax.jit
def _forward_jit(cache, q, k, v):
  b, t = q.shape[:2]
  ctx = context(b, t, cache=cache)
  out, ctx = attend(ctx, 0, q, k, v, impl="xla")
  return out, finish(ctx, t)


def _forward(cache, q, k, v):
  """One layer's attend + finish: (out, cache with lengths advanced)."""
  out, cache = _forward_jit(cache, jnp.asarray(q), jnp.asarray(k), jnp.asarray(v))
  return _np(out), cache


def _np_probs(q_TKGD, keys_SKD, qpos, kpos):
  """softmax(q.k / sqrt(Dh)) over visible keys (kpos <= qpos): [K, G, T, S]."""
  dh = q_TKGD.shape[-1]
  lg = np.einsum("tkgd,skd->kgts", q_TKGD, keys_SKD) / np.sqrt(dh)
  lg = np.where(kpos[None, None, None, :] <= qpos[None, None, :, None], lg, -np.inf)
  p = np.exp(lg - lg.max(-1, keepdims=True))
  return p / p.sum(-1, keepdims=True)


def _expected_keep(score, cur, budget, sinks, window):
  """Positions kept: protected (sinks, recent window) + the top scores of the rest."""
  pos = np.arange(cur)
  prot = (pos < sinks) | (pos >= cur - window)
  if cur <= budget:
    return set(pos.tolist())
  rest = pos[~prot]
  top = rest[np.argsort(-score[rest], kind="stable")[:budget - prot.sum()]]
  return set(pos[prot].tolist()) | set(top.tolist())


def _held(cache, b, k):
  p = _np(cache.pos[0][b, k])
  return p[p >= 0]


def _snap_scores(col, cur, obs_window, pool):
  """SnapKV's pooled scores (max pooling) of one (row, kv head): col [T] summed attention."""
  start = cur - obs_window
  t = len(col)
  x = np.where(np.arange(t) < start, col, 0.0)
  left = pool // 2
  pooled = np.array([x[max(0, j - left):j - left + pool].max() for j in range(t)])
  return np.where(np.arange(t) < start, pooled, col)


@pytest.mark.parametrize("policy", [H2O(10, sinks=1, window=3),
                                    SnapKV(10, sinks=1, window=3, obs_window=4, pool=3)])
def test_prefill_selection_matches_numpy(policy):
  """A 24-token prefill into 10 slots: kept positions and scores = brute force, per head."""
  b, kh, g, dh, t = 2, 2, 2, 8, 24
  rng = np.random.RandomState(0)
  q = rng.randn(b, t, kh * g, dh).astype(np.float32)
  k = rng.randn(b, t, kh, dh).astype(np.float32)
  v = rng.randn(b, t, kh, dh).astype(np.float32)
  limit = np.array([t, 19], np.int32)  # row 1: positions >= 19 are padding
  cache = _one_layer(policy, b, kh, dh, policy.budget).with_limit(jnp.asarray(limit))
  out, cache = _forward(cache, q, k, v)
  pos = np.arange(t)
  differ = False
  for r in range(b):
    cur = int(limit[r])
    probs = _np_probs(q[r].reshape(t, kh, g, dh), k[r], pos, pos)  # [K, G, T, S]
    want_out = np.einsum("kgts,skd->tkgd", probs, v[r]).reshape(t, kh * g, dh)
    np.testing.assert_allclose(out[r], want_out, atol=2e-5)
    col_all = probs.sum(1)  # [K, T, S]
    kept = []
    for hd in range(kh):
      valid_q = pos < cur
      if isinstance(policy, H2O):
        score = col_all[hd][valid_q].sum(0)
      else:
        obs = valid_q & (pos >= cur - policy.obs_window)
        score = _snap_scores(col_all[hd][obs].sum(0), cur, policy.obs_window, policy.pool)
      want = _expected_keep(score[:cur], cur, policy.budget, policy.sinks, policy.window)
      got = _held(cache, r, hd)
      assert set(got.tolist()) == want and len(got) == policy.budget
      slot_pos = _np(cache.pos[0][r, hd])
      np.testing.assert_allclose(_np(cache.score[0][r, hd]), score[slot_pos], rtol=1e-4,
                                 atol=1e-6)
      kept.append(want)
    differ |= kept[0] != kept[1]
  assert differ  # heads keep different tokens
  assert (_np(cache.pos[0][1]) < 19).all()  # padding never kept


def test_h2o_hand_made_case_evicts_least_attended():
  """4 slots, sink 1, window 2: after a full prefill, the next token evicts whichever of
  tokens 1, 2 received less attention; the key pointing away from every query loses."""
  pol = H2O(4, sinks=1, window=2)
  q = np.tile(np.array([1.0, 0.0], np.float32), (1, 4, 1, 1))  # [1, 4, H=1, 2]
  v = np.eye(4, 2, dtype=np.float32)[None, :, None]
  for low in (1, 2):
    keys = np.zeros((1, 4, 1, 2), np.float32)
    keys[0, 3 - low, 0, 0] = 3.0  # the other token: attended
    keys[0, low, 0, 0] = -3.0  # attended least
    cache = _one_layer(pol, 1, 1, 2, 4)
    _, cache = _forward(cache, q, keys, v)
    np.testing.assert_array_equal(_np(cache.pos[0][0, 0]), [0, 1, 2, 3])
    _, cache = _forward(cache, q[:, :1], np.zeros((1, 1, 1, 2), np.float32), v[:, :1])
    want = [0, 1, 2, 3]
    want[low] = 4  # the new token takes the evicted token's slot
    np.testing.assert_array_equal(_np(cache.pos[0][0, 0]), want)


@pytest.mark.parametrize("layout", ["heads_major", "seq_major"])
def test_h2o_decode_matches_numpy_simulation(layout):
  """Prefill 9 tokens, then 8 decode steps into 8 slots: every step's output, held set and
  scores equal a NumPy H2O simulation (per row and kv head)."""
  pol = H2O(8, sinks=1, window=3)
  b, kh, g, dh, t0, steps = 2, 2, 2, 4, 9, 8
  n = t0 + steps
  rng = np.random.RandomState(1)
  q = rng.randn(b, n, kh * g, dh).astype(np.float32)
  k = rng.randn(b, n, kh, dh).astype(np.float32)
  v = rng.randn(b, n, kh, dh).astype(np.float32)
  cache = _one_layer(pol, b, kh, dh, pol.budget, layout)
  _, cache = _forward(cache, q[:, :t0], k[:, :t0], v[:, :t0])
  # NumPy state: held positions and accumulated scores per (row, head).
  held = {}
  score = {}
  for r in range(b):
    pos = np.arange(t0)
    probs = _np_probs(q[r, :t0].reshape(t0, kh, g, dh), k[r, :t0], pos, pos).sum(1)
    for hd in range(kh):
      sc = probs[hd].sum(0)
      held[r, hd] = sorted(_expected_keep(sc, t0, pol.budget, pol.sinks, pol.window))
      score[r, hd] = {p: sc[p] for p in held[r, hd]}
  for i in range(t0, n):
    out, cache = _forward(cache, q[:, i:i + 1], k[:, i:i + 1], v[:, i:i + 1])
    for r in range(b):
      qr = q[r, i].reshape(kh, g, dh)
      for hd in range(kh):
        keys = held[r, hd] + [i]
        lg = np.einsum("gd,sd->gs", qr[hd], k[r, keys, hd]) / np.sqrt(dh)
        p = np.exp(lg - lg.max(-1, keepdims=True))
        p /= p.sum(-1, keepdims=True)
        np.testing.assert_allclose(out[r, 0, hd * g:(hd + 1) * g], p @ v[r, keys, hd],
                                   atol=2e-5)
        sc = {key: score[r, hd].get(key, 0.0) + p[:, j].sum() for j, key in enumerate(keys)}
        cand = np.array(keys)
        prot = (cand < pol.sinks) | (cand >= i + 1 - pol.window)
        if len(keys) > pol.budget:
          rest = [c for c in cand[~prot]]
          drop = min(rest, key=lambda c: sc[c])
          keys = [c for c in keys if c != drop]
        held[r, hd] = sorted(keys)
        score[r, hd] = {c: sc[c] for c in keys}
        got = _held(cache, r, hd)
        assert sorted(got.tolist()) == held[r, hd]
        slot_sc = _np(cache.score[0][r, hd])[_np(cache.pos[0][r, hd]) >= 0]
        np.testing.assert_allclose(slot_sc, [score[r, hd][c] for c in got], rtol=1e-4)


def test_cache_api_with_lengths_take_nbytes():
  cache = _one_layer(BIG, 3, 2, 4, 8)
  rng = np.random.RandomState(2)
  x = lambda t: rng.randn(3, t, 2, 4).astype(np.float32)
  _, cache = _forward(cache, rng.randn(3, 6, 4, 4).astype(np.float32), x(6), x(6))
  assert cache.slots == cache.read_len == 8 and cache.max_len == 64 and cache.batch == 3
  assert (cache.n_layers, cache.kv_heads, cache.head_dim) == (1, 2, 4)
  assert cache.nbytes == cache.cache.nbytes + 2 * 3 * 2 * 8 * 4
  rolled = cache.with_lengths(jnp.array([6, 3, 0]))
  assert (_np(rolled.pos[0][1]) < 3).all() and (_np(rolled.pos[0][2]) == -1).all()
  assert ((_np(rolled.pos[0][1]) >= 0).sum(-1) == 3).all()
  assert (_np(rolled.score[0])[_np(rolled.pos[0]) < 0] == 0).all()
  np.testing.assert_array_equal(_np(rolled.positions(2)), [[6, 7], [3, 4], [0, 1]])
  taken = rolled.take(jnp.array([1, 1, 0]))
  np.testing.assert_array_equal(_np(taken.pos[0][0]), _np(rolled.pos[0][1]))
  np.testing.assert_array_equal(_np(taken.lengths), [3, 3, 6])


# --- Whole-model decoding.


@functools.cache
def _apply():
  return jax.jit(lambda p, t, cache: model.apply(CFG, p, t, cache=cache))


def _stepwise_logits(params, cache, tokens, prefill):
  logits, cache = _apply()(params, tokens[:, :prefill], cache)
  out = [logits]
  for i in range(prefill, tokens.shape[1]):
    logits, cache = _apply()(params, tokens[:, i:i + 1], cache)
    out.append(logits)
  return np.asarray(jnp.concatenate(out, axis=1))


def test_no_eviction_logits_equal_plain_cache(params):
  """seq_major, one row (the plain cache's attend-then-write path); generate below covers
  heads_major with several rows."""
  layout, batch = "seq_major", 1
  tokens = jax.random.randint(jax.random.key(3), (batch, 14), 0, CFG.vocab_size)
  plain = model.Decoder(CFG).init_cache(batch, 32, layout=layout)
  ev = model.Decoder(CFG, evict=SnapKV(16, sinks=2, window=4, obs_window=4, pool=3))
  ev = ev.init_cache(batch, 32, layout=layout)
  assert ev.slots == 16 and ev.max_len == 32
  want = _stepwise_logits(params, plain, tokens, 8)
  np.testing.assert_allclose(_stepwise_logits(params, ev, tokens, 8), want, atol=1e-5)


def test_no_eviction_generate_equals_plain(params):
  policy = BIG
  plain = decoding.generate(params, PROMPTS, model.Decoder(CFG), max_new_tokens=12)
  ev = decoding.generate(params, PROMPTS, model.Decoder(CFG, evict=policy), max_new_tokens=12)
  np.testing.assert_array_equal(ev.tokens, plain.tokens)
  np.testing.assert_allclose(ev.logprobs, plain.logprobs, atol=1e-5)
  assert isinstance(ev.cache, model.EvictingCache) and ev.cache.slots == 32
  assert (ev.finish_reason == decoding.Finish.MAX_TOKENS).all()
  # Sampled (same keys, same compilation): the same draws.
  sampler = decoding.Sampler.create(len(PROMPTS), temperature=1.0, top_p=0.9)
  kw = dict(max_new_tokens=12, sampler=sampler, key=jax.random.key(7))
  plain = decoding.generate(params, PROMPTS, model.Decoder(CFG), **kw)
  ev = decoding.generate(params, PROMPTS, model.Decoder(CFG, evict=policy), **kw)
  np.testing.assert_array_equal(ev.tokens, plain.tokens)
  np.testing.assert_allclose(ev.logprobs, plain.logprobs, atol=1e-5)


def _check_invariants(cache, policy):
  lengths = _np(cache.lengths)
  for pos in cache.pos:
    pos = _np(pos)
    for r in range(pos.shape[0]):
      n = int(lengths[r])
      sinks = set(range(min(policy.sinks, n)))
      window = set(range(max(0, n - policy.window), n))
      for hd in range(pos.shape[1]):
        p = pos[r, hd][pos[r, hd] >= 0]
        assert len(p) == min(policy.budget, n) == len(set(p.tolist()))
        assert (p < n).all() and sinks <= set(p.tolist()) and window <= set(p.tolist())
        if isinstance(policy, StreamingLLM):
          assert set(p.tolist()) == sinks | set(range(n - policy.budget + policy.sinks, n))


@pytest.mark.parametrize("policy", [H2O(12, **SMALL),
                                    SnapKV(12, **SMALL, obs_window=4, pool=3),
                                    StreamingLLM(12, sinks=2)])
def test_long_generate_keeps_budget_sinks_and_window(params, policy):
  out = decoding.generate(params, PROMPTS, model.Decoder(CFG, evict=policy), max_new_tokens=30)
  assert (out.lengths == 30).all() and (out.finish_reason == decoding.Finish.MAX_TOKENS).all()
  np.testing.assert_array_equal(out.cache.lengths, [len(p) + 29 for p in PROMPTS])
  _check_invariants(out.cache, policy)


def test_ragged_rows_do_not_depend_on_other_rows(params):
  dec = model.Decoder(CFG, evict=H2O(12, **SMALL))
  p = PROMPTS[2]  # 9 tokens: alone its prefill bucket is 16; next to 20 tokens, 32
  longer = list(range(3, 23))
  alone = decoding.generate(params, [p], dec, max_new_tokens=16)
  both = decoding.generate(params, [longer, p], dec, max_new_tokens=16)
  np.testing.assert_array_equal(both.tokens[1], alone.tokens[0])
  np.testing.assert_allclose(both.logprobs[1], alone.logprobs[0], atol=1e-5)


@pytest.mark.parametrize("fmt", ["int8", "int4", "fp8"])
def test_quantized_cache_with_eviction(params, fmt):
  """int8: nothing evicted = the plain int8 cache; every format: eviction moves codes and
  scales together (a small budget stays consistent)."""
  cfg = CFG.replace(kv_quant=fmt)
  if fmt == "int8":
    plain = decoding.generate(params, PROMPTS, model.Decoder(cfg), max_new_tokens=10)
    ev = decoding.generate(params, PROMPTS, model.Decoder(cfg, evict=BIG), max_new_tokens=10)
    np.testing.assert_array_equal(ev.tokens, plain.tokens)
    np.testing.assert_allclose(ev.logprobs, plain.logprobs, atol=1e-5)
  pol = H2O(8, sinks=1, window=3)
  small = decoding.generate(params, PROMPTS, model.Decoder(cfg, evict=pol), max_new_tokens=20)
  assert np.isfinite(small.logprobs).all()
  _check_invariants(small.cache, pol)
  c = small.cache.cache
  assert c.quant == fmt
  scale = _np(c.k_scale[0])  # [B, K, S]: a filled slot's scale is that of its token
  assert ((scale > 0) == (_np(small.cache.pos[0]) >= 0)).all()


def test_beam_search_with_eviction(params):
  prompts = PROMPTS[:2]
  plain = decoding.beam_search(params, prompts, model.Decoder(CFG), beam_width=3,
                               max_new_tokens=8)
  ev = decoding.beam_search(params, prompts, model.Decoder(CFG, evict=BIG), beam_width=3,
                            max_new_tokens=8)
  np.testing.assert_array_equal(ev.tokens, plain.tokens)
  np.testing.assert_allclose(ev.scores, plain.scores, atol=1e-5)


def test_speculative_with_eviction(params):
  dparams = random_params(CFG, seed=1)
  kw = dict(max_new_tokens=12, gamma=3)
  # Greedy speculative decoding emits the target's greedy tokens: those of plain generate.
  plain = decoding.generate(params, PROMPTS, model.Decoder(CFG), max_new_tokens=12)
  ev = decoding.speculative_generate(params, dparams, PROMPTS, target_step_fn=model.Decoder(
      CFG, evict=BIG), draft_step_fn=model.Decoder(CFG, evict=BIG), **kw)
  np.testing.assert_array_equal(ev.tokens, plain.tokens)  # rollback is exact: no eviction
  np.testing.assert_allclose(ev.logprobs, plain.logprobs, atol=1e-5)
  small = H2O(8, sinks=1, window=3)
  out = decoding.speculative_generate(params, dparams, PROMPTS, target_step_fn=model.Decoder(
      CFG, evict=small), draft_step_fn=model.Decoder(CFG), **kw)
  assert (out.lengths == 12).all() and np.isfinite(out.logprobs).all()


# --- Validation.


def test_policy_validation_and_parsing():
  with pytest.raises(ValueError, match=r"budget=5.*minimum is 37"):
    H2O(5)
  with pytest.raises(ValueError, match=r"budget=3.*minimum is 5"):
    StreamingLLM(3, sinks=4)
  with pytest.raises(ValueError, match="sinks"):
    SnapKV(64, sinks=-1)
  with pytest.raises(ValueError, match="pooling"):
    SnapKV(64, pooling="median")
  assert parse_policy("h2o:budget=256:sinks=4:window=32") == H2O(256, 4, 32)
  assert parse_policy("snapkv:budget=64:pool=5:pooling=avg") == SnapKV(64, pool=5,
                                                                       pooling="avg")
  assert parse_policy("streamingllm:budget=16:sinks=2") == StreamingLLM(16, 2)
  assert parse_policy("none") is None
  for bad, msg in [("lru:budget=8", "unknown eviction policy"), ("h2o:budget=x", "integer"),
                   ("h2o:bogus=1:budget=64", "bad entry"), ("h2o:sinks=1", "needs budget"),
                   ("h2o:budget=8", "minimum is 37")]:
    with pytest.raises(ValueError, match=msg):
      parse_policy(bad)
  with pytest.raises(ValueError, match="eviction policy"):
    model.Decoder(CFG, evict="h2o:budget=64")
  with pytest.raises(ValueError, match="cannot be combined"):
    model.Decoder(CFG, attn_select=lambda *a: None, evict=BIG)
  with pytest.raises(ValueError, match="max_seq_len"):
    model.Decoder(CFG, evict=BIG).init_cache(1, CFG.max_seq_len + 1)
  with pytest.raises(ValueError, match=r"budget=\d+ exceeds the model's max_seq_len"):
    model.Decoder(CFG, evict=H2O(CFG.max_seq_len + 1))
  with pytest.raises(ValueError, match="exceeds the policy's budget=32"):
    _one_layer(BIG, 1, 1, 2, 33)

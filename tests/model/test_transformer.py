"""Invariants of the Llama-family decoder on tiny configs."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import model
from model import init_cache

CFG = model.get_preset("test")


@pytest.fixture(scope="module")
def params():
  return model.init(CFG, jax.random.key(0))


def _tokens(b, t, seed=1, vocab=CFG.vocab_size):
  return jax.random.randint(jax.random.key(seed), (b, t), 0, vocab)


def test_shapes_and_finite(params):
  logits, cache = model.apply(CFG, params, _tokens(3, 17))
  assert logits.shape == (3, 17, CFG.vocab_size)
  assert cache is None
  assert bool(jnp.isfinite(logits).all())


def test_causal_via_gradients():
  """d logits[t] / d embedding(x[s]) is zero exactly when s > t (untied head)."""
  cfg = CFG.replace(tie_embeddings=False)
  p0 = model.init(cfg, jax.random.key(0))
  tokens = (jnp.arange(8) + 10)[None]  # distinct ids: embedding row r <-> position r - 10

  def logits_at(t, emb):
    p = dict(p0, embed={"embedding": emb})
    return model.apply(cfg, p, tokens)[0][0, t].sum()

  for t in (0, 3, 7):
    g = jax.grad(logits_at, argnums=1)(t, p0["embed"]["embedding"])[10:18]
    norms = np.asarray(jnp.abs(g).sum(-1))
    assert (norms[: t + 1] > 0).all(), (t, norms)
    assert (norms[t + 1 :] == 0).all(), (t, norms)


def test_packed_segments_do_not_attend_across(params):
  """A packed row equals its segments run separately (with restarted positions)."""
  a, b = _tokens(1, 5, seed=2), _tokens(1, 7, seed=3)
  packed = jnp.concatenate([a, b], axis=1)
  seg = jnp.array([[1] * 5 + [2] * 7])
  pos = jnp.array([list(range(5)) + list(range(7))])
  got = model.apply(CFG, params, packed, positions=pos, segment_ids=seg)[0]
  want_a = model.apply(CFG, params, a)[0]
  want_b = model.apply(CFG, params, b)[0]
  np.testing.assert_allclose(got[:, :5], want_a, atol=1e-5)
  np.testing.assert_allclose(got[:, 5:], want_b, atol=1e-5)


@pytest.mark.parametrize("impl, b, layout", [
    ("xla", 2, "heads_major"), ("reference", 2, "heads_major"), ("xla", 1, "heads_major"),
    ("xla", 2, "seq_major"), ("xla", 1, "seq_major")])
def test_cached_equals_uncached(params, impl, b, layout):
  """Prefill 7, then chunks of 1, 3 and 1 tokens (b=1, 1 token: the read-before-write path)."""
  cfg = CFG.replace(attn_impl=impl)
  tokens = _tokens(b, 12)
  full = model.apply(cfg, params, tokens)[0]
  cache = init_cache(cfg, b, 32, layout=layout)
  step = jax.jit(lambda p, t, c: model.apply(cfg, p, t, cache=c))
  outs = []
  for lo, hi in ((0, 7), (7, 8), (8, 11), (11, 12)):
    logits, cache = step(params, tokens[:, lo:hi], cache)
    outs.append(logits)
  np.testing.assert_allclose(jnp.concatenate(outs, 1), full, atol=1e-5)
  assert cache.lengths.tolist() == [12] * b
  # The cache holds what a one-shot prefill writes (slots < 12).
  ref = model.apply(cfg, params, tokens, cache=init_cache(cfg, b, 32, layout=layout))[1]
  for got, want in zip(cache.k + cache.v, ref.k + ref.v, strict=True):
    np.testing.assert_allclose(got, want, atol=1e-5)


def test_ragged_cache_rows(params):
  """Rows advance independently: a short row in a batch equals itself alone."""
  long_, short = _tokens(1, 9, seed=4), _tokens(1, 4, seed=5)
  batch = jnp.concatenate([long_, jnp.pad(short, ((0, 0), (0, 5)))], 0)
  cache = init_cache(CFG, 2, 16)
  _, cache = model.apply(CFG, params, batch, cache=cache)
  cache = cache.replace(lengths=jnp.array([9, 4]))
  nxt = _tokens(2, 1, seed=6)
  logits, _ = model.apply(CFG, params, nxt, cache=cache)
  want_short = model.apply(CFG, params, jnp.concatenate([short, nxt[1:]], 1))[0][:, -1]
  want_long = model.apply(CFG, params, jnp.concatenate([long_, nxt[:1]], 1))[0][:, -1]
  np.testing.assert_allclose(logits[1, -1], want_short[0], atol=1e-5)
  np.testing.assert_allclose(logits[0, -1], want_long[0], atol=1e-5)


def test_gqa_with_k_equal_h_is_mha():
  """GQA with K = H equals explicit multi-head attention written in numpy."""
  b, t, h, dh = 2, 6, 4, 8
  ks = jax.random.split(jax.random.key(7), 3)
  q, k, v = (jax.random.normal(kk, (b, t, h, dh)) for kk in ks)
  mask = model.AttentionMask()
  got = model.attention(q, k, v, mask=mask, impl="xla")
  qn, kn, vn = (np.asarray(x, np.float64) for x in (q, k, v))
  s = np.einsum("bthd,bshd->bhts", qn, kn) / np.sqrt(dh)
  s = np.where(np.tril(np.ones((t, t), bool)), s, -np.inf)
  p = np.exp(s - s.max(-1, keepdims=True))
  p /= p.sum(-1, keepdims=True)
  want = np.einsum("bhts,bshd->bthd", p, vn)
  np.testing.assert_allclose(got, want, atol=1e-5)


def test_gqa_equals_repeated_kv():
  """K < H equals MHA with each kv head repeated for its query group."""
  b, t, h, kh, dh = 1, 5, 8, 2, 4
  ks = jax.random.split(jax.random.key(8), 3)
  q = jax.random.normal(ks[0], (b, t, h, dh))
  k, v = (jax.random.normal(kk, (b, t, kh, dh)) for kk in ks[1:])
  mask = model.AttentionMask()
  got = model.attention(q, k, v, mask=mask, impl="reference")
  rep = lambda x: jnp.repeat(x, h // kh, axis=2)
  want = model.attention(q, rep(k), rep(v), mask=mask, impl="reference")
  np.testing.assert_allclose(got, want, atol=1e-6)


def test_window_and_sinks_mask():
  mask = model.AttentionMask(window=3, sinks=1).materialize(1, 6, 6)[0]
  want = np.zeros((6, 6), bool)
  for i in range(6):
    for j in range(i + 1):
      want[i, j] = (i - j < 3) or j < 1
  np.testing.assert_array_equal(mask, want)


def test_lse_merge_is_exact():
  """Attention over [A; B] equals merging attention over A and over B by LSE."""
  ks = jax.random.split(jax.random.key(9), 3)
  q = jax.random.normal(ks[0], (1, 3, 2, 8))
  k, v = (jax.random.normal(kk, (1, 10, 2, 8)) for kk in ks[1:])
  full = model.AttentionMask(causal=False)
  want, want_lse = model.attention(q, k, v, mask=full, impl="reference", return_lse=True)
  oa, la = model.attention(q, k[:, :4], v[:, :4], mask=full, impl="reference", return_lse=True)
  ob, lb = model.attention(q, k[:, 4:], v[:, 4:], mask=full, impl="reference", return_lse=True)
  got, lse = model.merge_partials(oa, la, ob, lb)
  np.testing.assert_allclose(got, want, atol=1e-5)
  np.testing.assert_allclose(lse, want_lse, atol=1e-5)


@pytest.mark.parametrize("b, t, impl", [(1, 1, "xla"), (3, 4, "xla"), (2, 3, "reference")])
@pytest.mark.parametrize("layout", model.kv_cache.LAYOUTS)
def test_cache_attention_equals_reference(b, t, impl, layout):
  """Attention over a cache layer in either layout == the [B, S, K, Dh] reference."""
  rng = np.random.RandomState(b * 10 + t)
  q = jnp.asarray(rng.randn(b, t, 4, 8), jnp.float32)
  k, v = (jnp.asarray(rng.randn(b, 12, 2, 8), jnp.float32) for _ in range(2))
  mask = model.AttentionMask(q_positions=jnp.asarray(rng.randint(3, 12, (b, t))),
                             kv_positions=jnp.broadcast_to(jnp.arange(12), (b, 12)),
                             kv_valid=jnp.asarray(rng.rand(b, 12) > 0.2).at[:, 0].set(True))
  want, want_lse = model.attention(q, k, v, mask=mask, impl="reference", return_lse=True)
  cache = init_cache(CFG.replace(n_kv_heads=2, head_dim=8), b, 12, layout=layout)
  cache = cache.with_layer(0, *model.kv_cache.write_layer(cache, 0, k, v))
  assert (cache.batch, cache.max_len, cache.kv_heads, cache.head_dim) == (b, 12, 2, 8)
  got, lse = model.cache_attention(q, cache, 0, mask=mask, impl=impl, return_lse=True)
  np.testing.assert_allclose(got, want, atol=1e-5)
  np.testing.assert_allclose(lse, want_lse, atol=1e-5)
  plain = model.cache_attention(q, cache, 0, mask=mask, impl=impl)
  np.testing.assert_allclose(plain, want, atol=1e-5)


def test_cache_layout_is_picked_per_backend():
  assert model.cache_layout("cpu") == "heads_major"
  assert model.cache_layout("gpu") == model.cache_layout("tpu") == "seq_major"
  assert model.Decoder(CFG).init_cache(2, 8).layout == model.cache_layout()


def test_decoder_is_value_hashable_and_answers_dims():
  d = model.Decoder(CFG)
  assert d == model.Decoder(model.get_preset("test")) and hash(d) == hash(model.Decoder(CFG))
  assert d != model.Decoder(CFG.replace(n_layers=3))
  assert (d.n_heads, d.kv_heads, d.head_dim, d.n_layers, d.vocab_size) == (4, 2, 16, 2, 259)
  cache = d.init_cache(3, 16)
  assert (cache.batch, cache.max_len, cache.n_layers, cache.kv_heads, cache.head_dim) == (
      3, 16, 2, 2, 16)
  assert cache.nbytes == 2 * 2 * 3 * 16 * 2 * 16 * 4  # k and v, 2 layers, f32
  with pytest.raises(ValueError, match="max_seq_len=256"):
    d.init_cache(1, 257)


def test_hidden_states_and_unembed_compose_to_apply(params):
  tokens = _tokens(2, 6)
  x, _ = model.hidden_states(CFG, params, tokens)
  norm = model.layers.RMSNorm(CFG.norm_eps).apply({"params": params["final_norm"]}, x)
  np.testing.assert_allclose(model.unembed(CFG, params, norm), model.apply(CFG, params, tokens)[0],
                             atol=1e-5)
  # A cached run of the first layer writes layer 0 only.
  _, cache = model.hidden_states(CFG, params, tokens, n_layers=1, cache=init_cache(CFG, 2, 8))
  assert float(jnp.abs(cache.k[0]).sum()) > 0 and float(jnp.abs(cache.k[1]).sum()) == 0
  assert cache.lengths.tolist() == [6, 6]
  with pytest.raises(ValueError, match="n_layers=3"):
    model.hidden_states(CFG, params, tokens, n_layers=3)


def test_llama_3_2_1b_param_count():
  shapes = model.param_shapes(model.get_preset("llama-3.2-1b"))
  assert model.count_params(shapes) == 1_235_814_400


def test_qk_norm_bias_untied_variant_runs():
  cfg = CFG.replace(qk_norm=True, qkv_bias=True, tie_embeddings=False, head_dim=24)
  p = model.init(cfg, jax.random.key(3))
  assert p["layers_0"]["attn"]["q"]["kernel"].shape == (64, 4 * 24)
  assert "bias" in p["layers_0"]["attn"]["k"] and "q_norm" in p["layers_0"]["attn"]
  assert p["lm_head"]["kernel"].shape == (64, cfg.vocab_size)
  logits, _ = model.apply(cfg, p, _tokens(1, 5))
  assert bool(jnp.isfinite(logits).all())


def test_bf16_policy():
  cfg = CFG.replace(param_dtype="bfloat16", dtype="bfloat16")
  p = model.init(cfg, jax.random.key(0))
  assert all(x.dtype == jnp.bfloat16 for x in jax.tree.leaves(p))
  logits, _ = model.apply(cfg, p, _tokens(1, 5))
  assert logits.dtype == jnp.float32 and bool(jnp.isfinite(logits).all())


def test_wrong_param_shape_is_a_clear_error(params):
  p = jax.tree.map(lambda x: x, params)
  p["layers_0"]["mlp"]["up"]["kernel"] = jnp.zeros((64, 99))
  with pytest.raises(ValueError, match="layers_0/mlp/up/kernel"):
    model.apply(CFG, p, _tokens(1, 3))

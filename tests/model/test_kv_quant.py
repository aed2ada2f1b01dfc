"""KV-cache quantization (int8 / int4 / fp8) and smoothed int8 Q.K^T against float references."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import decoding
import model
from decoding import early_exit, shared_prefix, speculative
from model import kv_cache
from tests.decoding.conftest import PROMPTS, random_params

CFG = model.get_preset("test")  # 2 layers, 4 heads / 2 kv heads, Dh 16, vocab 259
FMTS = ("int8", "int4", "fp8")
LAYOUTS = ("heads_major", "seq_major")
# Max |logit - float-cache logit| over a 12-token prefill + 4 decode steps of the `test`
# preset with model.init weights (logit std ~1.0, max ~3.7). Measured: int8 0.049 (0.041
# with attn_qk="int8"), fp8 0.31, int4 0.60; bounds ~1.6-2x that.
BOUND = {"int8": 0.1, "int4": 1.0, "fp8": 0.5, "int8+qk": 0.1}


@pytest.fixture(scope="module")
def params():
  return model.init(CFG, jax.random.key(0))


def _tokens(b, t, seed=1):
  return jax.random.randint(jax.random.key(seed), (b, t), 0, CFG.vocab_size)


@functools.cache
def _apply(cfg):
  return jax.jit(lambda p, t, cache: model.apply(cfg, p, t, cache=cache))


def _decode_logits(cfg, params, tokens, layout, prefill=8):
  """Logits of a `prefill`-token cached forward, then one-token steps to the end."""
  b, t = tokens.shape
  cache = model.init_cache(cfg, b, 16, layout=layout)
  logits, cache = _apply(cfg)(params, tokens[:, :prefill], cache)
  out = [logits]
  for i in range(prefill, t):
    logits, cache = _apply(cfg)(params, tokens[:, i:i + 1], cache)
    out.append(logits)
  return jnp.concatenate(out, axis=1), cache


# --- Formats: codes, packing and the half-step bound.


@pytest.mark.parametrize("fmt", FMTS)
def test_quantize_within_half_a_step(fmt):
  x = np.random.RandomState(0).randn(3, 5, 2, 16).astype(np.float32)
  x[0, 0, 0] = 0.0  # an all-zero vector: scale 0, codes 0, exact
  c, s = kv_cache.quantize(jnp.asarray(x), fmt)
  assert s.shape == (3, 5, 2) and s.dtype == jnp.float32
  assert c.shape == (3, 5, 2, 8 if fmt == "int4" else 16)
  assert c.dtype == (jnp.float8_e4m3fn if fmt == "fp8" else jnp.int8)
  qmax = {"int8": 127, "int4": 7, "fp8": 448}[fmt]
  np.testing.assert_allclose(s, np.abs(x).max(-1) / qmax, rtol=1e-6)
  err = np.abs(np.asarray(kv_cache.dequantize(c, s, fmt, -1)) - x)
  s = np.asarray(s)[..., None]
  if fmt == "fp8":  # 3 mantissa bits: half an ulp is 2^-4 relative; subnormal ulp 2^-9
    assert (err <= 2.0 ** -4 * np.abs(x) + 2.0 ** -10 * s + 1e-7).all()
  else:
    assert (err <= 0.5 * s * (1 + 1e-5) + 1e-7).all()
    # Brute force: the codes are round(x / scale), packed low nibble first for int4.
    want = np.clip(np.round(x / np.where(s > 0, s, 1)), -qmax, qmax).astype(np.int32)
    np.testing.assert_array_equal(kv_cache.codes(c, fmt, -1), want)
    if fmt == "int4":
      byte = (want[..., 0::2] & 15) | ((want[..., 1::2] & 15) << 4)
      np.testing.assert_array_equal(np.asarray(c).view(np.uint8), byte)
  assert (err[0, 0, 0] == 0).all()


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("fmt", (*FMTS, "int8+qk"))
def test_cache_writes_within_half_a_step(params, fmt, layout):
  """Layer 0's stored k, v (dequantized, + the key mean) against a float cache's."""
  qcfg = CFG.replace(kv_quant=fmt[:4], attn_qk="int8" if fmt.endswith("qk") else None)
  tokens = _tokens(2, 12)
  want = _apply(CFG)(params, tokens, model.init_cache(CFG, 2, 16, layout=layout))[1]
  got = _apply(qcfg)(params, tokens, model.init_cache(qcfg, 2, 16, layout=layout))[1]
  hm = layout == "heads_major"
  ka = 2 if hm else 3
  k = kv_cache.dequantize(got.k[0], got.k_scale[0], got.quant, ka)
  v = kv_cache.dequantize(got.v[0], got.v_scale[0], got.quant, 3)
  if got.k_mean is not None:
    mean = got.k_mean[0][..., None] if hm else got.k_mean[0][:, None]
    k = k + mean
    # The mean is that of the prefill's keys.
    keys = jnp.transpose(want.k[0], (0, 3, 1, 2)) if hm else want.k[0]
    np.testing.assert_allclose(got.k_mean[0], keys[:, :12].mean(1), atol=1e-6)
  sk = jnp.expand_dims(got.k_scale[0], ka)
  sv = got.v_scale[0][..., None]
  # Compare the 12 written slots, as [B, S, K, Dh].
  to_bskd = ((lambda x, ax: jnp.moveaxis(x, ax, 1)) if hm else (lambda x, ax: x))
  step = 2.0 ** -4 if fmt == "fp8" else 0.5
  for q, f, s, ax in ((k, want.k[0], sk, 3), (v, want.v[0], sv, 2)):
    q, f, s = (to_bskd(x, ax)[:, :12] for x in (q, f, s))
    err = jnp.abs(q - f)
    bound = step * (jnp.abs(f) + 2.0 ** -6 * s) if fmt == "fp8" else step * s
    assert bool(jnp.all(err <= bound * (1 + 1e-5) + 1e-6))
    assert bool(jnp.any(err > 0))
  assert got.head_dim == CFG.dh and got.max_len == 16 and got.kv_heads == CFG.n_kv_heads
  assert got.lengths.tolist() == [12, 12]


# --- Cached decoding with a quantized cache against the float cache.


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("fmt", (*FMTS, "int8+qk"))
def test_cached_decode_close_to_float(params, fmt, layout):
  qcfg = CFG.replace(kv_quant=fmt[:4], attn_qk="int8" if fmt.endswith("qk") else None)
  tokens = _tokens(2, 12)
  want, _ = _decode_logits(CFG, params, tokens, layout)
  got, cache = _decode_logits(qcfg, params, tokens, layout)
  err = float(jnp.max(jnp.abs(got - want)))
  assert err < BOUND[fmt], err
  assert err > 1e-4  # the cache is really quantized
  # One row decodes by the attend-then-write path (a 1-row cache): same numbers.
  one, _ = _decode_logits(qcfg, params, tokens[:1], layout)
  np.testing.assert_allclose(one[0], got[0], atol=2e-5)
  assert cache.quant == fmt[:4]


@pytest.mark.parametrize("fmt", FMTS)
def test_reference_impl_is_the_oracle_of_the_folded_read(params, fmt):
  """impl="reference" dequantizes the cache to f32; "xla" folds the scales into the dots."""
  tokens = _tokens(2, 12)
  xla, _ = _decode_logits(CFG.replace(kv_quant=fmt), params, tokens, "heads_major")
  ref, _ = _decode_logits(CFG.replace(kv_quant=fmt, attn_impl="reference"), params, tokens,
                          "seq_major")
  np.testing.assert_allclose(xla, ref, atol=2e-5)


def test_quant_errors_order_by_precision(params):
  tokens = _tokens(2, 12)
  want, _ = _decode_logits(CFG, params, tokens, "heads_major")
  err = {f: float(jnp.max(jnp.abs(_decode_logits(CFG.replace(kv_quant=f), params, tokens,
                                                 "heads_major")[0] - want))) for f in FMTS}
  assert err["int8"] < err["fp8"] < err["int4"], err


def test_nbytes_counts_codes_and_scales():
  """test preset, B=2, S=16: 2 layers x (k, v) x B*K*S = 64 vectors of Dh=16 per buffer."""
  n = lambda **kw: model.init_cache(CFG.replace(**kw), 2, 16).nbytes
  vectors = 2 * 2 * 2 * 16 * 2  # layers * (k, v) * B * S * K
  assert n() == vectors * 16 * 4 == 16384  # f32
  assert model.init_cache(CFG, 2, 16, dtype=jnp.bfloat16).nbytes == 8192
  assert n(kv_quant="int8") == vectors * (16 + 4) == 5120  # int8 codes + an f32 scale
  assert n(kv_quant="fp8") == 5120
  assert n(kv_quant="int4") == vectors * (8 + 4) == 3072  # two codes per byte
  # k_mean: 2 layers x B x K x Dh f32.
  assert n(kv_quant="int8", attn_qk="int8") == 5120 + 2 * 2 * 2 * 16 * 4 == 5632
  c = model.init_cache(CFG.replace(kv_quant="int8"), 2, 16, dtype=jnp.bfloat16)
  assert c.nbytes == vectors * (16 + 2) and c.k[0].dtype == jnp.int8
  assert model.PrefixCache(prefix=c, suffix=c).nbytes == 2 * c.nbytes


def test_take_and_prefix_cache_carry_the_scales(params):
  qcfg = CFG.replace(kv_quant="int8", attn_qk="int8")
  cache = _apply(qcfg)(params, _tokens(2, 6), model.init_cache(qcfg, 2, 16))[1]
  t = cache.take(jnp.array([1, 1, 0]))
  for name in ("k", "v", "k_scale", "v_scale", "k_mean"):
    for got, src in zip(getattr(t, name), getattr(cache, name), strict=True):
      np.testing.assert_array_equal(got, src[jnp.array([1, 1, 0])])
  assert t.quant == "int8" and t.lengths.tolist() == [6, 6, 6]
  # A float cache has no scale buffers; its fields and nbytes are as before.
  f = model.init_cache(CFG, 2, 16)
  assert f.k_scale is None and f.v_scale is None and f.k_mean is None and f.quant is None


# --- K smoothing and int8 Q.K^T.


def _qkv(b=2, t=5, s=7, h=4, kh=2, dh=16, seed=0):
  r = np.random.RandomState(seed)
  q, k, v = (jnp.asarray(r.randn(b, n, x, dh), jnp.float32)
             for n, x in ((t, h), (s, kh), (s, kh)))
  return q, k + 3.0 * jnp.asarray(r.randn(b, 1, kh, dh), jnp.float32), v  # keys off-centre


def _mask(b, t, s):
  return model.AttentionMask(q_positions=jnp.broadcast_to(jnp.arange(s - t, s)[None], (b, t)),
                             kv_positions=jnp.broadcast_to(jnp.arange(s)[None], (b, s)))


@pytest.mark.parametrize("impl", ("xla", "reference"))
def test_k_smoothing_leaves_attention_unchanged(impl):
  """Keys minus any per-(row, kv head) vector: the same softmax(q.k), in float, to 1e-5."""
  q, k, v = _qkv()
  c = jnp.asarray(np.random.RandomState(5).randn(2, 1, 2, 16) * 4, jnp.float32)
  mask = _mask(2, 5, 7)
  a = model.attention(q, k, v, mask=mask, impl=impl)
  np.testing.assert_allclose(model.attention(q, k - c, v, mask=mask, impl=impl), a, atol=1e-5)
  # The int8 path smooths internally, so it is invariant too, and its lse is q.k's.
  a8, lse8 = model.attention(q, k, v, mask=mask, impl=impl, qk="int8", return_lse=True)
  b8 = model.attention(q, k - c, v, mask=mask, impl=impl, qk="int8")
  np.testing.assert_allclose(b8, a8, atol=1e-5)
  _, lse = model.attention(q, k, v, mask=mask, impl="reference", return_lse=True)
  np.testing.assert_allclose(lse8, lse, atol=0.05)


def test_int8_qk_against_brute_force():
  """numpy: int8 codes of q and of mean-centred k, integer dot, rescale, softmax, float P.V."""
  q, k, v = _qkv()
  mask = _mask(2, 5, 7)
  got = model.attention(q, k, v, mask=mask, qk="int8")
  qn, kn, vn = (np.asarray(x, np.float64) for x in (q, k, v))
  mean = kn.mean(1, keepdims=True)
  kc = kn - mean

  def codes(x):
    s = np.abs(x).max(-1, keepdims=True) / 127
    return np.clip(np.round(x / s), -127, 127), s

  qi, qs = codes(qn)
  ki, ks = codes(kc)
  kh = 2
  qi, qs, qn = (x.reshape(2, 5, kh, 2, -1) for x in (qi, qs, qn))
  scores = (np.einsum("btkgd,bskd->bkgts", qi, ki) * np.einsum("btkg,bsk->bkgts", qs[..., 0],
                                                                ks[..., 0])
            + np.einsum("btkgd,bkd->bkgt", qn, mean[:, 0])[..., None]) / 4.0
  m = np.asarray(mask.materialize(2, 5, 7))[:, None, None]
  scores = np.where(m, scores, -np.inf)
  p = np.exp(scores - scores.max(-1, keepdims=True))
  p /= p.sum(-1, keepdims=True)
  want = np.einsum("bkgts,bskd->btkgd", p, vn).reshape(2, 5, 4, 16)
  np.testing.assert_allclose(got, want, atol=1e-5)
  # ... and close to float attention.
  np.testing.assert_allclose(got, model.attention(q, k, v, mask=mask), atol=0.05)


def test_attn_qk_int8_logits_close_to_float(params):
  """Uncached forward: measured max |logit diff| 0.038 (logit std ~1)."""
  tokens = _tokens(2, 12)
  want = model.apply(CFG, params, tokens)[0]
  got = model.apply(CFG.replace(attn_qk="int8"), params, tokens)[0]
  err = float(jnp.max(jnp.abs(got - want)))
  assert 1e-5 < err < 0.08, err


# --- Every decoding method with kv_quant="int8".

DCFG = CFG
Q8 = DCFG.replace(kv_quant="int8")


@pytest.fixture(scope="module")
def dparams():
  return random_params(DCFG, seed=0)


def test_generate_greedy_int8_agrees_with_float(dparams):
  kw = dict(max_new_tokens=8)
  want = decoding.generate(dparams, PROMPTS, model.Decoder(DCFG), **kw)
  got = decoding.generate(dparams, PROMPTS, model.Decoder(Q8), **kw)
  np.testing.assert_array_equal(got.tokens, want.tokens)
  assert got.cache.quant == "int8" and got.cache.nbytes < want.cache.nbytes / 3
  # attn_qk rides along too.
  qk = decoding.generate(dparams, PROMPTS, model.Decoder(Q8.replace(attn_qk="int8")), **kw)
  assert (np.asarray(qk.tokens) == np.asarray(want.tokens)).mean() >= 0.9


def test_beam_search_runs_with_int8(dparams):
  dec = model.Decoder(Q8)
  greedy = decoding.generate(dparams, PROMPTS[:2], dec, max_new_tokens=6)
  out = decoding.beam_search(dparams, PROMPTS[:2], dec, beam_width=1, max_new_tokens=6)
  np.testing.assert_array_equal(out.tokens[:, 0], greedy.tokens)
  wide = decoding.beam_search(dparams, PROMPTS[:2], dec, beam_width=3, max_new_tokens=6)
  assert wide.tokens.shape[:2] == (2, 3) and bool(jnp.all(jnp.isfinite(wide.scores)))


def test_speculative_with_int8_equals_its_greedy(dparams):
  """Greedy speculative decoding is exact for its target: the int8-cache model's greedy."""
  draft_cfg = DCFG.replace(d_model=32, n_layers=1, n_heads=2, n_kv_heads=1, ffn_dim=64,
                           kv_quant="int8")
  dp = random_params(draft_cfg, seed=1)
  want = decoding.generate(dparams, PROMPTS, model.Decoder(Q8), max_new_tokens=8)
  out = speculative.speculative_generate(
      dparams, dp, PROMPTS, target_step_fn=model.Decoder(Q8),
      draft_step_fn=model.Decoder(draft_cfg), max_new_tokens=8, gamma=3)
  np.testing.assert_array_equal(out.tokens, want.tokens)
  # Early exit: the draft shares the target's quantized cache.
  head = early_exit.init_exit_head(DCFG, dparams)
  ee = early_exit.self_speculative_decode(Q8, early_exit.with_exit_head(dparams, head), 1,
                                          PROMPTS, max_new_tokens=8, gamma=2)
  np.testing.assert_array_equal(ee.tokens, want.tokens)


def test_shared_prefix_with_int8_equals_generate(dparams):
  prefix = [5, 17, 33, 2, 90, 11, 7, 64, 3]
  want = decoding.generate(dparams, [prefix], model.Decoder(Q8), max_new_tokens=6)
  out = shared_prefix.sample_shared_prefix(Q8, dparams, prefix, 3, max_new_tokens=6)
  for row in range(3):
    np.testing.assert_array_equal(out.tokens[row], want.tokens[0])
  assert out.cache.prefix.quant == "int8" and out.cache.suffix.quant == "int8"


# --- Config and bad input.


def test_config_round_trip_and_old_dicts():
  cfg = CFG.replace(kv_quant="int4", attn_qk="int8")
  assert model.ModelConfig.from_dict(cfg.to_dict()) == cfg
  old = {k: v for k, v in CFG.to_dict().items() if k not in ("kv_quant", "attn_qk")}
  back = model.ModelConfig.from_dict(old)
  assert back == CFG and back.kv_quant is None and back.attn_qk is None


def test_bad_input(params):
  with pytest.raises(ValueError, match=r"kv_quant='int3'; valid: None, 'int8', 'int4', 'fp8'"):
    CFG.replace(kv_quant="int3")
  with pytest.raises(ValueError, match=r"attn_qk='fp16'; valid: None, 'int8'"):
    CFG.replace(attn_qk="fp16")
  with pytest.raises(ValueError, match="gives head dim 15; RoPE needs an even head dim"):
    model.ModelConfig(d_model=60, n_heads=4, kv_quant="int4")
  for kvq in (None, "int4", "fp8"):
    with pytest.raises(ValueError, match=rf"attn_qk='int8'.*kv_quant={kvq!r}"):
      model.Decoder(CFG.replace(attn_qk="int8", kv_quant=kvq)).init_cache(1, 8)
  # A cache made for another config: the int8 Q.K^T path has no int8 codes to read.
  for kvq in (None, "int4"):
    with pytest.raises(ValueError, match=rf"needs a KV cache with kv_quant='int8'.*{kvq!r}"):
      model.apply(CFG.replace(attn_qk="int8"), params, _tokens(1, 2),
                  cache=model.init_cache(CFG.replace(kv_quant=kvq), 1, 8))
  q, k, v = _qkv()
  with pytest.raises(ValueError, match=r"qk='int4'; valid: None, 'int8'"):
    model.attention(q, k, v, mask=_mask(2, 5, 7), qk="int4")
  with pytest.raises(ValueError, match="KV quant format 'int2'"):
    kv_cache.quantize(k, "int2")

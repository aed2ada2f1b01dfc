"""LazyLLM: dense equality at keep 1, token counts, and an independent masked-forward oracle."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import model
from model.attention import AttentionMask, BlockLayout, Context
from model.transformer import Block, Transformer
from sparsity.lazyllm import (
    LazyLLM,
    lazy_decode_step,
    lazy_generate,
    lazy_prefill,
    revive,
)

CFG = model.get_preset("test", n_layers=3)
B, T, S = 2, 16, 24
PRUNE = LazyLLM(keep=(0.5, 0.25), stages=(1, 2))
# Jitted once per (config, policy): compiling beats op-by-op dispatch of the layer glue here.
_prefill = jax.jit(lazy_prefill, static_argnums=(0, 3))
_revive = jax.jit(revive, static_argnums=0)
_step = jax.jit(lazy_decode_step, static_argnums=0)


@pytest.fixture(scope="module")
def params():
  return model.init(CFG, jax.random.key(0))


@pytest.fixture(scope="module")
def tokens():
  return jnp.asarray(np.random.RandomState(0).randint(0, CFG.vocab_size, (B, T)), jnp.int32)


def _cache(cfg=CFG):
  return model.Decoder(cfg).init_cache(B, S)


def _keys_values(cache, layer):
  """Layer `layer` of a float cache as k, v [B, S, K, Dh]."""
  k, v = np.asarray(cache.k[layer]), np.asarray(cache.v[layer])
  return (np.moveaxis(k, 3, 1), np.moveaxis(v, 2, 1)) if cache.layout == "heads_major" else (k, v)


@jax.jit
def _oracle(params, tokens_BT, start_BT):
  """A full-length forward where at layer i query t sees key u <= t iff u is still present
  (start_u > i) or t is revived (start_t <= i): start = the first layer a token is missing
  from in the lazy prefill (n_layers if never). Built from model.transformer.Block."""
  cfg = CFG
  b, t = tokens_BT.shape
  cache = _cache(cfg)
  x = jnp.take(params["embed"]["embedding"], tokens_BT, axis=0)
  pos = jnp.broadcast_to(jnp.arange(t)[None], (b, t))
  causal = jnp.tril(jnp.ones((t, t), bool))[None]
  for i in range(cfg.n_layers):
    m = causal & ((start_BT[:, None, :] > i) | (start_BT[:, :, None] <= i))
    m = jnp.pad(m, ((0, 0), (0, 0), (0, S - t)))[:, None]
    layout = BlockLayout.from_block_mask(m, block_q=1, block_kv=1)
    mask = AttentionMask(q_positions=pos, kv_positions=jnp.broadcast_to(jnp.arange(S)[None],
                                                                         (b, S)), layout=layout)
    x, ctx = Block(cfg).apply({"params": params[f"layers_{i}"]}, x, Context(pos, mask, cache), i)
    cache = ctx.cache
  head = lambda m_, x_: m_.unembed(m_.final_norm(x_))
  return Transformer(cfg).apply({"params": params}, x, method=head), cache


def _start(aux, n_layers):
  st = np.asarray(aux.stages)
  j = np.asarray(aux.pruned_at)
  return np.where(j >= 0, st[np.maximum(j, 0)], n_layers)


@pytest.mark.parametrize("kv_quant", [None, "int8"])
def test_keep_all_equals_dense(params, tokens, kv_quant):
  cfg = CFG.replace(kv_quant=kv_quant)
  policy = LazyLLM(keep=(1.0,), stages=(2,))
  logits, cache, aux = _prefill(cfg, params, tokens, policy, cache=_cache(cfg))
  dense_logits, dense = model.apply(cfg, params, tokens, cache=_cache(cfg))
  # int8: jit and op-by-op round a few values to neighbouring codes (one step apart).
  tol = dict(atol=1e-5, rtol=1e-5) if kv_quant is None else dict(atol=1e-2)
  np.testing.assert_allclose(logits, dense_logits[:, -1], **tol)
  np.testing.assert_array_equal(cache.lengths, dense.lengths)
  for i in range(cfg.n_layers):
    for got, want in ((cache.k[i], dense.k[i]), (cache.v[i], dense.v[i])):
      got, want = np.asarray(got, np.float32), np.asarray(want, np.float32)
      if kv_quant is None:
        np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)
      else:
        assert np.max(np.abs(got - want)) <= 1 and np.mean(got == want) > 0.99
  assert aux.tokens_per_layer == (T,) * cfg.n_layers
  assert bool(jnp.all(aux.present[:, :, :T])) and not bool(jnp.any(aux.present[:, :, T:]))
  assert bool(jnp.all(aux.pruned_at == -1))
  if kv_quant is None:  # reviving "everything" when nothing was pruned changes nothing
    cache2, aux2 = _revive(cfg, params, cache, aux, jnp.ones((B, T), bool))
    for i in range(cfg.n_layers):
      np.testing.assert_array_equal(cache2.k[i], cache.k[i])
    np.testing.assert_array_equal(aux2.present, aux.present)


def test_pruning_counts_and_forced_tokens(params, tokens):
  sinks = 3
  policy = LazyLLM(keep=PRUNE.keep, stages=PRUNE.stages, sinks=sinks)
  _, cache, aux = _prefill(CFG, params, tokens, policy, cache=_cache())
  assert policy.counts(T) == (8, 4)
  assert aux.tokens_per_layer == (16, 8, 4)  # rows each layer ran
  counts = np.asarray(aux.present[:, :, :T]).sum(-1)  # slots each layer holds, per row
  np.testing.assert_array_equal(counts, [[16] * B, [8] * B, [4] * B])
  assert bool(jnp.all(aux.present[:, :, T - 1]))  # the last token is never pruned
  assert bool(jnp.all(aux.pruned_at[:, T - 1] == -1))
  assert bool(jnp.all(aux.present[:, :, :sinks]))  # and neither are the sinks
  # Progressive: a layer's slots are a subset of the previous layer's.
  p = np.asarray(aux.present)
  assert not np.any(p[1:] & ~p[:-1])
  # Absent slots were never written (zeros), and the aux cache holds exactly the pruned.
  k = np.asarray(cache.k[2])
  assert np.all(k[~np.broadcast_to(p[2][:, None, None], k.shape)] == 0)
  pruned = np.asarray(aux.pruned_at) >= 0
  assert pruned.sum() == B * (T - 4)
  assert np.all(np.any(np.asarray(aux.hidden) != 0, axis=(0, -1)) == pruned)


def test_prefill_and_revive_all_match_oracle(params, tokens):
  logits, cache, aux = _prefill(CFG, params, tokens, PRUNE, cache=_cache())
  start = _start(aux, CFG.n_layers)
  ref_logits, ref = _oracle(params, tokens, jnp.asarray(start))
  np.testing.assert_allclose(logits, ref_logits[:, -1], atol=1e-5, rtol=1e-5)
  present = np.asarray(aux.present)
  for i in range(CFG.n_layers):  # present slots: as the oracle computed them
    (k, v), (rk, rv) = _keys_values(cache, i), _keys_values(ref, i)
    np.testing.assert_allclose(k[present[i]], rk[present[i]], atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(v[present[i]], rv[present[i]], atol=1e-5, rtol=1e-5)
  # Revive every pruned token: every layer holds every prompt slot, as the oracle's.
  cache, aux = _revive(CFG, params, cache, aux, jnp.ones((B, T), bool))
  assert bool(jnp.all(aux.present[:, :, :T])) and bool(jnp.all(aux.pruned_at == -1))
  for i in range(CFG.n_layers):
    (k, v), (rk, rv) = _keys_values(cache, i), _keys_values(ref, i)
    np.testing.assert_allclose(k[:, :T], rk[:, :T], atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(v[:, :T], rv[:, :T], atol=1e-5, rtol=1e-5)
  # Pruning changed something (else the oracle test is vacuous).
  dense_logits, _ = model.apply(CFG, params, tokens)
  assert np.max(np.abs(np.asarray(logits) - np.asarray(dense_logits[:, -1]))) > 1e-3
  # The revived cache is an ordinary full cache: a model.Decoder step reads it directly.
  nxt = jnp.argmax(logits, -1)[:, None].astype(jnp.int32)
  step_logits, _ = jax.jit(model.Decoder(CFG).__call__)(params, nxt, cache)
  lazy_logits, _, _ = _step(CFG, params, nxt, cache, aux)
  np.testing.assert_allclose(lazy_logits, step_logits[:, -1], atol=1e-5, rtol=1e-5)


def test_revive_positions_subset(params, tokens):
  _, cache, aux = _prefill(CFG, params, tokens, PRUNE, cache=_cache())
  pruned = np.asarray(aux.pruned_at) >= 0
  pick = np.stack([np.flatnonzero(row)[:2] for row in pruned]).astype(np.int32)
  cache2, aux2 = _revive(CFG, params, cache, aux, jnp.asarray(pick))
  gained = np.asarray(aux2.present) & ~np.asarray(aux.present)
  rows = np.arange(B)[:, None]
  assert np.all(gained[:, rows, pick].any(axis=0))  # each picked token gained layers
  picked = np.zeros((B, S), bool)
  picked[rows, pick] = True
  np.testing.assert_array_equal(gained.any(axis=0), picked)  # ...and only the picked ones
  assert np.all(np.asarray(aux2.pruned_at)[rows, pick] == -1)


def test_lazy_generate(params, tokens):
  n = 4
  out = lazy_generate(params, tokens, CFG, LazyLLM(keep=(1.0,), stages=(1,)),
                      max_new_tokens=n)
  # Greedy, checked by one uncached teacher-forced forward over prompt + output.
  seq = jnp.concatenate([tokens, out.tokens[:, :-1]], axis=1)
  ref = jax.jit(lambda s: model.apply(CFG, params, s)[0])(seq)
  np.testing.assert_array_equal(out.tokens, jnp.argmax(ref[:, T - 1:], -1))
  assert out.cache.lengths.tolist() == [T + n - 1] * B
  # topk: each step revives up to 2 tokens per stage (the prefill leaves B * (T - 4) pruned).
  o = lazy_generate(params, tokens, CFG, PRUNE, max_new_tokens=n, revive="topk", revive_k=2)
  assert o.tokens.shape == (B, n) and bool(jnp.all((o.tokens >= 0) & (o.tokens < 259)))
  left = np.asarray(o.aux.pruned_at >= 0).sum(-1)
  assert np.all(left >= T - 4 - 2 * 2 * (n - 1)) and np.all(left < T - 4)


def test_bad_inputs(params, tokens):
  for kw, field in [(dict(keep=(0.0,), stages=(1,)), "keep"),
                    (dict(keep=(1.5,), stages=(1,)), "keep"),
                    (dict(keep=(0.3, 0.5), stages=(1, 2)), "keep"),
                    (dict(keep=(0.5, 0.3), stages=(2, 1)), "stages"),
                    (dict(keep=(0.5,), stages=(0,)), "stages"),
                    (dict(keep=(0.5, 0.3), stages=(1,)), "stages"),
                    (dict(keep=(0.5,), stages=(1,), sinks=-1), "sinks")]:
    with pytest.raises(ValueError, match=field):
      LazyLLM(**kw)
  with pytest.raises(ValueError, match="stages"):
    lazy_prefill(CFG, params, tokens, LazyLLM(keep=(0.5,), stages=(3,)), cache=_cache())
  with pytest.raises(ValueError, match="revive"):
    lazy_generate(params, tokens, CFG, PRUNE, max_new_tokens=2, revive="some")

"""The jitted generation loop against uncached forwards, stops, batching and retracing."""

import json
import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import decoding
import model
from decoding import Finish
from quant.rtn import quantize_tensor
from tests.decoding.conftest import (
  CFG,
  PROMPTS,
  STEP_CALLS,
  argmax_loop,
  counting_step_fn,
  uncached_logprobs,
)

N_NEW = 12


def _generate(params, prompts=PROMPTS, **kw):
  """Most calls share one compilation: batch 4, prefill bucket 16, 16-token buffer, 24 slots."""
  kw.setdefault("max_new_tokens", N_NEW)
  if "cache" not in kw:
    kw["cache"] = model.init_cache(CFG, len(prompts), 24)
  return decoding.generate(params, prompts, counting_step_fn, **kw)


@pytest.fixture(scope="module")
def greedy(params):
  return argmax_loop(CFG, params, PROMPTS, N_NEW)


def _model_logprobs(params, prompts, out):
  """Uncached log p of each generated token, [B, max_new]."""
  seqs = [list(p) + np.asarray(out.tokens[i, : out.lengths[i]]).tolist()
          for i, p in enumerate(prompts)]
  lp = uncached_logprobs(CFG, params, seqs)
  want = np.zeros(out.tokens.shape, np.float32)
  for i, (p, s) in enumerate(zip(prompts, seqs)):
    for j in range(int(out.lengths[i])):
      want[i, j] = lp[i, len(p) - 1 + j, s[len(p) + j]]
  return want


def test_greedy_equals_uncached_argmax_loop(params, greedy):
  out = _generate(params)
  np.testing.assert_array_equal(np.asarray(out.tokens), np.array(greedy))
  np.testing.assert_array_equal(out.lengths, [N_NEW] * 4)
  assert (np.asarray(out.finish_reason) == Finish.MAX_TOKENS).all()
  np.testing.assert_allclose(out.logprobs, _model_logprobs(params, PROMPTS, out), atol=2e-5)
  c = out.cost
  assert (c.tokens, c.forward_passes) == (4 * N_NEW, 1 + N_NEW)
  assert c.forward_tokens == 4 * 16 + 4 * N_NEW
  n_params = sum(x.size for x in jax.tree.leaves(params))
  assert c.flops > 2 * n_params * c.forward_tokens  # matmuls plus attention
  assert c.bytes_moved > 4 * n_params * c.forward_passes and c.wall_time_s > 0
  # The returned cache holds prompt + generated tokens, minus the last (never fed back).
  np.testing.assert_array_equal(out.cache.lengths, [len(p) + N_NEW - 1 for p in PROMPTS])


def test_sampled_logprobs_equal_uncached_forward(params):
  """Cached == uncached while sampling: reported log-probs are the model's, token by token."""
  s = decoding.Sampler.create(4, temperature=[1.0, 0.7, 1.3, 1.0], top_k=[0, 20, 0, 0],
                              top_p=[1.0, 1.0, 0.9, 1.0], repetition_penalty=[1, 1, 1, 1.3])
  out = _generate(params, sampler=s, key=jax.random.key(3))
  np.testing.assert_allclose(out.logprobs, _model_logprobs(params, PROMPTS, out), atol=2e-5)
  assert len({tuple(np.asarray(r)) for r in out.tokens}) == 4


def test_row_alone_equals_row_in_batch(params):
  keys = jax.random.split(jax.random.key(7), 4)
  s = decoding.Sampler.create(4, temperature=1.0, top_p=0.95)
  batch = _generate(params, sampler=s, key=keys)
  # The lone row also streams (one compilation for both checks).
  seen = []
  stream = lambda step, tok, active: seen.append((int(step), int(tok[0]), bool(active[0])))
  alone = _generate(params, [PROMPTS[2]], sampler=decoding.Sampler.create(1, temperature=1.0,
                                                                            top_p=0.95),
                    key=keys[2:3], stream_fn=stream)
  np.testing.assert_array_equal(alone.tokens[0], batch.tokens[2])
  np.testing.assert_allclose(alone.logprobs[0], batch.logprobs[2], atol=1e-5)
  assert [s for s, _, _ in seen] == list(range(N_NEW)) and all(a for _, _, a in seen)
  np.testing.assert_array_equal([t for _, t, _ in seen], alone.tokens[0])


def test_changing_sampler_settings_does_not_retrace(params):
  _generate(params)
  before = STEP_CALLS[0]
  settings = [dict(temperature=0.5, top_k=3), dict(temperature=1.0, top_p=0.5, min_p=0.1),
              dict(temperature=[0, 1, 2, 3], repetition_penalty=1.5)]
  for i, kw in enumerate(settings):
    _generate(params, sampler=decoding.Sampler.create(4, **kw), key=jax.random.key(i),
              max_new_tokens=N_NEW - i, eos_id=i, stop_sequences=[[i, i + 1]])
  assert STEP_CALLS[0] == before


def _first_end(row, pattern):
  for j in range(len(row) - len(pattern) + 1):
    if row[j: j + len(pattern)] == pattern:
      return j + len(pattern)
  return None


def test_eos_and_stop_sequence_stops(params, greedy):
  eos = greedy[0][3]
  out = _generate(params, eos_id=eos)
  for i, row in enumerate(greedy):
    end = _first_end(row, [eos])
    n = end or N_NEW
    assert int(out.lengths[i]) == n
    assert int(out.finish_reason[i]) == (Finish.EOS if end else Finish.MAX_TOKENS)
    np.testing.assert_array_equal(out.tokens[i, :n], row[:n])
    assert (np.asarray(out.tokens[i, n:]) == 0).all()
  stop = greedy[1][2:4]
  out = _generate(params, stop_sequences=[[255, 254, 253], stop])
  for i, row in enumerate(greedy):
    end = _first_end(row, stop)
    assert int(out.lengths[i]) == (end or N_NEW)
    assert int(out.finish_reason[i]) == (Finish.STOP_SEQUENCE if end else Finish.MAX_TOKENS)


def test_stop_after_ends_the_batch_once_m_rows_stopped(params, greedy):
  eos = greedy[0][3]
  full = _generate(params, eos_id=eos)
  ends = sorted(int(n) for n in full.lengths)
  out = _generate(params, eos_id=eos, stop_after=1)
  steps = ends[0]  # the loop ran until the first row stopped
  for i, row in enumerate(greedy):
    n = int(out.lengths[i])
    assert n == min(int(full.lengths[i]), steps)
    np.testing.assert_array_equal(out.tokens[i, :n], row[:n])
    stopped = int(full.lengths[i]) <= steps
    assert int(out.finish_reason[i]) == (int(full.finish_reason[i]) if stopped
                                         else Finish.RUNNING)
  assert out.cost.forward_passes < full.cost.forward_passes or steps == N_NEW
  with pytest.raises(ValueError, match="stop_after=0"):
    _generate(params, stop_after=0)


def test_full_cache_is_an_error_or_a_flag(params):
  prompts = [(p * 16)[:16] for p in PROMPTS]
  with pytest.raises(ValueError, match="needs 27 cache slots.*max_len=24"):
    _generate(params, prompts)
  out = _generate(params, prompts, stop_on_full_cache=True)
  n = 24 - 16 + 1  # slots 0..23 hold the prompt and n - 1 outputs
  np.testing.assert_array_equal(out.lengths, [n] * 4)
  assert (np.asarray(out.finish_reason) == Finish.CACHE_FULL).all()
  np.testing.assert_array_equal(out.tokens[:, :n], argmax_loop(CFG, params, prompts, n))


@pytest.mark.parametrize("kw, match", [
    (dict(prompts=[[1, 2], []]), r"empty prompt in rows \[1\]"),
    (dict(prompts=[[1] * 40]), r"prompt length 40 is longer than the cache \(max_len=32\)"),
    (dict(max_new_tokens=0), "max_new_tokens=0 must be an integer >= 1"),
    (dict(sampler=decoding.Sampler.greedy(2)), "sampler has 2 rows"),
])
def test_bad_input_fails_before_compute(params, kw, match):
  calls = STEP_CALLS[0]
  with pytest.raises(ValueError, match=match):
    _generate(params, cache=model.init_cache(CFG, len(kw.get("prompts", PROMPTS)), 32), **kw)
  with pytest.raises(ValueError, match="cache has batch 2, the prompt batch has 4"):
    _generate(params, cache=model.init_cache(CFG, 2, 24))
  assert STEP_CALLS[0] == calls


@pytest.mark.parametrize("b, t", [(1, 1), (1, 3), (3, 1), (3, 4)])
def test_few_query_attention_equals_reference(b, t):
  """Decode-shaped attention (few queries, ragged valid keys): xla path == reference."""
  rng = np.random.RandomState(b * 10 + t)
  q = jnp.asarray(rng.randn(b, t, 4, 16), jnp.float32)
  k, v = (jnp.asarray(rng.randn(b, 24, 2, 16), jnp.float32) for _ in range(2))
  q_pos = jnp.asarray(rng.randint(t, 24, (b, 1)) + np.arange(t) - t, jnp.int32)
  mask = model.AttentionMask(q_positions=q_pos,
                             kv_positions=jnp.broadcast_to(jnp.arange(24), (b, 24)),
                             kv_valid=jnp.asarray(rng.rand(b, 24) > 0.2))
  fast = model.attention(q, k, v, mask=mask, impl="xla")
  ref = model.attention(q, k, v, mask=mask, impl="reference")
  np.testing.assert_allclose(fast, ref, atol=1e-5)


def test_quantized_params_run_unchanged(params):
  """int8 QArray kernels go through model.apply as-is; greedy still equals the argmax loop."""
  qparams = jax.tree_util.tree_map_with_path(
      lambda path, x: quantize_tensor(x) if path[-1].key == "kernel" else x, params)
  out = _generate(qparams, max_new_tokens=6)
  np.testing.assert_array_equal(out.tokens, argmax_loop(CFG, qparams, PROMPTS, 6))


_SHARDED = textwrap.dedent("""
    import json, jax, numpy as np
    import decoding, model
    from tests.decoding.conftest import random_params
    cfg = model.get_preset("test")
    params = random_params(cfg)
    mesh = jax.sharding.Mesh(np.array(jax.devices()), ("data",))
    s = decoding.Sampler.create(4, temperature=1.0, top_p=0.9)
    out = decoding.generate(params, {prompts}, model.Decoder(cfg), sampler=s, max_new_tokens=8,
                            mesh=mesh, key=jax.random.key(1))
    assert out.tokens.sharding.spec == jax.sharding.PartitionSpec("data")
    print(json.dumps(np.asarray(out.tokens).tolist()))
""")


@pytest.mark.slow
def test_sharded_over_data_axis_matches_one_device(params):
  code = _SHARDED.format(prompts=PROMPTS)
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4",
             JAX_PLATFORMS="cpu")
  res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                       cwd=os.path.dirname(os.path.dirname(os.path.dirname(__file__))))
  assert res.returncode == 0, res.stderr[-2000:]
  sharded = json.loads(res.stdout.strip().splitlines()[-1])
  s = decoding.Sampler.create(4, temperature=1.0, top_p=0.9)
  out = _generate(params, sampler=s, max_new_tokens=8, key=jax.random.key(1))
  np.testing.assert_array_equal(out.tokens, sharded)

"""Beam search against brute force over every continuation of a tiny-vocabulary model."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import decoding
import model
from tests.decoding.conftest import random_params

# Vocabulary 6 so all 6^3 continuations can be enumerated; scale 3 makes it peaky.
CFG = model.ModelConfig(vocab_size=6, d_model=16, n_layers=1, n_heads=2, n_kv_heads=1,
                        ffn_dim=32, max_seq_len=32)
STEP = model.Decoder(CFG)
PROMPTS = [[1, 2, 3], [4]]
L = 3
EOS = 5


@pytest.fixture(scope="module")
def params():
  return random_params(CFG, seed=1, scale=3.0)


def _beam(params, width, max_new=L, **kw):
  cache = model.init_cache(CFG, len(PROMPTS), 8)
  return decoding.beam_search(params, PROMPTS, STEP, beam_width=width, max_new_tokens=max_new,
                              cache=cache, **kw)


_log_softmax_fn = jax.jit(lambda p, t: jax.nn.log_softmax(model.apply(CFG, p, t)[0], -1))


def _brute_force(params, prompt, eos=None, alpha=0.0):
  """Scores of every hypothesis: EOS only as a last token, otherwise exactly L tokens."""
  seqs = np.array(list(itertools.product(range(CFG.vocab_size), repeat=L)))
  full = np.concatenate([np.tile(prompt, (len(seqs), 1)), seqs], 1)
  lp = np.asarray(_log_softmax_fn(params, jnp.asarray(full)))
  n = len(prompt)
  tok_lp = np.stack([lp[np.arange(len(seqs)), n - 1 + j, seqs[:, j]] for j in range(L)], 1)
  hyps = {}
  for s, t in zip(seqs, tok_lp):
    stop = next((j + 1 for j in range(L) if eos is not None and s[j] == eos), L)
    hyps[tuple(s[:stop])] = t[:stop].sum() / stop ** alpha
  return sorted(hyps.items(), key=lambda kv: -kv[1])


def test_wide_beam_finds_the_highest_logprob_sequence(params):
  out = _beam(params, width=CFG.vocab_size ** (L - 1), length_penalty=0.0)
  for i, p in enumerate(PROMPTS):
    ranked = _brute_force(params, p)
    for j in range(3):  # the top 3 hypotheses, in order
      assert tuple(np.asarray(out.tokens[i, j])) == ranked[j][0]
      np.testing.assert_allclose(out.scores[i, j], ranked[j][1], atol=1e-4)
    np.testing.assert_allclose(out.logprobs[i, 0], out.scores[i, 0], atol=1e-6)


def test_eos_and_length_penalty_against_brute_force(params):
  alpha = 1.0
  out = _beam(params, width=CFG.vocab_size ** (L - 1), eos_id=EOS, length_penalty=alpha)
  for i, p in enumerate(PROMPTS):
    ranked = _brute_force(params, p, eos=EOS, alpha=alpha)
    for j in range(3):
      hyp, score = ranked[j]
      n = int(out.lengths[i, j])
      assert tuple(np.asarray(out.tokens[i, j, :n])) == hyp
      assert (np.asarray(out.tokens[i, j, n:]) == 0).all()
      np.testing.assert_allclose(out.scores[i, j], score, atol=1e-4)


def test_width_one_equals_greedy(params):
  out = _beam(params, width=1, max_new=5, length_penalty=0.0)
  greedy = decoding.generate(params, PROMPTS, STEP, max_new_tokens=5,
                             cache=model.init_cache(CFG, 2, 8))
  np.testing.assert_array_equal(out.tokens[:, 0], greedy.tokens)
  np.testing.assert_allclose(out.logprobs[:, 0], greedy.logprobs.sum(1), atol=1e-5)
  assert out.cost.forward_passes == 1 + 5


@pytest.mark.parametrize("kw, match", [
    (dict(width=0), "beam_width=0 must be an integer >= 1"),
    (dict(width=2, max_new=7), "needs 9 cache slots"),
    (dict(width=2, length_penalty=float("nan")), "length_penalty=nan must be finite"),
])
def test_bad_input(params, kw, match):
  with pytest.raises(ValueError, match=match):
    _beam(params, **kw)

"""Speculative decoding: exact greedy, exact sampling distribution, early-exit drafts."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from scipy import stats as scipy_stats

import model
from decoding import Sampler, early_exit, speculative
from decoding.generate import Finish
from model.tokenizer import ByteTokenizer
from tests.decoding.conftest import CFG, argmax_loop, random_params

DRAFT_CFG = CFG.replace(d_model=32, n_layers=1, n_heads=2, n_kv_heads=1, ffn_dim=64)
PROMPTS = [[5, 17, 33, 2, 90, 11, 7], [100], [3, 1, 4, 1, 5, 9, 2, 6, 5]]
N_NEW = 12


@pytest.fixture(scope="module")
def models():
  tp = random_params(CFG, seed=0)
  return tp, random_params(DRAFT_CFG, seed=1), argmax_loop(CFG, tp, PROMPTS, N_NEW)


def _truncate(seq, eos, stop):
  """Reference stopping: cut after the first EOS or the end of the first stop sequence."""
  for i in range(len(seq)):
    if seq[i] == eos:
      return seq[: i + 1], Finish.EOS
    if i >= 1 and seq[i - 1 : i + 1] == stop:
      return seq[: i + 1], Finish.STOP_SEQUENCE
  return seq, Finish.MAX_TOKENS


def test_expected_tokens_per_call_closed_form():
  assert speculative.expected_tokens_per_call(0.0, 4) == 1.0
  assert speculative.expected_tokens_per_call(0.5, 1) == pytest.approx(1.5)
  assert speculative.expected_tokens_per_call(1.0, 4) == 5.0
  a, g = 0.7, 3  # 1 + a + a^2 + a^3
  assert speculative.expected_tokens_per_call(a, g) == pytest.approx(1 + a + a * a + a ** 3)


def test_greedy_equals_target_greedy(models):
  """Several gamma (fixed and adaptive), ragged batch, per-row acceptance, EOS and stops.

  Bucketed verify (widths 2, 3, 5 for gamma_max = 4) keeps one compilation for all runs and
  exercises every switch branch.
  """
  tp, dp, ref = models
  eos, stop = ref[0][5], ref[2][3:5]  # force an EOS stop in row 0, a stop sequence in row 2
  want = [_truncate(r, eos, stop) for r in ref]
  for gamma, schedule in ((1, "fixed"), (2, "fixed"), (4, "fixed"), (1, "heuristic")):
    out = speculative.speculative_decode(
        CFG, tp, DRAFT_CFG, dp, PROMPTS, max_new_tokens=N_NEW, gamma=gamma, gamma_max=4,
        schedule=schedule, eos_id=eos, stop_sequences=[stop], verify_buckets=True)
    for row, (seq, reason) in enumerate(want):
      n = int(out.lengths[row])
      assert out.tokens[row, :n].tolist() == seq, (gamma, schedule, row)
      assert int(out.finish_reason[row]) == reason
      assert (np.asarray(out.tokens[row, n:]) == 0).all()
    s = out.stats
    assert s.target_calls < sum(len(w[0]) for w in want)
    assert 0.0 <= s.alpha <= 1.0 and s.tokens_per_call >= 1.0
    assert out.cost.tokens == sum(len(w[0]) for w in want)
    assert out.cost.forward_passes == 2 + s.target_calls + s.draft_calls  # + both prefills
    if schedule == "fixed":  # verify width gamma + 1 for 3 rows, prefills of 16 for 2 models
      assert out.cost.forward_tokens == 2 * 3 * 16 + 3 * (
          (gamma + 1) * s.target_calls + s.draft_calls)


def test_self_speculative_greedy_equals_target(models):
  tp, _, ref = models
  head = early_exit.init_exit_head(CFG, tp)
  key = jax.random.key(3)
  head["proj"]["kernel"] = 0.3 * jax.random.normal(key, head["proj"]["kernel"].shape)
  out = early_exit.self_speculative_decode(
      CFG, early_exit.with_exit_head(tp, head), 1, PROMPTS, max_new_tokens=N_NEW, gamma=3)
  assert out.tokens.tolist() == ref
  assert out.stats.draft_calls == 3 * out.stats.target_calls
  assert out.cost.forward_passes == 1 + out.stats.target_calls + out.stats.draft_calls


# --- Sampling: the output distribution equals the target's (tiny vocabulary).

V = 5
TINY = CFG.replace(vocab_size=V)
TEMP, TOP_K = 0.8, 4
N_SAMPLES = 2000


_tiny_logits = jax.jit(lambda p, t: model.apply(TINY, p, t)[0])


def _exact_joint(params, prompt, n_tok):
  """Exact probability of every n_tok continuation under the processed target (enumeration)."""
  seqs = np.array([prompt + list(c) for c in itertools.product(range(V), repeat=n_tok)])
  logits = np.asarray(_tiny_logits(params, jnp.asarray(seqs)), np.float64) / TEMP
  kth = np.sort(logits, axis=-1)[..., -TOP_K][..., None]
  logits = np.where(logits >= kth, logits, -np.inf)
  logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
  lp = sum(logp[np.arange(len(seqs)), len(prompt) - 1 + i, seqs[:, len(prompt) + i]]
           for i in range(n_tok))
  return np.exp(lp)


def test_sampling_distribution_equals_target():
  """Chi-square of the first 3 tokens of N independent rows against exact target probabilities.

  Rows are independent (own keys), so counts over the V^3 = 125 cells are multinomial under
  the null; the threshold is the chi-square quantile at p = 1e-4 (cells with expected count
  < 5 are pooled). A draft that ignores the residual distribution would shift the joint by
  the draft's mismatch, which the power check below shows is far above the threshold.
  """
  tp, dp = random_params(TINY, seed=4, scale=2.0), random_params(TINY, seed=5, scale=2.0)
  prompt = [1, 3, 2]
  probs = _exact_joint(tp, prompt, 3)
  sampler = Sampler.create(N_SAMPLES, temperature=TEMP, top_k=TOP_K)
  out = speculative.speculative_decode(
      TINY, tp, TINY, dp, [prompt] * N_SAMPLES, max_new_tokens=3, gamma=2, sampler=sampler,
      key=jax.random.key(7))
  toks = np.asarray(out.tokens)
  assert (np.asarray(out.lengths) == 3).all()
  counts = np.bincount(toks[:, 0] * V * V + toks[:, 1] * V + toks[:, 2], minlength=V ** 3)
  expected = N_SAMPLES * probs
  assert counts[expected == 0].sum() == 0  # top-k-removed continuations never appear
  small = expected < 5
  obs = np.append(counts[~small], counts[small].sum())
  exp = np.append(expected[~small], expected[small].sum())
  chi2 = float(((obs - exp) ** 2 / exp).sum())
  threshold = scipy_stats.chi2.ppf(1 - 1e-4, df=len(obs) - 1)
  assert chi2 < threshold, (chi2, threshold)
  # The draft really differs (rejections happen) and the test has power against it.
  q = _exact_joint(dp, prompt, 3)
  noncentral = N_SAMPLES * float(((q - probs) ** 2 / np.maximum(probs, 1e-12))[probs > 0].sum())
  assert noncentral > 5 * threshold
  assert out.stats.alpha < 0.95

  # A draft equal to the target accepts everything: alpha == 1, gamma + 1 tokens per call.
  same = speculative.speculative_decode(
      TINY, tp, TINY, tp, [prompt] * N_SAMPLES, max_new_tokens=3, gamma=2, sampler=sampler,
      key=jax.random.key(8))
  assert same.stats.alpha == 1.0
  assert same.stats.tokens_per_call == 3.0 == same.stats.expected_tokens_per_call


# --- Early-exit model hook and head training.


def test_exit_decoder_composes_outside_the_model(models):
  """An exit draft at the last layer with the initial head is the full model; at layer 1 a
  cached step writes layer 0 only and equals the uncached draft."""
  tp, _, _ = models
  tokens = jnp.asarray([PROMPTS[0]])
  full = model.apply(CFG, tp, tokens)[0]
  with_head = early_exit.with_exit_head(tp, early_exit.init_exit_head(CFG, tp))
  last = early_exit.ExitDecoder(CFG, CFG.n_layers)
  np.testing.assert_allclose(last(with_head, tokens, None)[0], full, atol=1e-5)
  np.testing.assert_allclose(model.Decoder(CFG)(with_head, tokens, None)[0], full, atol=1e-6)
  draft = early_exit.ExitDecoder(CFG, 1)
  assert draft.n_layers == 1 and "layers_1" not in draft.read_params(with_head)
  got, new = draft(with_head, tokens, draft.init_cache(1, 16))
  np.testing.assert_allclose(got, draft(with_head, tokens, None)[0], atol=1e-5)
  assert float(jnp.abs(new.k[0]).sum()) > 0 and float(jnp.abs(new.k[1]).sum()) == 0
  assert new.lengths.tolist() == [len(PROMPTS[0])]
  # Without a head: the final norm and LM head after layer k (== the initial head).
  np.testing.assert_allclose(draft(tp, tokens, None)[0], draft(with_head, tokens, None)[0],
                             atol=1e-5)
  legacy = dict(tp, exit_proj=with_head["exit_head"]["proj"],
                exit_norm=with_head["exit_head"]["norm"])
  assert early_exit.from_legacy(legacy).keys() == with_head.keys()


def test_exit_head_training_reduces_kl(models):
  tp, _, _ = models
  rng = np.random.RandomState(0)
  batch = {"tokens": jnp.asarray(rng.randint(0, 256, (4, 32)), jnp.int32)}
  params = early_exit.with_exit_head(tp, early_exit.init_exit_head(CFG, tp))
  tx = optax.adam(1e-2)

  @jax.jit
  def step(head, opt_state):
    loss = lambda h: early_exit.distill_loss(CFG, {**tp, "exit_head": h}, batch, exit_layer=1)
    (kl, _), grads = jax.value_and_grad(loss, has_aux=True)(head)
    updates, opt_state = tx.update(grads, opt_state, head)
    return optax.apply_updates(head, updates), opt_state, kl

  head, opt_state, kl = params["exit_head"], tx.init(params["exit_head"]), []
  for _ in range(15):  # the KL of the head before each update
    head, opt_state, k = step(head, opt_state)
    kl.append(float(k))
  assert kl[-1] < 0.8 * kl[0], kl
  assert set(tp) == {"embed", "final_norm", "layers_0", "layers_1"}  # target untouched


# --- Bad input: clear errors before any compute.


def test_bad_input(models):
  tp, dp, _ = models
  with pytest.raises(ValueError, match="vocab_size=300 differs"):
    speculative.speculative_decode(CFG, tp, DRAFT_CFG.replace(vocab_size=300), dp, PROMPTS,
                                   max_new_tokens=4)

  class OtherEos(ByteTokenizer):
    eos_id = 0

  with pytest.raises(ValueError, match="eos_id"):
    speculative.speculative_decode(CFG, tp, DRAFT_CFG, dp, PROMPTS, max_new_tokens=4,
                                   target_tokenizer=ByteTokenizer(), draft_tokenizer=OtherEos())
  wide = model.Decoder(DRAFT_CFG.replace(vocab_size=CFG.vocab_size + 1))
  with pytest.raises(ValueError, match="draft vocabulary"):
    speculative.speculative_generate(
        tp, dp, PROMPTS, target_step_fn=model.Decoder(CFG), draft_step_fn=wide,
        max_new_tokens=4, target_cache=model.init_cache(CFG, 3, 64))
  with pytest.raises(ValueError, match="draft_step_fn must be a model.Decoder"):
    speculative.speculative_generate(
        tp, dp, PROMPTS, target_step_fn=model.Decoder(CFG), draft_step_fn=lambda p, t, c: t,
        max_new_tokens=4)
  for kw, msg in (({"gamma": 0}, "gamma=0"), ({"gamma": 3, "gamma_max": 2}, "gamma_max=2"),
                  ({"schedule": "magic"}, "schedule='magic'"), ({"max_new_tokens": 0}, "max_")):
    args = {"max_new_tokens": 4, **kw}
    with pytest.raises(ValueError, match=msg):
      speculative.speculative_decode(CFG, tp, DRAFT_CFG, dp, PROMPTS, **args)
  with pytest.raises(ValueError, match="empty prompt"):
    speculative.speculative_decode(CFG, tp, DRAFT_CFG, dp, [[1], []], max_new_tokens=4)
  with pytest.raises(ValueError, match="exit_layer=2"):
    early_exit.self_speculative_decode(CFG, tp, 2, PROMPTS, max_new_tokens=4)
  with pytest.raises(ValueError, match="max_len"):
    speculative.speculative_decode(CFG, tp, DRAFT_CFG, dp, PROMPTS, max_new_tokens=300)

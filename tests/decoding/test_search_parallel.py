"""Sampling-based search methods, pass@k, the coverage law and compute-optimal allocation."""

import itertools
import math

import jax
import numpy as np
import pytest

import decoding.search as search
import model
from decoding.search import compute_optimal_lib as co
from decoding.search import core, parallel, passk
from decoding.tasks.arithmetic import ARITHMETIC
from tests.decoding.search_fakes import FakePropose, FakeScore, FakeTask

SAMPLING = ("repeated_sampling", "majority_vote", "weighted_vote", "rpc", "best_of_n",
            "weighted_best_of_n", "first_finish")


@pytest.mark.parametrize("n", [1, 2, 5, 7])
def test_pass_at_k_equals_enumeration(n):
  for c in range(n + 1):
    ok = [True] * c + [False] * (n - c)
    for k in range(1, n + 1):
      subsets = list(itertools.combinations(range(n), k))
      brute = sum(any(ok[i] for i in s) for s in subsets) / len(subsets)
      assert passk.pass_at_k(n, c, k) == pytest.approx(brute, abs=1e-12)


def test_pass_at_k_bad_input():
  with pytest.raises(ValueError, match="k=5 must be <= n=4"):
    passk.pass_at_k(4, 1, 5)
  with pytest.raises(ValueError, match="c=5"):
    passk.pass_at_k(4, 5, 1)
  with pytest.raises(ValueError, match="n=0"):
    passk.pass_at_k(0, 0, 1)


def test_coverage_law_fit_recovers_parameters():
  ks = np.array([1, 2, 4, 8, 16, 32])
  cov = np.exp(-1.3 * ks ** -0.6)
  fit = passk.fit_coverage_law(ks, cov)
  assert fit.a == pytest.approx(-1.3, rel=1e-6) and fit.b == pytest.approx(-0.6, rel=1e-6)
  assert fit.r2 == pytest.approx(1.0)
  np.testing.assert_allclose(fit.predict(ks), cov, rtol=1e-6)
  with pytest.raises(ValueError, match="two values"):
    passk.fit_coverage_law([1, 2], [1.0, 1.0])


def test_vote_ties_go_to_the_first_seen_answer():
  assert search.vote(["1", "2", "2", "1"])[0] == "1"
  assert search.vote([None, "3", "2", "2", "3"])[0] == "3"
  assert search.vote(["1", "2"], [0.5, 0.7])[0] == "2"
  assert search.vote([None, None])[0] is None


def _fakes(p_correct=0.5, depth=3, index=0, noise=0.0):
  task = FakeTask(depth=depth)
  prob = task.problem(0, index)
  return task, prob, FakePropose(prob, p_correct=p_correct), FakeScore(task, prob, noise=noise)


@pytest.mark.parametrize("method", SAMPLING)
def test_cost_equals_what_the_fakes_counted(method):
  task, prob, propose, score = _fakes()
  r = search.search(method, propose, score, 8, key=3)
  assert r.cost.tokens == propose.tokens > 0
  assert r.cost.forward_passes == propose.passes
  assert r.cost.reward_calls == score.calls
  assert len(r.candidates) == 8
  if r.answer is not None:
    assert r.sample is not None and task.extract_answer(r.sample.text) == r.answer


@pytest.mark.parametrize("method", SAMPLING)
def test_budget_caps_are_never_exceeded(method):
  for caps in (dict(max_tokens=20), dict(max_forward_passes=4), dict(max_reward_calls=3)):
    task, prob, propose, score = _fakes()
    b = core.Budget(6, **caps)
    r = search.search(method, propose, score, b, key=1)
    assert r.cost.tokens <= b.max_tokens if b.max_tokens else True
    assert r.cost.forward_passes <= (b.max_forward_passes or 10**9)
    assert r.cost.reward_calls <= (b.max_reward_calls or 10**9)
    assert r.cost.tokens == propose.tokens and r.cost.reward_calls == score.calls


def test_same_key_same_samples_across_methods():
  texts = []
  for method in ("majority_vote", "best_of_n", "rpc"):
    _, _, propose, score = _fakes()
    texts.append([s.text for s in search.search(method, propose, score, 8, key=5).candidates])
  assert texts[0] == texts[1] == texts[2]


def test_best_of_n_with_oracle_finds_a_correct_sample_when_one_exists():
  for index in range(20):
    task, prob, propose, score = _fakes(p_correct=0.4, index=index)
    r = search.best_of_n(propose, score, 8, key=index)
    any_ok = any(task.is_correct(prob, s.text) for s in r.candidates)
    assert task.is_correct(prob, r.text) == any_ok
    rs = search.repeated_sampling(*_fakes(p_correct=0.4, index=index)[2:], 8, key=index)
    assert (rs.answer == prob.answer) == any_ok


def test_aggregates_and_weighted_vote():
  assert core.aggregate([0.9, 0.2, 0.8], "last") == 0.8
  assert core.aggregate([0.9, 0.2, 0.8], "min") == 0.2
  assert core.aggregate([0.5, 0.5], "prod") == 0.25
  assert core.aggregate([], "min") == 0.0
  with pytest.raises(ValueError, match="aggregate='mean'"):
    core.aggregate([1.0], "mean")
  task, prob, propose, score = _fakes(p_correct=0.3)
  r = search.weighted_vote(propose, score, 16, key=2)
  # with the oracle PRM only correct samples carry weight
  assert r.answer is None or r.answer == prob.answer or not any(
      task.is_correct(prob, s.text) for s in r.candidates)


def test_rpc_select_counts_distinct_paths_once_and_prunes_low_probability():
  answers = ["1", "1", "1", "2", "2"]
  texts = ["a", "a", "a", "b", "c"]
  probs = [0.5, 0.5, 0.5, 0.3, 0.3]
  a, info = parallel.rpc_select(answers, texts, probs, prune=False)
  assert a == "2" and info["scores"] == {"1": 0.5, "2": pytest.approx(0.6)}
  rng = np.random.default_rng(0)
  hi = list(rng.uniform(0.6, 0.9, size=12))
  lo = list(rng.uniform(0.01, 0.08, size=20))
  answers = ["good"] * 12 + ["bad"] * 20
  a, info = parallel.rpc_select(answers, [str(i) for i in range(32)], hi + lo)
  assert info["pruned"] > 0 and a == "good"


def test_first_finish_stops_after_m_and_votes_among_them():
  task, prob, propose, score = _fakes(depth=2)
  r = search.first_finish(propose, None, 6, m=2, chunk=2, key=0)
  assert len(r.info["first"]) == 2
  assert r.cost.tokens == propose.tokens
  with pytest.raises(ValueError, match="m=7"):
    search.first_finish(propose, None, 6, m=7)


def test_bad_input_errors():
  with pytest.raises(ValueError, match="at least one sample"):
    core.Budget(0)
  with pytest.raises(ValueError, match="budget=1.5"):
    search.majority_vote(*_fakes()[2:], 1.5)
  with pytest.raises(ValueError, match="unknown method 'bestofn'"):
    search.search("bestofn", None, None, 4)
  with pytest.raises(ValueError, match="difficulty.digits=9"):
    ARITHMETIC.problem(0, 0, (9, 2))

  class Vocab:
    vocab_size = 259

  class OtherVocab:
    vocab_size = 512

  with pytest.raises(ValueError, match="vocab_size=512 differs"):
    core.check_vocab(Vocab(), OtherVocab())
  for method in ("best_of_n", "weighted_vote", "beam_search", "dvts", "particle_filtering",
                 "astar"):  # checked before any compute
    with pytest.raises(ValueError, match="vocab_size=512 differs"):
      search.search(method, Vocab(), OtherVocab(), 4)


def test_fit_allocation_picks_the_best_method_per_bin():
  d = [0.1, 0.2, 0.8, 0.9]
  correct = {"a": [True, True, False, False], "b": [False, True, True, True]}
  alloc = co.fit_allocation(d, correct, bins=2)
  assert alloc.method_for(0.1) == "a" and alloc.method_for(0.95) == "b"
  with pytest.raises(ValueError, match="correct\\['a'\\] has 1"):
    co.fit_allocation(d, {"a": [True]})


def test_compute_optimal_counts_the_probe():
  task, prob, propose, score = _fakes()
  alloc = co.Allocation(edges=(0.5,), methods=("majority_vote", "best_of_n"))
  r = co.compute_optimal(propose, score, 8, allocation=alloc, methods=search.METHODS, probe=2,
                         key=0)
  assert r.info["method"] in ("majority_vote", "best_of_n")
  assert r.cost.tokens == propose.tokens and r.cost.reward_calls == score.calls
  assert len(r.candidates) == 6
  with pytest.raises(ValueError, match="probe=8"):
    co.compute_optimal(propose, score, 8, allocation=alloc, methods=search.METHODS, probe=8)


class _NoStop:
  """A proposer without `stop_after` (first-finish falls back to chunks)."""

  def __init__(self, propose):
    self.propose = propose

  def __call__(self, samples, key, **kw):
    return self.propose(samples, key, **kw)


@pytest.fixture(scope="module")
def tiny_policy():
  cfg = model.config.get_preset("test")
  return cfg, model.init(cfg, jax.random.key(0))


def test_policy_rows_are_batch_independent_and_prefix_sharing_is_exact(tiny_policy):
  cfg, params = tiny_policy
  prob = ARITHMETIC.problem(0, 1)
  pol = core.Policy(params, model.Decoder(cfg), ARITHMETIC, temperature=1.0, max_len=12)
  four, cost = pol.bind(prob)(core.root(4), 7, until="end")
  two, _ = pol.bind(prob)(core.root(2), 7, until="end")
  assert [s.text for s in four[:2]] == [s.text for s in two]
  assert cost.tokens == sum(s.tokens for s in four)
  for s in four:
    assert math.isfinite(s.logprob) and s.logprob <= 0
    assert len(s.text.encode("latin-1")) == s.tokens  # one character per generated byte
  step, _ = pol.bind(prob)(core.root(4), 7, until="step")
  assert all(s.finished or s.text.endswith(",") or s.tokens == 12 for s in step)
  # first-finish in one lockstep call (stop_after) picks what the chunked loop picks
  ff = search.first_finish(pol.bind(prob), None, 4, m=2, key=3)
  ff_chunks = search.first_finish(_NoStop(pol.bind(prob)), None, 4, m=2, chunk=6, key=3)
  assert ff.info["rounds"] == 1 and ff.info["first"] == ff_chunks.info["first"]
  assert ff.answer == ff_chunks.answer and ff.cost.tokens <= ff_chunks.cost.tokens
  # The shared prompt KV gives the re-prefilled path's tokens (greedy: no per-position keys).
  runs = {}
  for share in (True, False):
    greedy = core.Policy(params, model.Decoder(cfg), ARITHMETIC, temperature=0.0, max_len=12,
                         share_prefix=share)
    first, _ = greedy.bind(prob)(core.root(1), 0, until="end", max_new_tokens=5)
    runs[share], _ = greedy.bind(prob)(first, 0, until="end")
  assert [s.text for s in runs[True]] == [s.text for s in runs[False]]

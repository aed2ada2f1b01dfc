"""Tree search, particle filtering and A* on the pure-python fakes (no model, fast)."""

import numpy as np
import pytest

from decoding.cost import Cost
from decoding.search import core, particle, tree
from decoding.search.astar import astar, path_cost
from tests.decoding.search_fakes import FakePropose, FakeScore, FakeTask

METHODS = {
    "beam": lambda p, s, b, **kw: tree.beam_search(p, s, b, beam_width=2, **kw),
    "dvts": lambda p, s, b, **kw: tree.dvts(p, s, b, beam_width=2, **kw),
    "lookahead": lambda p, s, b, **kw: tree.lookahead(p, s, b, beam_width=2, depth=1, **kw),
    "pf": lambda p, s, b, **kw: particle.particle_filtering(p, s, b, **kw),
    "pf_sys_anneal": lambda p, s, b, **kw: particle.particle_filtering(
        p, s, b, resampling="systematic", anneal=0.6, **kw),
    "astar": lambda p, s, b, **kw: astar(p, s, b, expand=3, max_expansions=64, **kw),
}


def _setup(depth=4, digits="0123", p_correct=0.4, index=0, noise=0.0):
  task = FakeTask(depth, digits)
  problem = task.problem(0, index)
  return task, problem, FakePropose(problem, p_correct), FakeScore(task, problem, noise)


class EnumPropose(FakePropose):
  """Test-only proposer: the k-th row of a call sharing a prefix writes digit k mod |D|.

  (Rows are not independent here, on purpose: a beam's children enumerate the digits.)
  """

  def _choose(self, j, rng):
    return self.digits[self.occurrence % len(self.digits)], 0.0


# ---- the fakes themselves


def test_fakes_deterministic_and_rows_independent():
  task, problem, propose, _ = _setup()
  assert problem.target == ",".join(problem.answer) + ";" + problem.answer + "\n"
  assert len(problem.target) == task.max_target_len()
  a, _ = propose(core.root(3), 5, until="step")
  b, _ = propose(core.root(3), 5, until="step")
  assert a == b
  c, _ = propose([core.Sample(text="9,"), a[1]], 5, until="step")
  d, _ = propose([core.Sample(text="1,"), a[1]], 5, until="step")
  assert c[1] == d[1]  # row 1 does not depend on row 0
  done, cost = propose(a, 1, until="end")
  assert all(s.finished and len(s.text) == task.max_target_len() for s in done)
  again, cost2 = propose(done, 2, until="end")
  assert again == done and cost2 == Cost()
  cut, _ = propose(core.root(2), 3, until="end", max_new_tokens=3)
  assert all(s.tokens == 3 and not s.finished for s in cut)
  resumed, _ = propose(cut, 4, until="end")
  assert all(s.finished and task.extract_answer(s.text) == "".join(s.text[0:-1:2][:4])
             for s in resumed)


# ---- budgets: caps never exceeded, the cost is what the fakes counted


@pytest.mark.parametrize("name", sorted(METHODS))
@pytest.mark.parametrize("cap", [None, ("max_tokens", 7), ("max_tokens", 45),
                                 ("max_forward_passes", 4), ("max_forward_passes", 19),
                                 ("max_reward_calls", 3), ("max_reward_calls", 13)])
def test_budget_caps_and_cost_accounting(name, cap):
  _, _, propose, score = _setup()
  budget = core.Budget(4, **({} if cap is None else {cap[0]: cap[1]}))
  r = METHODS[name](propose, score, budget, key=3)
  if cap is not None:
    assert getattr(r.cost, cap[0].removeprefix("max_")) <= cap[1]
  assert r.cost.tokens == propose.tokens
  assert r.cost.forward_passes == sum(propose.per_call_passes) == propose.passes
  assert r.cost.reward_calls == score.calls
  if r.sample is not None:
    assert r.sample.finished and r.sample in r.candidates
    assert r.answer == tree.answer_of(r.sample.text)
  if cap is not None and cap[1] < 10:
    assert r.info["stop"] == "budget"


def test_uncapped_runs_to_completion():
  for name, method in METHODS.items():
    _, problem, propose, score = _setup()
    r = method(propose, score, core.Budget(4), key=1)
    assert r.sample is not None and r.sample.finished, name
    assert r.info["stop"] in ("done", "goal"), name


# ---- exhaustive correctness with the oracle PRM


@pytest.mark.parametrize("depth,digits,width,n", [(2, "01", 2, 4), (3, "01", 2, 4),
                                                  (3, "012", 3, 6), (5, "01", 2, 2)])
def test_beam_and_dvts_find_the_answer_when_children_enumerate_digits(depth, digits, width, n):
  task = FakeTask(depth, digits)
  for index in range(8):
    problem = task.problem(0, index)
    for method in (tree.beam_search, tree.dvts):
      propose, score = EnumPropose(problem, 0.0), FakeScore(task, problem)
      r = method(propose, score, core.Budget(n), beam_width=width, key=index)
      assert r.answer == problem.answer, (method.__name__, index, r.text)


def test_beam_search_beats_single_samples_with_a_random_policy():
  # the random policy (p_correct 0.3, digits "01", depth 2): not exhaustive, so checked
  # statistically over 40 fixed problems and keys
  task = FakeTask(2, "01")
  wins = 0
  for index in range(40):
    problem = task.problem(1, index)
    r = tree.beam_search(FakePropose(problem, 0.3), FakeScore(task, problem), core.Budget(4),
                         beam_width=2, key=index)
    wins += r.answer == problem.answer
  # one sample is right w.p. 0.09; beam search (4 children per step) w.p. ~(1 - 0.7^4)^2 ~ 0.58
  assert 16 <= wins < 40


def test_lookahead_with_an_oracle_rollout_finds_the_answer():
  task = FakeTask(4, "012")
  for index in range(6):
    problem = task.problem(0, index)
    propose = EnumPropose(problem, 0.0)
    rollout = FakePropose(problem, 1.0)  # always the reference digit: greedy on the truth
    r = tree.lookahead(propose, FakeScore(task, problem), core.Budget(6), beam_width=3,
                       depth=2, rollout_propose=rollout, key=index)
    assert r.answer == problem.answer
    assert r.cost.tokens == propose.tokens + rollout.tokens


def test_answer_of_and_single_step_beam_search():
  assert tree.answer_of("1,2;12\n") == "12"
  assert tree.answer_of("1,2;12") is None and tree.answer_of("1,2;\n") is None
  task, problem, propose, score = _setup(depth=3)
  r = tree.beam_search(propose, score, core.Budget(8), beam_width=4, max_steps=1, key=0)
  assert len(r.candidates) == 8 and all(s.finished for s in r.candidates)
  assert r.info["steps"] == 1 and propose.calls == 1 and score.calls == 8
  best = max(range(8), key=lambda i: (r.info["scores"][i], -i))
  assert r.sample == r.candidates[best]


# ---- ties and determinism


def test_rank_is_stable():
  assert tree.rank([0.5, 1.0, 0.5, 1.0, 0.2]) == [1, 3, 0, 2, 4]


def test_constant_scores_keep_lowest_indices_and_repeat():
  _, problem, _, _ = _setup(depth=3)

  def flat(samples):
    return [[0.5] * len(s.steps) for s in samples], Cost(reward_calls=len(samples))

  runs = [tree.beam_search(FakePropose(problem, 0.5), flat, core.Budget(4), beam_width=2,
                           key=7) for _ in range(2)]
  assert runs[0].candidates == runs[1].candidates and runs[0].info == runs[1].info
  assert runs[0].sample == runs[0].candidates[0]  # all tied: the first completed
  r1 = particle.particle_filtering(FakePropose(problem), flat, core.Budget(4), key=2)
  r2 = particle.particle_filtering(FakePropose(problem), flat, core.Budget(4), key=2)
  assert r1.candidates == r2.candidates and r1.info == r2.info


# ---- resampling


W = np.array([0.1, 0.2, 0.3, 0.05, 0.35])


def test_multinomial_resampling_is_unbiased():
  n = 20000
  counts = np.bincount(particle.multinomial_resample(0, W, n), minlength=len(W))
  sigma = np.sqrt(n * W * (1 - W))
  assert np.all(np.abs(counts - n * W) <= 4 * sigma), counts


def test_systematic_resampling_counts_within_one_and_unbiased():
  n, trials = 7, 2000
  total = np.zeros(len(W))
  for k in range(trials):
    idx = particle.systematic_resample(k, W, n)
    assert idx.dtype.kind == "i" and len(idx) == n and np.all(np.diff(idx) >= 0)
    c = np.bincount(idx, minlength=len(W))
    assert np.all(np.abs(c - n * W) < 1 + 1e-9), c
    total += c
  # per-draw variance of count_i <= 1/4, so the mean's sigma <= 0.5 / sqrt(trials)
  assert np.all(np.abs(total / trials - n * W) <= 4 * 0.5 / np.sqrt(trials))


def test_resampling_rejects_bad_weights():
  for bad in ([], [0.0, 0.0], [-0.1, 1.1], [np.nan, 1.0]):
    with pytest.raises(ValueError, match="weights"):
      particle.multinomial_resample(0, bad, 3)


# ---- particle filtering


def test_particle_filtering_cold_is_greedy_on_correctness():
  task = FakeTask(4, "01")
  correct = 0
  for index in range(20):
    problem = task.problem(0, index)
    r = particle.particle_filtering(FakePropose(problem, 0.5), FakeScore(task, problem),
                                    core.Budget(8), temperature=1e-3, key=index)
    if r.answer == problem.answer:
      correct += 1
      # every resampling kept only correct particles: all agree before the last step
      # (the last round, which finishes them all, is not resampled)
      assert all(all(task.step_labels(problem, s.text)[:-1]) for s in r.candidates)
  # a round fails only if all 8 particles err (2^-8); one sample is right w.p. 1/16
  assert correct >= 19


def test_entropic_annealing_raises_temperature_when_weights_collapse():
  _, problem, _, _ = _setup(depth=4, digits="0123", p_correct=0.3)
  task = FakeTask(4, "0123")
  plain = particle.particle_filtering(FakePropose(problem, 0.3), FakeScore(task, problem),
                                      core.Budget(8), key=5)
  assert set(plain.info["temperatures"]) == {1.0}
  assert min(plain.info["entropies"]) < 0.9
  hot = particle.particle_filtering(FakePropose(problem, 0.3), FakeScore(task, problem),
                                    core.Budget(8), anneal=0.9, max_temperature=64.0, key=5)
  temps, ents = hot.info["temperatures"], hot.info["entropies"]
  assert max(temps) > 1.0
  assert all(h >= 0.9 or t == 64.0 for t, h in zip(temps, ents))


# ---- A*


def test_astar_with_an_enumerating_policy_pops_the_correct_answer_first():
  task = FakeTask(4, "012")
  for index in range(6):
    problem = task.problem(0, index)
    r = astar(EnumPropose(problem, 0.0), FakeScore(task, problem), core.Budget(1),
                    expand=3, max_expansions=64, key=index)
    assert r.answer == problem.answer and r.info["stop"] == "goal"
    assert r.info["f"] == pytest.approx(0.0)


def test_astar_path_cost():
  assert path_cost([]) == 0.0
  assert path_cost([1.0, 1.0]) == pytest.approx(0.0)
  assert path_cost([0.5], h_weight=0.0) == pytest.approx(np.log(2))
  assert path_cost([1.0, 0.5]) == pytest.approx(2 * np.log(2))


# ---- argument errors


def test_value_errors():
  _, _, propose, score = _setup()
  with pytest.raises(ValueError, match=r"n=8.*beam_width=3"):
    tree.beam_search(propose, score, core.Budget(8), beam_width=3)
  with pytest.raises(ValueError, match=r"n=2.*beam_width=4"):
    tree.dvts(propose, score, core.Budget(2), beam_width=4)
  with pytest.raises(ValueError, match="beam_width"):
    tree.lookahead(propose, score, core.Budget(4), beam_width=0)
  with pytest.raises(ValueError, match="depth"):
    tree.lookahead(propose, score, core.Budget(4), beam_width=2, depth=-1)
  with pytest.raises(ValueError, match="aggregate"):
    tree.beam_search(propose, score, core.Budget(4), beam_width=2, aggregate="mean")
  with pytest.raises(ValueError, match="resampling"):
    particle.particle_filtering(propose, score, core.Budget(4), resampling="stratified")
  for t in (0.0, -1.0):
    with pytest.raises(ValueError, match="temperature"):
      particle.particle_filtering(propose, score, core.Budget(4), temperature=t)
  with pytest.raises(ValueError, match="anneal"):
    particle.particle_filtering(propose, score, core.Budget(4), anneal=1.5)
  with pytest.raises(ValueError, match="expand"):
    astar(propose, score, core.Budget(1), expand=0)
  assert propose.calls == 0 and score.calls == 0

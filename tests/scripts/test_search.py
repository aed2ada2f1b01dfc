"""The search sweep and the one-method CLI on a random-weight policy (no training)."""

import json
import os

import jax
import pytest

import model
from scripts import checkpoint_lib, search_lib
from scripts.configs.sweeps import search as search_config


@pytest.fixture(scope="module")
def policy_dir(tmp_path_factory):
  root = tmp_path_factory.mktemp("search")
  cfg = model.config.get_preset("test")
  checkpoint_lib.save_params(str(root / "train"), model.init(cfg, jax.random.key(0)), cfg)
  with open(root / "policy.json", "w") as f:
    json.dump(dict(task="arithmetic", checkpoint=str(root / "train")), f)
  return str(root)


def _config(policy_dir, **kw):
  c = search_config.get_config("smoke")
  with c.unlocked():
    c.policy_dir = policy_dir
    c.split.n = 2
    c.methods = ("majority_vote", "best_of_n", "beam_search:beam_width=2", "particle_filtering")
    c.budgets = (1, 2)
    c.tree_max_budget = 2
    c.coverage_n = 2
    c.compute_optimal.update(budgets=(4,), fit_n=2, probe=2, bins=1,
                             candidates=("majority_vote", "best_of_n"))
    c.temperature = 1.0
    for k, v in kw.items():
      setattr(c, k, v)
  return c


def test_sweep_writes_results_and_resumes(policy_dir, tmp_path):
  out = str(tmp_path / "run")
  r = search_lib.run(_config(policy_dir), out)
  keys = {(x["method"], x["budget"]) for x in r["rows"]}
  assert ("beam_search:beam_width=2", 2) in keys and ("beam_search:beam_width=2", 1) not in keys
  assert ("compute_optimal", 4) in keys
  for x in r["rows"]:
    assert 0 <= x["accuracy"] <= 1 and len(x["correct"]) == 2
    assert x["tokens"] > 0 and x["forward_passes"] > 0
  assert {os.path.basename(f) for f in r["files"]} >= {"search_tokens.png", "search.json",
                                                        "search_coverage.png", "search.md"}
  n_lines = len(open(os.path.join(out, "results.jsonl")).readlines())
  again = search_lib.run(_config(policy_dir), out)  # nothing new to evaluate
  assert len(open(os.path.join(out, "results.jsonl")).readlines()) == n_lines
  assert [x["accuracy"] for x in again["rows"]] == [x["accuracy"] for x in r["rows"]]


def test_cli_runs_one_method(policy_dir):
  flags = dict(policy=policy_dir, method="best_of_n:aggregate=min", budget=2, n=2, seed=0,
               difficulty="1,1", temperature=1.0, reward="oracle", output=None)
  assert "best_of_n:aggregate=min" in search_lib.search_from_flags(flags)
  with pytest.raises(ValueError, match="--budget=3 does not fit"):
    search_lib.search_from_flags({**flags, "method": "beam_search", "budget": 3})


def test_bad_config_is_rejected_before_compute(policy_dir):
  with pytest.raises(ValueError, match="unknown method 'bon'"):
    search_lib.validate(_config(policy_dir, methods=("bon",)))
  with pytest.raises(ValueError, match="unknown reward"):
    search_lib.validate(_config(policy_dir, reward="judge"))
  with pytest.raises(ValueError, match="config.budgets\\[0\\]=0"):
    search_lib.validate(_config(policy_dir, budgets=(0,)))
  with pytest.raises(ValueError, match="search config arg='sudoku'"):
    search_config.get_config("sudoku")
  with pytest.raises(ValueError, match="opt=value"):
    search_lib.parse_spec("beam_search:4")


def test_claims_report_verdicts_from_rows():
  rows = [dict(method=m, budget=b, accuracy=a, tokens=t)
          for m, b, a, t in [("majority_vote", 2, 0.4, 60), ("majority_vote", 4, 0.5, 120),
                             ("rpc", 2, 0.5, 60), ("first_finish:m=3", 4, 0.5, 90)]]
  cov = dict(ks=[1, 2, 4], pass_at_k=[0.3, 0.5, 0.7], majority_first_k=[0.3, 0.4, 0.5],
             fit=dict(r2=0.99))
  verdicts = {c["claim"]: c["holds"] for c in search_lib.claims(rows, cov)}
  assert verdicts["RPC matches majority vote with about half the samples"] is True
  assert verdicts["first-finish (short-3@k) saves tokens at equal accuracy"] is True


def test_coverage_judges_the_voted_answer_by_the_verifier():
  from tests.decoding.search_fakes import FakePropose, FakeTask

  class SameAnswer(FakeTask):  # every finished text claims one answer (as Countdown's target)
    def extract_answer(self, text):
      return "x" if text.endswith("\n") else None

    def is_correct(self, problem, text):
      return text == problem.target

  class Policy:
    def bind(self, problem):
      return FakePropose(problem, p_correct=0.6)

  task = SameAnswer(depth=2)
  probs = task.problems(0, 6)
  cov = search_lib.coverage(probs, Policy(), task, 4, 0, [1, 2, 4])
  assert cov["pass_at_k"] == sorted(cov["pass_at_k"]) and len(cov["correct_counts"]) == 6
  # The vote is always "x" (the first sample's), so majority accuracy = first-sample accuracy.
  assert cov["majority_first_k"][0] == cov["majority_first_k"][2]
  firsts = [task.is_correct(p, FakePropose(p, p_correct=0.6)(
      [search_lib.core.Sample()] * 4, search_lib.core.fold(0, i), until="end")[0][0].text)
            for i, p in enumerate(probs)]
  assert cov["majority_first_k"][0] == sum(firsts) / 6

"""Reward models: oracle / outcome labels, the noisy PRM's channel and calibration, value heads."""

import json

import jax
import numpy as np
import pytest

import model
from decoding.search import reward
from decoding.search.core import Sample
from decoding.tasks.arithmetic import ARITHMETIC, from_chain

P = from_chain(47, (("+", 15), ("*", 3), ("-", 26)))  # 47+15=62,62*3=186,186-26=160;160
TEXTS = {
    "correct": "47+15=62,62*3=186,186-26=160;160\n",
    "wrong_second": "47+15=62,62*3=180,180-26=154;154\n",
    "unfinished": "47+15=62,62*3=186,186-2",
    "wrong_answer": "47+15=62,62*3=186,186-26=160;161\n",
    "lucky": "47+15=63,62*3=186,186-26=160;160\n",  # a wrong step, then the right answer
    "empty": "",
    "partial_step": "47+15=62,",
}
ORACLE = {
    "correct": [1.0, 1.0, 1.0],
    "wrong_second": [1.0, 0.0, 0.0],
    "unfinished": [1.0, 1.0],
    "wrong_answer": [1.0, 1.0, 0.0],
    "lucky": [0.0, 0.0, 1.0],  # the finished last step is the outcome verifier's
    "empty": [],
    "partial_step": [1.0],
}
CFG = model.get_preset("test")


@pytest.fixture(scope="module")
def params():
  return model.init(CFG, jax.random.key(0))


def samples(*names):
  return [Sample(TEXTS[n], finished="\n" in TEXTS[n]) for n in names]


def test_oracle_scores_are_step_labels_with_the_outcome_on_the_last_step():
  score = reward.OraclePRM(ARITHMETIC).bind(P)
  names = list(TEXTS)
  scores, cost = score(samples(*names))
  assert scores == [ORACLE[n] for n in names]
  assert cost.reward_calls == len(names) and cost.forward_passes == 0 and cost.tokens == 0
  assert score.calls == len(names) and score.vocab_size is None
  score(samples("correct"))
  assert score.calls == len(names) + 1
  assert score([])[0] == []


def test_outcome_mode_scores_finished_samples_only():
  score = reward.OraclePRM(ARITHMETIC, outcome=True).bind(P)
  scores, cost = score(samples("correct", "wrong_second", "unfinished", "wrong_answer", "lucky"))
  assert scores == [[1.0], [0.0], [], [0.0], [1.0]] and cost.reward_calls == 5
  # Cut at the length limit: finished without END, so judged (and wrong).
  assert score([Sample(TEXTS["unfinished"], finished=True)])[0] == [[0.0]]


def test_step_end_positions_match_segments():
  for text in TEXTS.values():
    toks = list(text.encode())
    pos = reward.step_end_positions(toks)
    assert len(pos) == len(ARITHMETIC.step_labels(P, text))
    assert all(toks[i] in (ord(","), ord("\n")) for i in pos)
  assert reward.step_end_positions(list(b"1+2=3,3;3\n,4,")) == [5, 9]  # nothing after END
  assert reward.step_end_positions(list(b"a,,b")) == [1, 2]  # an empty step counts


def test_noisy_without_noise_thresholds_to_the_oracle():
  names = list(TEXTS)
  for sharp, seed in ((1.0, 0), (3.0, 1), (0.5, 2)):
    scores, cost = reward.NoisyPRM(ARITHMETIC, fp=0, fn=0, sharpness=sharp, seed=seed).bind(P)(
        samples(*names))
    assert cost.reward_calls == len(names)
    for n, s in zip(names, scores):
      assert [float(v > 0.5) for v in s] == ORACLE[n]
      assert all(0 < v < 1 for v in s)


def chain_texts(n_problems=320):
  """Reference solutions (8 steps) and copies with a corrupted result from step k on."""
  rng = np.random.default_rng(0)
  out = []
  for p in ARITHMETIC.problems(seed=5, n=n_problems, difficulty=(2, 8)):
    out.append((p, p.target))
    steps = p.target[:-1].split(",")
    k = int(rng.integers(0, 4))
    body, res = steps[k].rsplit("=", 1)
    bad = steps[:k] + [f"{body}={int(res.split(';')[0]) + 1}"] + steps[k + 1 :]
    out.append((p, ",".join(bad) + ("" if ";" in bad[-1] else ";0") + "\n"))
  return out


def test_noisy_empirical_error_rates_match_fp_fn():
  prm = reward.NoisyPRM(ARITHMETIC, fp=0.2, fn=0.1, seed=3)
  oracle = reward.OraclePRM(ARITHMETIC)
  counts = np.zeros((2, 2))  # [oracle label, reported label]
  for p, text in chain_texts():
    lab = oracle.bind(p)([Sample(text, finished=True)])[0][0]
    got = prm.bind(p)([Sample(text, finished=True)])[0][0]
    for a, b in zip(lab, got):
      counts[int(a), int(b > 0.5)] += 1
  assert counts.sum() > 5000 and counts[0].sum() > 1500 and counts[1].sum() > 2500
  fp_rate = counts[0, 1] / counts[0].sum()
  fn_rate = counts[1, 0] / counts[1].sum()
  # Tolerance 0.03: > 4 binomial standard deviations at these counts (the seed is fixed).
  assert abs(fp_rate - 0.2) < 0.03 and abs(fn_rate - 0.1) < 0.03, (fp_rate, fn_rate)


def test_noisy_scores_are_deterministic_per_prefix():
  prm = reward.NoisyPRM(ARITHMETIC, fp=0.3, fn=0.3, sharpness=1.5, bias=0.2, seed=7)
  a = prm.bind(P)(samples("correct", "wrong_second"))[0]
  b = prm.bind(P)(samples("unfinished", "partial_step", "correct"))[0]
  assert a[0] == b[2]  # the same text, alone or among others, in a fresh binding
  assert a[0][:2] == b[0] == a[0][:2]  # a shared prefix scores the same whatever follows
  assert a[0][0] == a[1][0] == b[1][0]  # "47+15=62," in every text
  assert a[0][1] != a[1][1]  # a different second step is a different prefix
  other = reward.NoisyPRM(ARITHMETIC, fp=0.3, fn=0.3, sharpness=1.5, bias=0.2, seed=8)
  assert other.bind(P)(samples("correct"))[0][0] != a[0]


def test_sharpness_pushes_to_extremes_and_bias_shifts():
  texts = [Sample(t, finished=True) for _, t in chain_texts(60)]
  ps = [p for p, _ in chain_texts(60)]

  def all_scores(**kw):
    prm = reward.NoisyPRM(ARITHMETIC, fp=0.2, fn=0.2, seed=1, **kw)
    return np.concatenate([prm.bind(p)([s])[0][0] for p, s in zip(ps, texts)])

  calm, sharp, soft = all_scores(), all_scores(sharpness=3.0), all_scores(sharpness=0.5)
  assert np.array_equal(calm > 0.5, sharp > 0.5)  # the same reports, more confident
  assert np.all(np.abs(sharp - 0.5) >= np.abs(calm - 0.5) - 1e-12)
  assert np.all(np.abs(soft - 0.5) <= np.abs(calm - 0.5) + 1e-12)
  assert np.mean(np.minimum(sharp, 1 - sharp) < 0.05) > 2 * np.mean(
      np.minimum(calm, 1 - calm) < 0.05)
  assert abs(np.mean(calm > 0.5) - np.mean(calm)) < 0.05  # calibrated on its own reports
  up = all_scores(bias=1.0)
  assert np.all(up > calm) and np.all((up >= 0) & (up <= 1))


@pytest.mark.parametrize("kw, match", [
    (dict(fp=-0.1), r"fp=-0.1 must be a probability in \[0, 1\]"),
    (dict(fn=1.5), r"fn=1.5 must be a probability in \[0, 1\]"),
    (dict(fp=True), r"fp=True"),
    (dict(sharpness=0.0), r"sharpness=0.0 must be a finite number > 0"),
    (dict(sharpness=-1), r"sharpness=-1"),
    (dict(bias=float("nan")), r"bias=nan"),
    (dict(seed=1.5), r"seed=1.5 must be an int"),
])
def test_noisy_bad_args(kw, match):
  with pytest.raises(ValueError, match=match):
    reward.NoisyPRM(ARITHMETIC, **kw)


def test_check_vocab():
  reward.check_vocab(259, 259)
  reward.check_vocab(259, None)
  reward.check_vocab(None, 100)
  with pytest.raises(ValueError, match="reward model vocab_size=100 differs from the "
                                       "policy's vocab_size=259"):
    reward.check_vocab(259, 100)


def test_fit_value_head_separates_linear_data():
  rng = np.random.default_rng(0)
  w = rng.normal(size=16)
  x = rng.normal(size=(3000, 16)).astype(np.float32) * 2 + 1.5  # off-centre, scaled
  margin = (x - 1.5) @ w
  keep = np.abs(margin) > 0.3
  x, y = x[keep], (margin[keep] > 0).astype(np.int32)
  head, hist = reward.fit_value_head(x[:2000], y[:2000], steps=300, key=1)
  acc = np.mean((np.asarray(reward.value_head_apply(head, x[2000:])) > 0) == y[2000:])
  assert acc > 0.95 and hist["train_accuracy"] > 0.95
  assert hist["loss"].shape == (300,) and hist["loss"][-20:].mean() < hist["loss"][:5].mean()
  mlp, hist = reward.fit_value_head(x, y, steps=200, key=2, hidden=8, balance=True)
  assert reward.head_dims(mlp) == (16, 8) and hist["train_accuracy"] > 0.95


def test_fit_value_head_bad_args():
  x, y = np.zeros((4, 3)), np.array([0, 1, 0, 1])
  with pytest.raises(ValueError, match="labels must be 0 / 1"):
    reward.fit_value_head(x, np.array([0, 2, 0, 1]))
  with pytest.raises(ValueError, match="labels must be"):
    reward.fit_value_head(x, y[:3])
  with pytest.raises(ValueError, match="lr=0"):
    reward.fit_value_head(x, y, lr=0)
  with pytest.raises(ValueError, match="hidden=-1"):
    reward.fit_value_head(x, y, hidden=-1)


def test_learned_prm_scores_every_step_batch_independently(params):
  head = reward.init_value_head(CFG.d_model, 3, hidden=4)
  score = reward.LearnedPRM(CFG, params, head, ARITHMETIC).bind(P)
  names = list(TEXTS)
  scores, cost = score(samples(*names))
  assert [len(s) for s in scores] == [len(ORACLE[n]) for n in names]
  assert all(0 < v < 1 for s in scores for v in s)
  assert score.vocab_size == CFG.vocab_size and score.calls == len(names)
  assert cost.reward_calls == len(names) and cost.forward_passes == 0 and cost.flops > 0
  assert cost.forward_tokens == 0 and cost.bytes_moved > 0
  for n, s in zip(names, scores):
    alone, c1 = score(samples(n))
    np.testing.assert_allclose(alone[0], s, atol=1e-5, rtol=0)
    assert (c1.flops > 0) == bool(s)
  # A step's score sees only its prefix (causal): shared steps score alike across texts.
  np.testing.assert_allclose(scores[0][:2], scores[2], atol=1e-5)
  with pytest.raises(ValueError, match="input dim 5 differs from the model's d_model=64"):
    reward.LearnedPRM(CFG, params, reward.init_value_head(5, 0), ARITHMETIC)


def test_labelled_steps_and_features(params):
  smp = samples("correct", "lucky", "unfinished", "empty")
  rows, pos, labels = reward.labelled_steps(ARITHMETIC, P, smp)
  assert [list(v) for v in labels] == [ORACLE[n] for n in ("correct", "lucky", "unfinished",
                                                           "empty")]
  assert rows[0][: len(P.prompt) + 1] == ARITHMETIC.prompt_tokens(P)
  assert all(rows[0][i] in (ord(","), ord("\n")) for i in pos[0])
  _, _, outcome = reward.labelled_steps(ARITHMETIC, P, smp, target="outcome")
  assert [list(v) for v in outcome] == [[1, 1, 1], [1, 1, 1], [0, 0], []]
  with pytest.raises(ValueError, match="target='soft'"):
    reward.labelled_steps(ARITHMETIC, P, smp, target="soft")
  feats = reward.step_features(CFG, params, rows, pos, batch_rows=2)
  full = reward.value_features(CFG, params, rows)
  assert feats.shape == (8, CFG.d_model) and full.shape == (4, max(map(len, rows)), CFG.d_model)
  want = np.concatenate([full[i, p] for i, p in enumerate(pos) if len(p)])
  np.testing.assert_allclose(feats, want, atol=1e-5)
  # Final-normed: RMS over D equals the norm's scale (ones at init), up to eps.
  np.testing.assert_allclose(np.sqrt(np.mean(feats ** 2, -1)), 1.0, atol=1e-3)
  # The head trained on them scores those steps as labelled (the data is tiny: memorised).
  head, hist = reward.fit_value_head(feats, np.concatenate(labels), steps=300, key=0)
  got, _ = reward.LearnedPRM(CFG, params, head, ARITHMETIC).bind(P)(smp)
  assert [[float(v > 0.5) for v in s] for s in got] == [list(v) for v in labels]


def test_save_load_round_trip(tmp_path):
  head = reward.init_value_head(CFG.d_model, 4, hidden=3)
  path = reward.save_head(tmp_path / "sub" / "prm", head, {"task": "arithmetic", "acc": 0.9})
  assert path.endswith("prm.npz")
  loaded, meta = reward.load_head(path)
  assert meta == {"task": "arithmetic", "acc": 0.9} and set(loaded) == set(head)
  for k in head:
    np.testing.assert_array_equal(np.asarray(loaded[k]), np.asarray(head[k]))
  side = json.loads((tmp_path / "sub" / "prm.json").read_text())
  assert side["hidden"] == 3 and side["d_model"] == CFG.d_model and side["meta"] == meta
  assert sorted(p.name for p in (tmp_path / "sub").iterdir()) == ["prm.json", "prm.npz"]
  with pytest.raises(ValueError, match="JSON"):
    reward.save_head(tmp_path / "bad", head, {"x": object()})
  assert not (tmp_path / "bad.npz").exists()

"""Exact top-k masks, magnitude / random criteria, apply_masks, rules and reports."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import model
import sparsity

CFG = model.get_preset("test")
SPARSITIES = (0.0, 0.25, 0.5, 0.9)


def _flat(tree):
  paths, leaves, _ = model.flatten(tree, is_leaf=lambda x: x is None)
  return dict(zip(paths, leaves, strict=True))


def _kernels(params):
  return {p: np.asarray(w) for p, w in _flat(params).items() if p.endswith("/kernel")}


def _oracle_keep(score, s):
  """Brute force: prune the n lowest scores, ties to the lower flat index (lexsort)."""
  flat = np.asarray(score, np.float32).reshape(-1)
  order = np.lexsort((np.arange(flat.size), flat))
  keep = np.ones(flat.size, bool)
  keep[order[:sparsity.n_pruned(s, flat.size)]] = False
  return keep.reshape(np.shape(score))


@pytest.mark.parametrize("s", SPARSITIES + (0.3, 0.999))
def test_keep_mask_matches_bruteforce_with_ties(s):
  score = jax.random.randint(jax.random.key(1), (37, 23), 0, 5).astype(jnp.float32)
  keep = np.asarray(sparsity.keep_mask(score, s))
  assert (~keep).sum() == sparsity.n_pruned(s, score.size)
  np.testing.assert_array_equal(keep, _oracle_keep(score, s))


def test_keep_mask_per_slice_axis():
  score = jax.random.normal(jax.random.key(2), (16, 5))
  keep = np.asarray(sparsity.keep_mask(score, 0.5, axis=0))
  assert ((~keep).sum(axis=0) == 8).all()
  for j in range(5):
    np.testing.assert_array_equal(keep[:, j], _oracle_keep(score[:, j], 0.5))


@pytest.mark.parametrize("s", SPARSITIES)
def test_magnitude_layerwise_exact(params, s):
  masks = _flat(sparsity.magnitude_masks(params, s))
  kernels = _kernels(params)
  # Default rules: only 2-D kernels get masks; embedding and norm scales stay dense.
  assert {p for p, m in masks.items() if m is not None} == set(kernels)
  for path, w in kernels.items():
    m = np.asarray(masks[path])
    assert m.shape == w.shape and m.dtype == bool
    assert (~m).sum() == sparsity.n_pruned(s, w.size), path
    np.testing.assert_array_equal(m, _oracle_keep(np.abs(w), s))
  assert sparsity.mask_sparsity(sparsity.magnitude_masks(params, s)) == pytest.approx(s, abs=1e-4)


@pytest.mark.parametrize("s", SPARSITIES)
def test_magnitude_global_is_global_bruteforce(params, s):
  masks = _flat(sparsity.magnitude_masks(params, s, scope="global"))
  kernels = _kernels(params)
  paths = sorted(kernels)  # tree-flatten order of a dict tree
  scores = np.concatenate([np.abs(kernels[p]).reshape(-1) for p in paths])
  expect = _oracle_keep(scores, s)
  got = np.concatenate([np.asarray(masks[p]).reshape(-1) for p in paths])
  assert (~got).sum() == sparsity.n_pruned(s, scores.size)
  np.testing.assert_array_equal(got, expect)
  if s > 0:  # one global threshold: every pruned |w| <= every kept |w|
    assert scores[~got].max() <= scores[got].min()
    per_layer = {p: 1 - np.asarray(masks[p]).mean() for p in paths}
    assert max(per_layer.values()) - min(per_layer.values()) > 0.01  # not layerwise


def test_global_ties_exact_and_deterministic():
  tree = {"a": {"kernel": jnp.ones((8, 4))}, "b": {"kernel": jnp.ones((4, 4))}}
  masks = sparsity.magnitude_masks(tree, 0.5, scope="global")
  a, b = np.asarray(masks["a"]["kernel"]), np.asarray(masks["b"]["kernel"])
  assert (~a).sum() + (~b).sum() == 24
  # All scores tie: the first 24 entries in flatten order ("a" before "b") are pruned.
  assert (~a.reshape(-1)[:24]).all() and a.reshape(-1)[24:].all() and b.all()


def test_random_masks_exact_seeded(params):
  k = jax.random.key(3)
  m1 = _flat(sparsity.random_masks(params, 0.5, key=k))
  m2 = _flat(sparsity.random_masks(params, 0.5, key=k))
  m3 = _flat(sparsity.random_masks(params, 0.5, key=jax.random.key(4)))
  for path, w in _kernels(params).items():
    assert (~np.asarray(m1[path])).sum() == w.size // 2
    np.testing.assert_array_equal(m1[path], m2[path])
    assert (np.asarray(m1[path]) != np.asarray(m3[path])).any()
  with pytest.raises(ValueError, match="key"):
    sparsity.random_masks(params, 0.5, key=None)


def test_apply_masks_zeros_exactly_the_masked_entries(params):
  masks = sparsity.magnitude_masks(params, 0.5)
  before = jax.tree.map(np.asarray, params)
  out = sparsity.apply_masks(params, masks)
  for path, w in _flat(params).items():
    m, o = _flat(masks)[path], np.asarray(_flat(out)[path])
    if m is None:
      np.testing.assert_array_equal(o, w)
    else:
      m = np.asarray(m)
      assert (o[~m] == 0).all()
      np.testing.assert_array_equal(o[m], np.asarray(w)[m])
  jax.tree.map(np.testing.assert_array_equal, params, before)  # input untouched
  with pytest.raises(ValueError, match="shape"):
    sparsity.apply_masks({"w": jnp.ones((2, 3))}, {"w": jnp.ones((3, 2), bool)})


def test_rules_first_match_wins(params):
  rules = [(r"^layers_0/attn/q/", 0.25), (r"^layers_0/", None), (r"attn/q/", 0.75)]
  masks = _flat(sparsity.magnitude_masks(params, 0.5, rules=rules))
  sp = lambda p: 1 - np.asarray(masks[p]).mean()
  assert sp("layers_0/attn/q/kernel") == 0.25
  assert masks["layers_0/attn/k/kernel"] is None and masks["layers_0/mlp/up/kernel"] is None
  assert sp("layers_1/attn/q/kernel") == 0.75
  assert sp("layers_1/attn/k/kernel") == 0.5
  # A user rule can prune a leaf the defaults skip.
  masks = _flat(sparsity.magnitude_masks(params, 0.5, rules=[("embed/embedding", 0.1)]))
  assert 1 - np.asarray(masks["embed/embedding"]).mean() == pytest.approx(0.1, abs=1e-4)


def test_global_with_override_rule(params):
  """Overridden leaves are ranked alone; the rest share one exact global ranking."""
  masks = _flat(sparsity.magnitude_masks(params, 0.5, rules=[("attn/q/", 0.75)],
                                         scope="global"))
  kernels = _kernels(params)
  shared = sorted(p for p in kernels if "attn/q/" not in p)
  for p in set(kernels) - set(shared):
    np.testing.assert_array_equal(masks[p], _oracle_keep(np.abs(kernels[p]), 0.75))
  got = np.concatenate([np.asarray(masks[p]).reshape(-1) for p in shared])
  scores = np.concatenate([np.abs(kernels[p]).reshape(-1) for p in shared])
  np.testing.assert_array_equal(got, _oracle_keep(scores, 0.5))


@pytest.mark.parametrize("rules,match", [
    ([("no_such_param", None)], "'no_such_param' matches no param path"),
    ([("attn/", None), ("attn/q/", 0.5)], "'attn/q/' is shadowed by earlier rules"),
])
def test_unused_rule_is_an_error(params, rules, match):
  with pytest.raises(ValueError, match=match):
    sparsity.magnitude_masks(params, 0.5, rules=rules)


@pytest.mark.parametrize("rules,match", [
    ([("attn/", 1.0)], r"\[0, 1\)"), ([("(", None)], "is not a valid regex"),
    ([("attn/", "dense")], "must be None"), (["attn/"], "pair")])
def test_bad_rules(params, rules, match):
  with pytest.raises(ValueError, match=match):
    sparsity.magnitude_masks(params, 0.5, rules=rules)


@pytest.mark.parametrize("s", [-0.1, 1.0, 1.5, float("nan"), True, "0.5"])
def test_bad_sparsity_values(params, s):
  with pytest.raises(ValueError, match="sparsity"):
    sparsity.magnitude_masks(params, s)


def test_report_counts_and_magnitude_beats_random(params):
  pruned, masks, report = sparsity.prune_with_masks(params, "magnitude:0.5")
  _, _, rand = sparsity.prune_with_masks(params, "random:0.5", key=jax.random.key(0))
  json.dumps(report)
  t = report["totals"]
  assert t["params"] == model.count_params(params)
  assert t["nonzeros"] == sum(int(np.count_nonzero(x)) for x in jax.tree.leaves(pruned))
  assert t["masked_params"] == sum(w.size for w in _kernels(params).values())
  assert t["masked_sparsity"] == 0.5 and t["bytes"] == 4 * t["params"]
  assert t["nonzero_bytes"] == 4 * t["nonzeros"]
  for path, e in report["layers"].items():
    assert e["masked"] == path.endswith("/kernel")
    if e["masked"]:
      assert e["sparsity"] == 0.5
      # Magnitude pruning minimises ||w - w_pruned|| for a given count.
      assert e["rel_error"] < rand["layers"][path]["rel_error"]
  text = sparsity.format_report(report)
  assert "layers_1/mlp/down/kernel" in text and "embed" not in text

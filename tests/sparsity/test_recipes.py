"""Recipe strings, the prune transform, and pruned models through model.apply."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import model
import sparsity

CFG = model.get_preset("test")
_apply = jax.jit(lambda params, tokens: model.apply(CFG, params, tokens)[0])


def test_parse_recipe():
  assert sparsity.parse_recipe("magnitude:0.5") == ("magnitude", {"sparsity": 0.5})
  assert sparsity.parse_recipe(" magnitude_global : 0.9 ") == (
      "magnitude_global", {"sparsity": 0.9})
  assert set(sparsity.PRUNE_METHODS) >= {"magnitude", "magnitude_global", "random"}


@pytest.mark.parametrize("recipe,match", [
    ("wandaa:0.5", r"unknown pruning method 'wandaa'.*magnitude:SPARSITY.*random:SPARSITY"),
    ("magnitude", "takes one argument"), ("magnitude:0.5:2", "takes one argument"),
    ("magnitude:abc", "not a number"), ("magnitude:1.0", r"outside the valid range \[0, 1\)"),
    ("magnitude:-0.5", r"outside the valid range \[0, 1\)"), ("", "METHOD:ARGS"),
])
def test_bad_recipes(params, recipe, match):
  with pytest.raises(ValueError, match=match):
    sparsity.prune(params, recipe)


def test_bad_input_raises_before_compute(params, monkeypatch):
  """Validation happens before any mask is computed."""
  def boom(*a, **k):
    raise AssertionError("computed masks before validating")
  monkeypatch.setattr(sparsity.masks, "keep_mask", boom)
  monkeypatch.setattr(sparsity.masks, "global_keep_masks", boom)
  for recipe, kw in [("magnitude:1.2", {}), ("random:0.5", {}),
                     ("magnitude_global:0.5", dict(rules=[("nope", None)]))]:
    with pytest.raises(ValueError):
      sparsity.prune(params, recipe, **kw)


@pytest.mark.parametrize("recipe,kw", [
    ("magnitude:0.5", {}), ("magnitude_global:0.5", {}),
    ("random:0.5", dict(key=jax.random.key(7)))])
def test_prune_transform(params, recipe, kw):
  pruned, report = sparsity.prune(params, recipe, **kw)
  assert jax.tree.structure(pruned) == jax.tree.structure(params)
  assert report["recipe"] == recipe and report["sparsity"] == 0.5
  assert report["totals"]["masked_sparsity"] == 0.5
  json.dumps(report)
  logits = _apply(pruned, jnp.arange(16)[None])
  assert logits.shape == (1, 16, CFG.vocab_size) and bool(jnp.isfinite(logits).all())
  dense = _apply(params, jnp.arange(16)[None])
  assert not np.allclose(logits, dense)


def test_zero_sparsity_is_identity(params):
  pruned, report = sparsity.prune(params, "magnitude:0.0")
  jax.tree.map(np.testing.assert_array_equal, pruned, params)
  assert report["totals"]["masked_sparsity"] == 0.0


def test_prune_rules_and_report(params):
  rules = [(r"mlp/down", None), (r"attn/", 0.75)]
  pruned, masks, report = sparsity.prune_with_masks(params, "magnitude:0.5", rules=rules)
  assert masks["layers_1"]["mlp"]["down"]["kernel"] is None
  layers = report["layers"]
  assert layers["layers_0/attn/v/kernel"]["sparsity"] == 0.75
  assert layers["layers_0/mlp/up/kernel"]["sparsity"] == 0.5
  assert not layers["layers_0/mlp/down/kernel"]["masked"]
  assert report["rules"] == [[r"mlp/down", None], [r"attn/", 0.75]]


def test_register_rejects_duplicates():
  with pytest.raises(ValueError, match="already registered"):
    sparsity.register("magnitude", sparsity.PRUNE_METHODS["magnitude"])


def test_parse_rule():
  from sparsity.rules import PRUNE, parse_rule
  assert parse_rule("mlp/down=none") == ("mlp/down", None)
  assert parse_rule("attn/(q|k)=0.75") == ("attn/(q|k)", 0.75)
  assert parse_rule("^embed/=prune") == ("^embed/", PRUNE)
  for bad in ("attn", "=0.5", "attn=1.0", "attn=half"):
    with pytest.raises(ValueError, match="SPEC"):
      parse_rule(bad)

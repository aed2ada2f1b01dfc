"""The param tree's vocabulary: paths, the one rule matcher, logical sizes and stored bytes."""

import jax
import jax.numpy as jnp
import pytest

import model
import quant

CFG = model.get_preset("test")
PATHS = ["embed/embedding", "layers_0/attn/q/kernel", "layers_0/attn/k/kernel",
         "layers_1/attn/q/kernel", "final_norm/scale"]


def test_path_str_names_dict_keys_attributes_and_indices():
  tree = {"a": [jnp.zeros(1), {"b": jnp.zeros(2)}], "q": quant.quantize_tensor(jnp.ones((4, 2)))}
  paths, _, _ = model.flatten(tree, is_leaf=None)
  assert paths == ["a/0", "a/1/b", "q/values", "q/scale"]
  assert model.flatten(tree)[0] == ["a/0", "a/1/b", "q"]  # QArrays are leaves by default


def test_user_rules_before_defaults_first_match_wins():
  rules = [(r"^layers_0/attn/q/", "a"), (r"attn/q/", "b")]
  defaults = [(r"attn/", "d"), (r"kernel$", "never")]
  got = model.match_rules(PATHS, rules, defaults, kind="test", unmatched="-")
  assert got == ["-", "a", "d", "b", "-"]


def test_unused_user_rule_says_why_and_defaults_may_win_nothing():
  model.match_rules(PATHS, [], [(r"lm_head/", 1)], kind="test")  # a default may win nothing
  with pytest.raises(ValueError, match="test rule 'lm_head/' matches no param path"):
    model.match_rules(PATHS, [(r"lm_head/", 1)], kind="test")
  with pytest.raises(ValueError, match="test rule 'attn/q/' is shadowed by earlier rules"):
    model.match_rules(PATHS, [(r"attn/", 1), (r"attn/q/", 2)], kind="test")


@pytest.mark.parametrize("rules, match", [
    ([("(", 1)], r"test rule '\(' is not a valid regex"), (["attn/"], "pair"),
    ([("attn/", "bad")], "test rule 'attn/': spec 'bad' refused")])
def test_malformed_rules(rules, match):
  def convert(spec):
    if spec == "bad":
      raise ValueError("spec 'bad' refused")
    return spec
  with pytest.raises(ValueError, match=match):
    model.match_rules(PATHS, rules, kind="test", convert=convert)


@pytest.mark.parametrize("recipe, bytes_per_weight", [("int8", 1), ("int4", 0.5), ("int2", 0.25)])
def test_counts_are_logical_and_bytes_honest(recipe, bytes_per_weight):
  params = model.param_shapes(CFG)
  q = quant.abstract_quantize(params, recipe)
  assert model.count_params(q) == model.count_params(params) == model.tree_size(params)
  kernels = [x for x in jax.tree.leaves(q, is_leaf=quant.is_qarray) if quant.is_qarray(x)]
  codes = sum(x.size for x in kernels)
  scales = sum(x.scale.size * 4 for x in kernels)
  assert model.tree_nbytes(q) == (model.tree_nbytes(params) - 4 * codes
                                  + int(codes * bytes_per_weight) + scales)

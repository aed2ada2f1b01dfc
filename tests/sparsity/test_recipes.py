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
    ("magnitude", "takes one target"), ("magnitude:0.5:2", "N:M must be two integers"),
    ("magnitude:0.5:0.5:0.5", "takes one target"), ("magnitude:3:2", "N=3 must be <= M=2"),
    ("magnitude:0:4", "N=0 must be a positive integer"), ("magnitude:0.5:foo=1", "unknown option"),
    ("magnitude:0.5:dist=bogus", "not valid; choose one of"), ("magnitude:2:4:dist=erk", "not N:M"),
    ("magnitude:2:4:block=4", "not N:M"), ("magnitude_global:2:4", "takes one target"),
    ("sparsegpt:0.5:blocksize=0", "positive integer"), ("wanda:0.5:mode=twice", "not valid"),
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


# --- Data-aware, N:M, block and distribution recipes on the whole model.

import quant  # noqa: E402
from model.calibration import Calibration, calibrate  # noqa: E402
from model.qarray import dequantize  # noqa: E402
from quant import obs  # noqa: E402
from sparsity import distributions, oneshot, structures  # noqa: E402


@pytest.fixture(scope="module")
def calib():
  toks = jax.random.randint(jax.random.key(11), (4, 32), 0, CFG.vocab_size)
  return Calibration(CFG, [toks[:2], toks[2:]])


def _kernels(tree):
  paths, leaves, _ = model.flatten(tree)
  return {p: x for p, x in zip(paths, leaves, strict=True) if x is not None}


@pytest.mark.parametrize("recipe", ["magnitude:2:4", "wanda:2:4", "sparsegpt:2:4",
                                    "random:1:4", "wanda:4:8"])
def test_nm_recipes_give_valid_patterns(params, calib, recipe):
  pruned, masks, report = sparsity.prune_with_masks(params, recipe, calib=calib,
                                                    key=jax.random.key(0))
  n, m = map(int, recipe.split(":")[1:3])
  for path, mask in _kernels(masks).items():
    assert structures.is_nm(mask, n, m, axis=0), path
    w = _kernels(pruned)[path]
    assert structures.is_nm(w != 0, n, m, axis=0), path
  assert report["totals"]["masked_sparsity"] == pytest.approx(1 - n / m)


def test_one_pass_wanda_equals_the_layer_function(params, calib):
  pruned, _ = sparsity.prune(params, "wanda:0.5:mode=one_pass", calib=calib)
  stats = calibrate(CFG, params, calib.batches)
  for path, w in _kernels(pruned).items():
    if path in stats and path.endswith("/kernel") and "embed" not in path:
      ref = oneshot.wanda_layer(_kernels(params)[path], stats[path].x_norm, sparsity=0.5)
      np.testing.assert_array_equal(w, ref)


def test_sequential_differs_after_the_first_block(params, calib):
  seq, _ = sparsity.prune(params, "sparsegpt:0.5", calib=calib)
  one, _ = sparsity.prune(params, "sparsegpt:0.5:mode=one_pass", calib=calib)
  np.testing.assert_allclose(seq["layers_0"]["mlp"]["up"]["kernel"],
                             one["layers_0"]["mlp"]["up"]["kernel"], rtol=1e-5, atol=1e-6)
  assert not np.allclose(seq["layers_1"]["attn"]["q"]["kernel"],
                         one["layers_1"]["attn"]["q"]["kernel"], atol=1e-6)


def _layer_error(stats, dense, pruned) -> float:
  """Sum over kernels of ||X (W - W_hat)||^2 / ||X W||^2 on the dense model's inputs."""
  total = 0.0
  for path, w in _kernels(pruned).items():
    if path not in stats or not path.startswith("layers_"):
      continue
    d = _kernels(dense)[path] - w
    xtx = stats[path].xtx
    total += float(jnp.trace(d.T @ xtx @ d) / jnp.trace(dense_w(dense, path).T @ xtx
                                                           @ dense_w(dense, path)))
  return total


def dense_w(dense, path):
  return _kernels(dense)[path]


@pytest.mark.parametrize("target", ["0.5", "2:4"])
def test_data_aware_methods_reconstruct_better_than_magnitude(params, calib, target):
  stats = calibrate(CFG, params, calib.batches)
  err = {m: _layer_error(stats, params, sparsity.prune(
      params, f"{m}:{target}:mode=one_pass" if m != "magnitude" else f"{m}:{target}",
      calib=calib)[0]) for m in ("magnitude", "wanda", "sparsegpt")}
  assert err["sparsegpt"] < err["wanda"] <= err["magnitude"] * 1.001, err


def test_block_recipe_prunes_whole_tiles(params):
  pruned, masks, _ = sparsity.prune_with_masks(params, "magnitude:0.5:block=4x8")
  for path, mask in _kernels(masks).items():
    r, c = mask.shape
    tiles = np.asarray(mask).reshape(r // 4, 4, c // 8, 8)
    assert (tiles.all(axis=(1, 3)) | ~tiles.any(axis=(1, 3))).all(), path
    assert (~tiles.any(axis=(1, 3))).sum() == round(0.5 * tiles.shape[0] * tiles.shape[2])
  with pytest.raises(ValueError, match="does not divide"):
    sparsity.prune(params, "magnitude:0.5:block=5x5")


def test_erk_recipe_matches_the_distribution(params):
  pruned, masks, report = sparsity.prune_with_masks(params, "magnitude:0.8:dist=erk")
  shapes = {p: tuple(m.shape) for p, m in _kernels(masks).items()}
  dens = distributions.erk_densities(shapes, 0.8)
  for path, mask in _kernels(masks).items():
    assert float(jnp.mean(mask)) == pytest.approx(dens[path], abs=1.5 / mask.size + 1e-6)
  assert report["totals"]["masked_sparsity"] == pytest.approx(0.8, abs=1e-3)
  assert len({round(d, 6) for d in dens.values()}) > 1  # not uniform


def test_owl_gives_layerwise_ratios_around_the_target(params, calib):
  _, masks, report = sparsity.prune_with_masks(params, "wanda:0.6:dist=owl:lambda=0.1",
                                               calib=calib)
  per_layer = {}
  for path, mask in _kernels(masks).items():
    per_layer.setdefault(path.split("/")[0], []).append(1 - float(jnp.mean(mask)))
  means = [np.mean(v) for v in per_layer.values()]
  assert np.mean(means) == pytest.approx(0.6, abs=0.02)
  assert max(means) - min(means) == pytest.approx(0.2, abs=0.03)  # 2 * lambda spread


def test_saliency_uses_gradients(params, calib):
  a, _ = sparsity.prune(params, "saliency:0.5", calib=calib)
  b, _ = sparsity.prune(params, "magnitude:0.5")
  ka, kb = _kernels(a), _kernels(b)
  assert any(not np.array_equal(ka[p] != 0, kb[p] != 0) for p in ka)


@pytest.mark.parametrize("recipe,kw,match", [
    ("wanda:0.5", {}, "needs calib="), ("sparsegpt:2:4", {}, "needs calib="),
    ("saliency:0.5", {}, "needs calib="), ("magnitude:0.5:dist=owl", {}, "needs calib="),
    ("wanda:0.5", dict(calib="data"), "must be a model.calibration.Calibration"),
    ("neurons:0.5", {}, "needs cfg="),
    ("magnitude:2:4", dict(rules=[("mlp/up", 0.3)]), "cannot apply to an N:M recipe"),
    ("magnitude:3:6", {}, "does not divide the input dimension"),
])
def test_bad_calibrated_input(params, calib, recipe, kw, match):
  with pytest.raises(ValueError, match=match):
    sparsity.prune(params, recipe, **kw)


def test_wrong_model_config_and_nan_weights(params, calib):
  other = Calibration(CFG.replace(ffn_dim=64), calib.batches)
  with pytest.raises(ValueError, match="does not describe these params"):
    sparsity.prune(params, "wanda:0.5", calib=other)
  bad = jax.tree.map(lambda x: x, params)
  bad["layers_1"]["mlp"]["up"]["kernel"] = bad["layers_1"]["mlp"]["up"]["kernel"].at[0, 0].set(
      jnp.nan)
  for recipe in ("magnitude:0.5", "wanda:0.5", "sparsegpt:2:4"):
    with pytest.raises(ValueError, match="layers_1/mlp/up/kernel contains NaN"):
      sparsity.prune(bad, recipe, calib=calib)


def test_structured_recipes_zero_whole_units(params):
  pruned, masks, _ = sparsity.prune_with_masks(params, "neurons:0.5", cfg=CFG)
  up = np.asarray(pruned["layers_0"]["mlp"]["up"]["kernel"])
  down = np.asarray(pruned["layers_0"]["mlp"]["down"]["kernel"])
  dead = ~up.any(axis=0)
  assert dead.sum() == CFG.ffn_dim // 2 and not down[dead].any()


def test_joint_sparsegpt_int4_beats_prune_then_round(params, calib):
  """One OBS pass that prunes 2:4 and rounds to int4 reconstructs better than two steps."""
  stats = calibrate(CFG, params, calib.batches)
  joint, masks, report = sparsity.prune_with_masks(
      params, "sparsegpt:2:4:bits=4:mode=one_pass", calib=calib)
  k = joint["layers_0"]["mlp"]["up"]["kernel"]
  assert quant.is_qarray(k) and k.bits == 4 and report["bits"] == 4
  two_step, _ = quant.quantize(sparsity.prune(params, "sparsegpt:2:4:mode=one_pass",
                                              calib=calib)[0], "int4")
  deq = lambda t: jax.tree.map(lambda x: dequantize(x) if quant.is_qarray(x) else x, t,
                               is_leaf=quant.is_qarray)
  q_kernel = np.asarray(deq(joint)["layers_0"]["attn"]["q"]["kernel"])
  assert not q_kernel[~np.asarray(_kernels(masks)["layers_0/attn/q/kernel"])].any()
  assert _layer_error(stats, params, deq(joint)) < _layer_error(stats, params, deq(two_step))


def test_singular_hessian_error_names_the_layer(params, calib, monkeypatch):
  def never(*a, **k):
    raise ValueError("hessian (64x64) stays singular after 4 damping retries")

  monkeypatch.setattr(obs, "damped_inverse_cholesky", never)
  with pytest.raises(ValueError, match=r"sparsegpt on layers_0/attn/k/kernel: hessian .* singular"):
    sparsity.prune(params, "sparsegpt:0.5", calib=calib)

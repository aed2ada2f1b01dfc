"""Model-level AWQ / SmoothQuant / joint GPTQ + N:M / mixed precision, on the test preset."""


import jax
import jax.numpy as jnp
import numpy as np
import pytest

import model
import quant
from model.tree import get_path, replace_path
from quant import awq, mixed, smooth

KEY = jax.random.key


def _tokens(cfg, seed=1, shape=(4, 32)):
  return jax.random.randint(KEY(seed), shape, 0, cfg.vocab_size)


def _calib(cfg, n=2):
  return model.calibration.Calibration(cfg, [_tokens(cfg, 10 + i) for i in range(n)])


def _logits(cfg, p, toks):
  return model.apply(cfg, p, toks)[0]


def _outlier_layer(seed=0, n=256, d_in=64, d_out=48):
  """Inputs with a few large channels (the activation outliers AWQ / SmoothQuant target)."""
  kx, kw = jax.random.split(KEY(seed))
  x = jax.random.normal(kx, (n, d_in))
  x = x.at[:, :3].multiply(20.0)
  return x, jax.random.normal(kw, (d_in, d_out)) * 0.1


# ------------------------------------------------------------------------------ statistics


def test_awq_searches_from_statistics_equal_the_activation_versions():
  x, w = _outlier_layer()
  xtx, count = x.T @ x, x.shape[0]
  x_max = jnp.mean(jnp.abs(x), axis=0)
  s_x, r_x, l_x = awq.awq_scale_search(w, x, bits=4, group_size=16)
  s_s, r_s, l_s = awq.awq_scale_search_stats(w, xtx, x_max, count, bits=4, group_size=16)
  assert r_x == r_s
  np.testing.assert_allclose(np.asarray(l_s), np.asarray(l_x), rtol=2e-3)
  np.testing.assert_allclose(np.asarray(s_s), np.asarray(s_x), rtol=1e-6)
  ws, xs = w * s_x[:, None], x / s_x
  mv_x, idx_x = awq.awq_clip_search(ws, xs, bits=4, group_size=16, n_sample_token=x.shape[0])
  mv_s, idx_s = awq.awq_clip_search_stats(ws, xs.T @ xs, bits=4, group_size=16)
  assert np.mean(np.asarray(idx_x) == np.asarray(idx_s)) > 0.97  # f32 near-ties aside
  # The statistics path reproduces awq_layer's QArray when the choices agree.
  q_ref, s_ref = awq.awq_layer(w, x, bits=4, group_size=16, n_sample_token=x.shape[0])
  q = awq.clip_and_quantize(ws, mv_s, bits=4, group_size=16)
  agree = np.mean(np.asarray(quant.codes(q)) == np.asarray(quant.codes(q_ref)))
  assert agree > 0.97


def test_calibration_collects_abs_statistics(cfg, params):
  toks = _tokens(cfg)
  stats = model.calibration.calibrate(cfg, params, [toks[:2], toks[2:]])
  one = model.calibration.calibrate(cfg, params, [toks])
  for p in ("layers_0/attn/q/kernel", "layers_1/mlp/down/kernel"):
    np.testing.assert_allclose(stats[p].abs_max, one[p].abs_max, rtol=1e-6)
    np.testing.assert_allclose(stats[p].abs_mean, one[p].abs_mean, rtol=1e-5)
    assert stats[p].abs_mean.shape == stats[p].sq_norm.shape
    # mean |x| <= rms <= max |x| per channel
    rms = jnp.sqrt(stats[p].sq_norm / stats[p].count)
    assert bool(jnp.all(stats[p].abs_mean <= rms + 1e-5))
    assert bool(jnp.all(rms <= stats[p].abs_max + 1e-5))


# ------------------------------------------------------------------------- scale folding


@pytest.mark.parametrize("mha", [False, True])
def test_folding_any_scales_keeps_the_float_model(mha):
  cfg = model.get_preset("test")
  if mha:
    cfg = cfg.replace(n_kv_heads=cfg.n_heads, qkv_bias=True)
  params = model.init(cfg, KEY(3))
  groups = smooth.scale_groups(cfg)
  assert any(g.prev.endswith("v/kernel") for g in groups) == mha
  folded = params
  for i, g in enumerate(groups):
    n_in = get_path(params, g.kernels[0]).shape[0]
    folded = smooth.apply_scale(folded, g, jnp.exp(jax.random.normal(KEY(100 + i), (n_in,))))
  toks = _tokens(cfg)
  np.testing.assert_allclose(_logits(cfg, folded, toks), _logits(cfg, params, toks), atol=2e-4)


def test_smoothquant_scales_match_the_formula():
  rng = np.random.default_rng(0)
  a = np.abs(rng.normal(size=16)) * 5
  a[3] = 0.0  # a dead channel hits the clamp
  ws = [rng.normal(size=(16, 8)), rng.normal(size=(16, 4))]
  ws[0][5] = 0.0
  ws[1][5] = 0.0
  got = smooth.smoothquant_scales(jnp.asarray(a), [jnp.asarray(w) for w in ws], 0.6)
  w_max = np.maximum(np.abs(np.concatenate(ws, 1)).max(1), 1e-5)
  np.testing.assert_allclose(got, np.maximum(a ** 0.6 / w_max ** 0.4, 1e-5), rtol=1e-5)


# ------------------------------------------------------------------------------ recipes


def _with_outliers(cfg, params):
  """The same function with activation outlier channels after every norm."""
  out = params
  for g in smooth.scale_groups(cfg, norms_only=True):
    n_in = get_path(params, g.kernels[0]).shape[0]
    s = jnp.ones(n_in).at[:2].set(1 / 40.0)  # norm scale x40 on 2 channels, kernels / 40
    out = smooth.apply_scale(out, g, s)
  return out


def test_smoothquant_rescues_w8a8_on_outlier_channels(cfg, params):
  p = _with_outliers(cfg, params)
  toks = _tokens(cfg)
  ref = _logits(cfg, p, toks)
  calib = _calib(cfg)
  err = {}
  for r in ("w8a8", "w8a8:smoothquant", "w8a8:smoothquant:alpha=0.8"):
    q, report = quant.quantize(p, r, calib=calib)
    leaf = q["layers_0"]["attn"]["q"]["kernel"]
    assert leaf.act_bits == 8 and leaf.bits == 8
    err[r] = float(jnp.linalg.norm(_logits(cfg, q, toks) - ref) / jnp.linalg.norm(ref))
    if "smoothquant" in r:
      assert set(report["scales"]) == {f"layers_{i}/{n}_norm/scale" for i in range(cfg.n_layers)
                                       for n in ("attn", "mlp")}
  assert err["w8a8:smoothquant"] < 0.7 * err["w8a8"], err
  assert err["w8a8:smoothquant"] < 0.05, err


def test_awq_model_recipe(cfg, params):
  calib = _calib(cfg)
  toks = _tokens(cfg)
  ref = _logits(cfg, params, toks)
  q, report = quant.quantize(params, "int4:g32:awq", calib=calib)
  leaf = q["layers_0"]["mlp"]["down"]["kernel"]
  assert leaf.bits == 4 and leaf.group_size == 32 and leaf.zero is not None
  # every norm group and the up -> down group were searched (GQA: no v -> o group)
  assert len(report["scales"]) == 3 * cfg.n_layers
  for v in report["scales"].values():
    assert 0.0 <= v["ratio"] < 1.0 and v["loss_awq"] <= v["loss_rtn"]
  rel = lambda p: float(jnp.linalg.norm(_logits(cfg, p, toks) - ref) / jnp.linalg.norm(ref))
  # A random-init model: AWQ is within 20% of min-max RTN's logit error (same grid)
  rtn = rel(quant.quantize(params, "int4:g32:asym")[0])
  assert rel(q) < 1.2 * rtn, (rel(q), rtn)
  # the folded norm scales are not ones any more, embeddings untouched
  assert not np.allclose(q["layers_0"]["attn_norm"]["scale"], params["layers_0"]["attn_norm"]
                         ["scale"])
  np.testing.assert_array_equal(q["embed"]["embedding"], params["embed"]["embedding"])
  shapes = jax.tree.map(lambda x: (x.shape, x.dtype), q)
  abstract = jax.tree.map(lambda x: (x.shape, x.dtype),
                          quant.abstract_quantize(model.param_shapes(cfg), "int4:g32:awq"))
  assert shapes == abstract


def test_awq_and_smoothquant_need_calibration(params):
  for r in ("int4:g32:awq", "w8a8:smoothquant"):
    with pytest.raises(ValueError, match="needs calib="):
      quant.quantize(params, r)


# --------------------------------------------------------------------- joint GPTQ + N:M


def test_gptq_nm_layer_is_nm_sparse_on_grid_and_beats_mask_then_rtn():
  x, w = _outlier_layer(seed=4, d_in=64, d_out=32)
  h = 2 * x.T @ x / x.shape[0]
  a = quant.gptq_nm_layer(w, h, bits=4, n=2, m=4, group_size=16)
  assert isinstance(a, model.nm_array.NMArray) and a.n == 2 and a.m == 4
  dense = model.nm_array.decompress(a, jnp.float32)
  groups = np.asarray(dense != 0).reshape(16, 4, 32).sum(1)
  assert groups.max() <= 2
  # magnitude 2:4 mask then min-max RTN of the kept weights, as a baseline
  keep = model.nm_array.decompress(model.nm_array.compress_nm(
      jnp.where(np.asarray(jnp.abs(w)).reshape(16, 4, 32).argsort(1).argsort(1).reshape(64, 32)
                >= 2, w, 0.0), 2, 4), jnp.float32) != 0
  base = awq.pseudo_quantize(jnp.where(keep, w, 0.0), bits=4, group_size=16) * keep
  err = lambda wh: float(jnp.linalg.norm(x @ (w - wh)))
  assert err(dense) < 0.8 * err(base)
  with pytest.raises(ValueError, match="multiple of m=4"):
    quant.gptq_nm_layer(w, h, bits=4, n=2, m=4, group_size=6)
  with pytest.raises(ValueError, match="1 <= n < m"):
    quant.gptq_nm_layer(w, h, bits=4, n=4, m=4)


def test_gptq_act_order_recipe_reaches_the_solver(cfg, params):
  calib = _calib(cfg)
  plain = quant.quantize(params, "int4:gptq", calib=calib)[0]
  ordered, report = quant.quantize(params, "int4:gptq:act_order", calib=calib)
  assert report["recipe"] == "int4:gptq:act_order"
  a, b = (quant.codes(t["layers_0"]["mlp"]["down"]["kernel"]) for t in (plain, ordered))
  assert a.shape == b.shape and not bool(jnp.all(a == b))


def test_gptq_plus_nm_recipe(cfg, params):
  q, report = quant.quantize(params, "int4:g32:gptq+2:4", calib=_calib(cfg))
  leaf = q["layers_1"]["attn"]["o"]["kernel"]
  assert isinstance(leaf, model.nm_array.NMArray) and quant.is_qarray(leaf.values)
  assert leaf.values.group_size == 16 and leaf.values.bits == 4
  dense = quant.quantize(params, "int4:g32")[0]
  assert report["bytes_after"] < model.tree_nbytes(dense)
  toks = _tokens(cfg)
  assert bool(jnp.all(jnp.isfinite(_logits(cfg, q, toks))))
  with pytest.raises(ValueError, match=r"\+2:4 \(joint pruning\) needs method gptq"):
    quant.parse_recipe("int4:g32+2:4")


# --------------------------------------------------------------------- mixed precision


def test_mostly_low_bit_rules_and_sensitivity(params):
  cfg = model.get_preset("test").replace(n_layers=4)
  p = model.init(cfg, KEY(5))
  q, report = quant.quantize(p, "int4:g32", rules=quant.mostly_low_bit_rules(4, "int4:g32"))
  specs = {k: v["spec"] for k, v in report["layers"].items()}
  assert {s for k, s in specs.items() if k.startswith(("layers_0/", "layers_3/"))} == {"int8"}
  assert {s for k, s in specs.items() if k.startswith(("layers_1/", "layers_2/"))} == {"int4:g32"}
  calib = model.calibration.Calibration(cfg, [_tokens(cfg)])
  sens = quant.sensitivity(p, "int4:g32", calib)
  vals = list(sens.values())
  assert vals == sorted(vals, reverse=True) and all(v > 0 for v in vals)
  # brute-force check of one entry: ||X E||^2 / ||X W||^2 from captured inputs
  path = next(iter(sens))
  xtx = model.calibration.calibrate(cfg, p, calib.batches, paths=[path])[path].xtx
  w = get_path(p, path)
  e = w - quant.dequantize(quant.quantize_tensor(w, bits=4, group_size=32))
  np.testing.assert_allclose(sens[path], float(jnp.sum((xtx @ e) * e) / jnp.sum((xtx @ w) * w)),
                             rtol=1e-4)
  base, rules = mixed.mixed_rules("int4:g32@sensitive=2", p, 4, calib)
  assert base == "int4:g32" and [r[0] for r in rules] == [
      f"^{k}$".replace("/", "/") for k in list(sens)[:2]]
  with pytest.raises(ValueError, match="unknown rule set"):
    mixed.split_mixed("int4@everything")
  with pytest.raises(ValueError, match="edge_layers"):
    quant.mostly_low_bit_rules(4, "int4", edge_layers=3)


# ------------------------------------------------------------------------ recipe grammar


@pytest.mark.parametrize("recipe", [
    "int8", "w8a8", "w8a8:smoothquant:alpha=0.8", "int4:g128:gptq+2:4", "int4:gptq:act_order",
    "int4:g64:awq", "int4:g32:clip=mse", "int4:clip=p99.9", "nf4:g64", "fp4", "fp6_e3m2:tensor",
    "int4:g32:asym"])
def test_recipe_names_round_trip(recipe):
  spec = quant.parse_recipe(recipe)
  assert quant.parse_recipe(spec.name) == spec


@pytest.mark.parametrize("recipe, match", [
    ("int4:smoothquant", "use the format w8a8"),
    ("w8a8:g128", "symmetric per channel"),
    ("int4:clip=p0", "clip='p0'"),
    ("fp4:asym", "asym needs an int format"),
    ("nf4:gptq", "needs an int format"),
    ("int4:awq:act_order", "act_order is a GPTQ option"),
    ("int4:gptq:static_groups", "static_groups is a GPTQ option for grouped"),
    ("int4:gptq+2", "must be N:M"),
    ("int4:alpha=2", r"alpha=2.0 must lie in \[0, 1\]"),
    ("int4:g32:awq:clip=mse", "RTN option"),
])
def test_bad_recipes(recipe, match):
  with pytest.raises(ValueError, match=match):
    quant.parse_recipe(recipe)


def test_quantizing_a_quantized_tree_is_refused(cfg, params):
  q, _ = quant.quantize(params, "int8")
  with pytest.raises(ValueError, match="already quantized"):
    quant.quantize(q, "int4")
  bad = replace_path(params, "layers_0/attn/q/kernel",
                     get_path(params, "layers_0/attn/q/kernel").at[0, 0].set(jnp.nan))
  with pytest.raises(ValueError, match=r"'layers_0/attn/q/kernel' holds 1 non-finite.*NaN"):
    quant.quantize(bad, "int4:g32:gptq", calib=_calib(cfg))



def test_awq_protects_salient_channels(cfg, params):
  """With activation outlier channels (the same float function), AWQ beats min-max RTN."""
  p = _with_outliers(cfg, params)
  toks = _tokens(cfg)
  ref = _logits(cfg, p, toks)
  rel = lambda q: float(jnp.linalg.norm(_logits(cfg, q, toks) - ref) / jnp.linalg.norm(ref))
  awq_err = rel(quant.quantize(p, "int4:g32:awq", calib=_calib(cfg))[0])
  rtn_err = rel(quant.quantize(p, "int4:g32:asym")[0])
  assert awq_err < 0.8 * rtn_err, (awq_err, rtn_err)

"""Structured pruning: the shrunk model equals the masked one, exact counts, scores, errors."""

from __future__ import annotations

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import model
from sparsity import apply_masks, n_pruned, structured

BASE = model.get_preset("test")  # D=64, H=4, K=2 (G=2), Dh=16, F=128, 2 layers
CFGS = {
    "test": BASE,
    "h8k2": BASE.replace(n_heads=8, n_kv_heads=2),  # G=4, Dh=8
    "bias_norm": BASE.replace(qkv_bias=True, qk_norm=True),
}


@dataclasses.dataclass
class Stats:
  sq_norm: np.ndarray
  xtx: np.ndarray | None
  count: int


def _params(cfg, seed=0):
  """Random params with non-trivial biases and norm scales (init sets them to 0 / 1)."""
  p = model.init(cfg, jax.random.key(seed))
  paths, leaves, treedef = model.flatten(p)
  rng = np.random.RandomState(seed)
  out = [x + jnp.asarray(rng.normal(0, 0.3, x.shape), x.dtype)
         if path.endswith(("bias", "scale")) else x for path, x in zip(paths, leaves)]
  return treedef.unflatten(out)


@pytest.fixture(scope="module")
def all_params():
  return {name: _params(cfg) for name, cfg in CFGS.items()}


def _tokens(cfg, b=2, t=9, seed=1):
  return jax.random.randint(jax.random.key(seed), (b, t), 0, cfg.vocab_size)


def _calib(cfg, seed=0, xtx=False):
  """Random positive statistics for every down and o kernel."""
  rng = np.random.RandomState(seed)
  out = {}
  for i in range(cfg.n_layers):
    for kernel, n in (("mlp/down/kernel", cfg.ffn_dim), ("attn/o/kernel", cfg.n_heads * cfg.dh)):
      x = rng.normal(size=(32, n)).astype(np.float32) * rng.uniform(0.1, 2.0, n)
      out[f"layers_{i}/{kernel}"] = Stats((x * x).sum(0), x.T @ x if xtx else None, 32)
  return out


SETTINGS = {
    "neurons": dict(neurons=0.5),
    "heads": dict(heads=0.5),
    "kv_groups": dict(heads=0.5, head_mode="kv_groups"),
    "combined": dict(neurons=0.3, heads=0.5),
    "combined_kv_calib": dict(neurons=0.3, heads=0.5, head_mode="kv_groups", calib=True),
}


@pytest.mark.parametrize("cfg_name", list(CFGS))
@pytest.mark.parametrize("setting", list(SETTINGS))
def test_shrunk_equals_masked(all_params, cfg_name, setting):
  cfg, params = CFGS[cfg_name], all_params[cfg_name]
  kw = dict(SETTINGS[setting])
  if kw.pop("calib", False):
    kw["calib"] = _calib(cfg, xtx=True)
  masks, keep = structured.structured_masks(cfg, params, **kw)
  new_cfg, new_params = structured.shrink(cfg, params, keep)
  tokens = _tokens(cfg)
  want = model.apply(cfg, apply_masks(params, masks), tokens)[0]
  got = model.apply(new_cfg, new_params, tokens)[0]
  np.testing.assert_allclose(got, want, atol=1e-5)
  assert model.count_params(new_params) < model.count_params(params)
  assert new_cfg.dh == cfg.dh and new_cfg.head_dim == cfg.dh


def test_exact_counts_and_masks(all_params):
  cfg, params = CFGS["h8k2"], all_params["h8k2"]  # F=128, H=8, K=2, G=4, Dh=8
  masks, keep = structured.structured_masks(cfg, params, neurons=0.3, heads=0.25)
  nf, nh = n_pruned(0.3, 128), n_pruned(0.25, 4)
  assert (nf, nh) == (38, 1)
  for lk in keep:
    assert lk.neurons.dtype == np.int32 and lk.neurons.size == 128 - nf
    assert np.all(np.diff(lk.neurons) > 0)
    assert [int(np.sum(lk.q_heads // 4 == g)) for g in range(2)] == [3, 3]
    assert lk.kv_heads.tolist() == [0, 1]
  m = masks["layers_0"]
  assert int((~m["mlp"]["gate"]["kernel"]).sum()) == 64 * nf
  assert int((~m["mlp"]["down"]["kernel"]).sum()) == 64 * nf
  assert int((~m["attn"]["q"]["kernel"]).sum()) == 64 * 2 * nh * 8
  assert int((~m["attn"]["o"]["kernel"]).sum()) == 64 * 2 * nh * 8
  assert m["attn"]["k"]["kernel"] is None and m["attn_norm"]["scale"] is None
  assert masks["embed"]["embedding"] is None
  new_cfg, new_params, report = structured.prune_structured(cfg, params, neurons=0.3, heads=0.25)
  assert (new_cfg.ffn_dim, new_cfg.n_heads, new_cfg.n_kv_heads) == (90, 6, 2)
  assert new_params["layers_1"]["attn"]["q"]["kernel"].shape == (64, 48)
  assert new_params["layers_1"]["attn"]["o"]["kernel"].shape == (48, 64)
  assert new_params["layers_1"]["mlp"]["down"]["kernel"].shape == (90, 64)
  json.dumps(report)
  assert report["counts"]["neurons"] == {"pruned_per_layer": 38, "kept_per_layer": 90,
                                         "pruned": 76}
  assert report["counts"]["q_heads"]["pruned"] == 4
  assert (report["ffn_dim_before"], report["ffn_dim_after"]) == (128, 90)
  assert (report["n_heads_before"], report["n_heads_after"]) == (8, 6)
  assert report["params_after"] == model.count_params(new_params) < report["params_before"]
  # kv_groups: n_pruned(0.5, 2) = 1 group, its 4 query heads with it.
  kv_cfg, kv_params, _ = structured.prune_structured(cfg, params, heads=0.5,
                                                     head_mode="kv_groups")
  assert (kv_cfg.n_heads, kv_cfg.n_kv_heads, kv_cfg.ffn_dim) == (4, 1, 128)
  assert kv_params["layers_0"]["attn"]["k"]["kernel"].shape == (64, 8)


def test_lowest_scored_neuron_and_heads_are_removed(all_params):
  cfg, params = BASE, all_params["test"]
  p = jax.tree.map(lambda x: x, params)
  p["layers_0"]["mlp"]["down"]["kernel"] = params["layers_0"]["mlp"]["down"]["kernel"].at[5].mul(
      1e-3)
  p["layers_1"]["mlp"]["up"]["kernel"] = params["layers_1"]["mlp"]["up"]["kernel"].at[:, 77].mul(
      1e-3)
  one = 1 / 128  # n_pruned(1/128, 128) = 1
  _, keep = structured.structured_masks(cfg, p, neurons=one)
  assert sorted(set(range(128)) - set(keep[0].neurons.tolist())) == [5]
  assert sorted(set(range(128)) - set(keep[1].neurons.tolist())) == [77]
  # Activation-aware: unit down rows, neuron 7 sees the least activation.
  down = p["layers_0"]["mlp"]["down"]["kernel"]
  p["layers_0"]["mlp"]["down"]["kernel"] = down / jnp.linalg.norm(down, axis=1, keepdims=True)
  calib = _calib(cfg)
  sq = np.full(128, 4.0, np.float32)
  sq[7] = 0.01
  calib["layers_0/mlp/down/kernel"] = Stats(sq, None, 10)
  scores = structured.neuron_scores(cfg, p, calib)
  np.testing.assert_allclose(scores[0], np.sqrt(sq), rtol=1e-5)
  _, keep = structured.structured_masks(cfg, p, neurons=one, calib=calib)
  assert sorted(set(range(128)) - set(keep[0].neurons.tolist())) == [7]
  # Heads: head 3 (group 1) has tiny o rows; group 0 loses its lower-scored head.
  o = params["layers_0"]["attn"]["o"]["kernel"]
  p["layers_0"]["attn"]["o"]["kernel"] = o.at[48:64].mul(1e-3)
  hs = structured.head_scores(cfg, p)[0]
  _, keep = structured.structured_masks(cfg, p, heads=0.5)
  assert 3 not in keep[0].q_heads.tolist() and 2 in keep[0].q_heads.tolist()
  assert keep[0].q_heads.tolist() == [int(np.argmax(hs[:2])), 2]
  # kv_groups: group 0 (heads 0, 1) silenced -> removed with kv head 0.
  p["layers_0"]["attn"]["o"]["kernel"] = o.at[:32].mul(1e-3)
  _, keep = structured.structured_masks(cfg, p, heads=0.5, head_mode="kv_groups")
  assert keep[0].kv_heads.tolist() == [1] and keep[0].q_heads.tolist() == [2, 3]


def test_score_formulas(all_params):
  cfg, params = CFGS["h8k2"], all_params["h8k2"]
  calib = _calib(cfg)
  st = calib["layers_1/attn/o/kernel"]
  o = np.asarray(params["layers_1"]["attn"]["o"]["kernel"])
  want = [np.sqrt((st.sq_norm[h * 8:(h + 1) * 8, None] * o[h * 8:(h + 1) * 8] ** 2).sum())
          for h in range(8)]
  np.testing.assert_allclose(structured.head_scores(cfg, params, calib)[1], want, rtol=1e-5)
  # xtx = diag(sq_norm) gives the diagonal estimate, for heads and for groups.
  diag = {k: Stats(s.sq_norm, np.diag(s.sq_norm), s.count) for k, s in calib.items()}
  np.testing.assert_allclose(structured.head_scores(cfg, params, diag),
                             structured.head_scores(cfg, params, calib), rtol=1e-5)
  np.testing.assert_allclose(structured.group_scores(cfg, params, diag),
                             structured.group_scores(cfg, params, calib), rtol=1e-5)
  # Weight only: the OV-circuit norm ||V_g O_h||_F.
  v = np.asarray(params["layers_1"]["attn"]["v"]["kernel"])
  want = [np.linalg.norm(v[:, (h // 4) * 8:(h // 4 + 1) * 8] @ o[h * 8:(h + 1) * 8])
          for h in range(8)]
  np.testing.assert_allclose(structured.head_scores(cfg, params)[1], want, rtol=1e-4)
  g = np.asarray(params["layers_1"]["mlp"]["gate"]["kernel"])
  u = np.asarray(params["layers_1"]["mlp"]["up"]["kernel"])
  d = np.asarray(params["layers_1"]["mlp"]["down"]["kernel"])
  want = np.linalg.norm(g, axis=0) * np.linalg.norm(u, axis=0) * np.linalg.norm(d, axis=1)
  np.testing.assert_allclose(structured.neuron_scores(cfg, params)[1], want, rtol=1e-5)


def test_shrunk_model_decodes_with_cache(all_params):
  cfg, params = CFGS["bias_norm"], all_params["bias_norm"]
  new_cfg, new_params, _ = structured.prune_structured(cfg, params, neurons=0.5, heads=0.5)
  dec = model.Decoder(new_cfg)
  tokens = _tokens(new_cfg, b=2, t=8)
  full = model.apply(new_cfg, new_params, tokens)[0]
  cache = dec.init_cache(2, 16)
  step = jax.jit(dec)
  outs = []
  for lo, hi in ((0, 5), (5, 6), (6, 7), (7, 8)):
    logits, cache = step(new_params, tokens[:, lo:hi], cache)
    outs.append(logits)
  np.testing.assert_allclose(jnp.concatenate(outs, 1), full, atol=1e-5)
  assert cache.lengths.tolist() == [8, 8]


@pytest.mark.parametrize("kw, match", [
    (dict(neurons=1.0), r"neurons=1.0 is outside the valid range \[0, 1\)"),
    (dict(neurons=-0.1), r"neurons=-0.1 is outside"),
    (dict(neurons="0.5"), r"neurons='0.5' must be a number"),
    (dict(heads=1.0), r"heads=1.0 is outside"),
    (dict(head_mode="groups", heads=0.5), r"head_mode='groups' is not valid"),
    (dict(neurons=0.999), r"neurons=0.999 would prune all 128 FFN neurons.*\[0, 0.996"),
    (dict(heads=0.75), r"heads=0.75 would prune all 2 query heads of every KV group"),
    (dict(heads=0.75, head_mode="kv_groups"), r"heads=0.75 would prune all 2 KV groups"),
])
def test_bad_fractions(all_params, monkeypatch, kw, match):
  def boom(*a, **k):
    raise AssertionError("scored before validating")
  monkeypatch.setattr(structured, "_neuron_scores", boom)
  monkeypatch.setattr(structured, "_scores", boom)
  with pytest.raises(ValueError, match=match):
    structured.structured_masks(BASE, all_params["test"], **kw)
  with pytest.raises(ValueError, match=match):
    structured.prune_structured(BASE, all_params["test"], **kw)


def test_bad_params_calib_and_keep(all_params):
  params = all_params["test"]
  with pytest.raises(ValueError, match=r"params do not match cfg: layers_0/mlp/down/kernel has "
                     r"shape \(128, 64\), cfg expects \(96, 64\)"):
    structured.structured_masks(BASE.replace(ffn_dim=96), params, neurons=0.5)
  with pytest.raises(ValueError,
                     match=r"params do not match cfg: missing \['layers_0/attn/k/bias'"):
    structured.structured_masks(CFGS["bias_norm"], params, neurons=0.5)
  calib = _calib(BASE)
  del calib["layers_1/attn/o/kernel"]
  structured.structured_masks(BASE, params, neurons=0.5, calib=calib)  # o not needed
  with pytest.raises(ValueError, match=r"calib has no statistics for 'layers_1/attn/o/kernel'"):
    structured.structured_masks(BASE, params, heads=0.5, calib=calib)
  calib["layers_1/attn/o/kernel"] = Stats(np.ones(63, np.float32), None, 4)
  with pytest.raises(ValueError, match=r"calib\['layers_1/attn/o/kernel'\].sq_norm has shape"):
    structured.structured_masks(BASE, params, heads=0.5, calib=calib)
  with pytest.raises(ValueError, match=r"calib=list must be a mapping"):
    structured.structured_masks(BASE, params, neurons=0.5, calib=[])
  _, keep = structured.structured_masks(BASE, params, neurons=0.5, heads=0.5)
  with pytest.raises(ValueError, match=r"keep must be a sequence of 2 LayerKeep"):
    structured.shrink(BASE, params, keep[:1])
  bad = (keep[0], dataclasses.replace(keep[1], q_heads=np.array([0, 1], np.int32)))
  with pytest.raises(ValueError, match=r"keep\[1\].q_heads=\[0, 1\] must keep the same number"):
    structured.shrink(BASE, params, bad)
  bad = (keep[0], dataclasses.replace(keep[1], neurons=keep[1].neurons[:-1]))
  with pytest.raises(ValueError, match=r"keep\[1\].neurons keeps 63, layer 0 keeps 64"):
    structured.shrink(BASE, params, bad)
  bad = (keep[0], dataclasses.replace(keep[1], neurons=keep[1].neurons[::-1]))
  with pytest.raises(ValueError, match=r"keep\[1\].neurons=.* must be strictly increasing"):
    structured.shrink(BASE, params, bad)

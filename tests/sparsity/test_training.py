"""Training-time sparsity wrappers on a tiny params tree with a toy quadratic loss."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest

import sparsity
from sparsity import distributions as dist
from sparsity import dst, schedules, training

KERNELS = ("l0/kernel", "l1/kernel")


def _params(seed=0):
  k = jax.random.split(jax.random.key(seed), 4)
  return {"embed": {"embedding": jax.random.normal(k[0], (10, 16))},
          "l0": {"kernel": jax.random.normal(k[1], (16, 12))},
          "l1": {"kernel": jax.random.normal(k[2], (12, 20))},
          "norm": {"scale": jax.random.normal(k[3], (12,))}}


TARGET = jax.tree.map(lambda x: 0.5 * x + 0.3, _params(1))


def _loss(p):
  return sum(jnp.sum((a - b) ** 2) for a, b in zip(jax.tree.leaves(p), jax.tree.leaves(TARGET),
                                                    strict=True))


def _get(tree, path):
  a, b = path.split("/")
  return tree[a][b]


def _run(tx, steps):
  """[(params, state, grads)] after each jitted step (grads: the dense ones of that step)."""
  params = _params()
  step = _stepper(tx)
  state, out = jax.jit(tx.init)(params), []
  for _ in range(steps):
    params, state, g = step(params, state)
    out.append((params, state, g))
  return out


@functools.cache
def _stepper(tx):
  @jax.jit
  def step(p, s):
    g = jax.grad(_loss)(p)
    u, s = tx.update(g, s, p)
    return optax.apply_updates(p, u), s, g

  return step


RIGL = dict(sparsity=0.75, update_every=3, end_step=12, drop_fraction=0.5)
SET_TX = dst.set_training(optax.adam(0.05), seed=3, **RIGL)
RIGL_TX = dst.rigl(optax.adam(0.05), **RIGL)


@pytest.fixture(scope="module")
def dst_runs():
  return {"set": _run(SET_TX, 14), "rigl": _run(RIGL_TX, 14)}


def _check_pruned_zero(params, state):
  masks = sparsity.masks_from_state(state)
  for path in KERNELS:
    m, w = np.asarray(_get(masks, path)), np.asarray(_get(params, path))
    assert (w[~m] == 0).all()
  assert masks["embed"]["embedding"] is None and masks["norm"]["scale"] is None
  return masks


def _n_pruned(masks, path):
  return int((~np.asarray(_get(masks, path))).sum())


@pytest.mark.parametrize("scope", ["layerwise", "global"])
def test_gradual_follows_the_schedule_exactly(scope):
  kw = dict(target=0.8, initial=0.2, begin_step=2, end_step=10, every=2)
  tx = training.gradual_magnitude(optax.sgd(0.05), scope=scope, **kw)
  prev = None
  for t, (params, state, _) in enumerate(_run(tx, 14)):  # after the update with count t
    masks = _check_pruned_zero(params, state)
    s = schedules.cubic_sparsity(t, initial=0.2, final=0.8, begin_step=2, end_step=10, every=2)
    sizes = {p: _get(params, p).size for p in KERNELS}
    if scope == "layerwise":
      for p in KERNELS:
        assert _n_pruned(masks, p) == sparsity.n_pruned(s, sizes[p]), (t, p)
    else:
      got = sum(_n_pruned(masks, p) for p in KERNELS)
      assert got == sparsity.n_pruned(s, sum(sizes.values())), t
    if prev is not None:  # pruned weights stay pruned
      for p in KERNELS:
        assert not (np.asarray(_get(masks, p)) & ~np.asarray(_get(prev, p))).any()
    prev = masks
  assert int(training.sparse_state(state).count) == 14


@pytest.mark.parametrize("name", ["set", "rigl"])
def test_set_and_rigl_keep_sparsity_exactly_constant(dst_runs, name):
  shapes = {p: tuple(_get(_params(), p).shape) for p in KERNELS}
  want = dist.prune_counts(shapes, dist.erk_densities(shapes, 0.75))  # ERK init by default
  changes, prev = 0, None
  for t, (params, state, _) in enumerate(dst_runs[name]):
    masks = _check_pruned_zero(params, state)
    assert {p: _n_pruned(masks, p) for p in KERNELS} == want
    if prev is not None:
      grown = [np.asarray(_get(masks, p)) & ~np.asarray(_get(prev, p)) for p in KERNELS]
      changes += sum(int(g.sum()) for g in grown)
      on = schedules.is_update_step(t, begin_step=0, end_step=12, every=3)
      assert on or not any(g.any() for g in grown)
      for p, g in zip(KERNELS, grown, strict=True):  # regrown weights are exactly zero
        assert (np.asarray(_get(params, p))[g] == 0).all()
    prev = masks
  assert changes > 10


def test_rigl_regrows_top_gradients_and_resets_adam_moments(dst_runs):
  out = dst_runs["rigl"]
  (p2, s2, _), (_, s3, g3) = out[2], out[3]  # the update with count 3 changes the masks
  old, new = sparsity.masks_from_state(s2), sparsity.masks_from_state(s3)
  f = schedules.cosine_drop_fraction(3, initial=0.5, end_step=12)
  mu2 = s2.masked.inner_state[0].mu
  mu3, nu3 = s3.masked.inner_state[0].mu, s3.masked.inner_state[0].nu
  for p in KERNELS:
    m_old, m_new = np.asarray(_get(old, p)), np.asarray(_get(new, p))
    k = int(np.floor(f * m_old.sum() + 0.5))
    assert 0 < k < m_old.sum()
    # Drop by the post-step weights w + u of this update, before the re-masking.
    after = np.asarray(_get(p2, p)) + np.asarray(_adam_update(p2, s2, p))
    order = np.argsort(np.where(m_old, np.abs(after), np.inf).reshape(-1), kind="stable")
    kept = m_old.copy().reshape(-1)
    kept[order[:k]] = False
    grow = np.argsort(np.where(kept, np.inf, -np.abs(np.asarray(_get(g3, p))).reshape(-1)),
                      kind="stable")[:k]
    want = kept.copy()
    want[grow] = True
    np.testing.assert_array_equal(m_new.reshape(-1), want)
    changed = m_old != m_new
    assert changed.any()
    assert (np.asarray(_get(mu3, p))[changed] == 0).all()
    assert (np.asarray(_get(nu3, p))[changed] == 0).all()
    assert (np.asarray(_get(mu3, p))[m_old & m_new] != 0).all()
    assert (np.asarray(_get(mu2, p))[m_old] != 0).all()


def _adam_update(params, state, path):
  """The masked Adam update from (params, state), recomputed outside the wrapper."""
  return _masked_adam(params, state)[path]


@jax.jit
def _masked_adam(params, state):
  g = jax.grad(_loss)(params)
  masks = state.masked.masks
  g = jax.tree.map(lambda x, m: jnp.where(m, x, 0), g, masks)
  u, _ = optax.adam(0.05).update(g, state.masked.inner_state, params)
  return {p: jnp.where(_get(masks, p), _get(u, p), -_get(params, p)) for p in KERNELS}


def test_movement_scores_accumulate_minus_w_times_g():
  tx = training.movement(optax.sgd(0.01), target=0.5, begin_step=3, end_step=6, every=3)
  out = _run(tx, 7)
  want = {p: np.zeros(_get(_params(), p).shape, np.float32) for p in KERNELS}
  prev = _params()
  for params, state, g in out:
    for p in KERNELS:
      want[p] -= np.asarray(_get(prev, p)) * np.asarray(_get(g, p))
    prev = params
  scores = training.sparse_state(state).scores
  for p in KERNELS:
    np.testing.assert_allclose(np.asarray(_get(scores, p)), want[p], rtol=1e-5, atol=1e-6)
  masks = sparsity.masks_from_state(state)  # count 6: the top-(1 - s) scores are kept
  s = schedules.cubic_sparsity(6, initial=0.0, final=0.5, begin_step=3, end_step=6, every=3)
  sc = training.sparse_state(state).scores
  for p in KERNELS:
    m, v = np.asarray(_get(masks, p)), np.asarray(_get(sc, p))
    assert (~m).sum() == sparsity.n_pruned(s, m.size) and v[m].min() >= v[~m].max()


def test_granet_prunes_on_schedule_and_regrows():
  kw = dict(target=0.8, initial=0.5, begin_step=0, end_step=8, every=4, drop_fraction=0.5)
  tx = dst.granet(optax.sgd(0.05), **kw)
  regrown = 0
  out = _run(tx, 10)
  for t, (params, state, _) in enumerate(out):
    masks = _check_pruned_zero(params, state)
    s = schedules.cubic_sparsity(t, initial=0.5, final=0.8, begin_step=0, end_step=8, every=4)
    for p in KERNELS:
      assert _n_pruned(masks, p) == sparsity.n_pruned(s, _get(params, p).size)
    if t:
      old = sparsity.masks_from_state(out[t - 1][1])
      regrown += sum(int((np.asarray(_get(masks, p)) & ~np.asarray(_get(old, p))).sum())
                     for p in KERNELS)
  assert regrown > 0


def test_state_round_trips_exactly(dst_runs, tmp_path):
  params, state, _ = dst_runs["set"][2]
  leaves, treedef = jax.tree.flatten(state)
  again = jax.tree.unflatten(treedef, leaves)
  assert isinstance(again, training.SparseTrainState)
  ckptr = ocp.StandardCheckpointer()
  ckptr.save(tmp_path / "s", state)
  ckptr.wait_until_finished()
  restored = ckptr.restore(tmp_path / "s", jax.eval_shape(SET_TX.init, _params()))
  assert jax.tree.structure(restored) == treedef
  for a, b in zip(jax.tree.leaves(restored), leaves, strict=True):
    assert a.dtype == b.dtype
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  # Continuing from the restored state (count 3: a mask update with a random regrowth)
  # equals the uninterrupted run.
  step = _stepper(SET_TX)
  for t in range(3, 5):
    params, restored, _ = step(params, restored)
    jax.tree.map(np.testing.assert_array_equal, (params, restored), dst_runs["set"][t][:2])
  assert training.training_masks(restored)["l0"]["kernel"].dtype == jnp.bool_


def test_init_is_abstract_friendly():
  tx = training.gradual_magnitude(optax.adam(0.1), target=0.5, end_step=4, every=2)
  abstract = jax.eval_shape(tx.init, jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype),
                                                  _params()))
  assert abstract.masked.masks["l0"]["kernel"].shape == (16, 12)
  assert abstract.masked.masks["embed"]["embedding"].shape == ()


@pytest.mark.parametrize("make,kw,match", [
    (training.gradual_magnitude, dict(target=1.0, end_step=4), "sparsity=1.0"),
    (training.gradual_magnitude, dict(target=0.5, end_step=5, every=2), "end_step=5 must be"),
    (training.gradual_magnitude, dict(target=0.5, end_step=4, initial=0.6), "initial=0.6"),
    (training.gradual_magnitude, dict(target=0.5, end_step=4, scope="all"), "scope='all'"),
    (training.gradual_magnitude, dict(target=0.5, end_step=4, scope="global",
                                      distribution="erk"), "needs scope='layerwise'"),
    (dst.rigl, dict(sparsity=0.5, update_every=0, end_step=4), "every=0"),
    (dst.set_training, dict(sparsity=0.5, update_every=2, end_step=4, drop_fraction=2.0),
     "drop_fraction=2.0"),
    (dst.set_training, dict(sparsity=0.5, update_every=2, end_step=4, distribution="x"),
     "distribution='x'"),
])
def test_bad_arguments_fail_at_construction(make, kw, match):
  with pytest.raises(ValueError, match=match):
    make(optax.sgd(0.1), **kw)


def test_bad_rule_fails_at_init():
  tx = training.gradual_magnitude(optax.sgd(0.1), target=0.5, end_step=4,
                                  rules=[("no_such_layer", None)])
  with pytest.raises(ValueError, match="no_such_layer"):
    tx.init(_params())

"""NMArray: N:M compressed kernels round-trip exactly, count honest bytes, run and save."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import model
import quant
from model import checkpoint, ops
from model import nm_array as nm

CFG = model.get_preset("test")


def prune_nm(w, n, m):
  """Keeps the n largest |w| of every group of m consecutive input rows (per column)."""
  i, o = w.shape
  g = w.reshape(i // m, m, o)
  ranks = jnp.argsort(jnp.argsort(-jnp.abs(g), axis=1), axis=1)
  return jnp.where(ranks < n, g, 0).reshape(i, o)


def compress_kernels(params, n=2, m=4, values_fn=None):
  """Every `.../kernel` leaf compressed N:M (optionally its values replaced by values_fn)."""
  def one(path, w):
    if not model.path_str(path).endswith("kernel"):
      return w
    a = model.compress_nm(w, n, m)
    return a if values_fn is None else nm.with_values(a, values_fn(a.values))
  return jax.tree_util.tree_map_with_path(one, params)


@pytest.fixture(scope="module")
def pruned():
  params = model.init(CFG, jax.random.key(0))
  return jax.tree_util.tree_map_with_path(
      lambda p, w: prune_nm(w, 2, 4) if model.path_str(p).endswith("kernel") else w, params)


@pytest.mark.parametrize("n, m", [(2, 4), (1, 4), (4, 8), (3, 8), (1, 2)])
def test_round_trip_exact(n, m):
  w = prune_nm(jax.random.normal(jax.random.key(n * m), (32, 6)), n, m)
  w = w.at[:m].set(0).at[m, 0].set(0)  # groups with fewer than n non-zeros get zero padding
  a = model.compress_nm(w, n, m)
  assert a.shape == (32, 6) and a.ndim == 2 and a.size == 192 and a.dtype == jnp.float32
  assert a.values.shape == (32 * n // m, 6)
  assert a.indices.dtype == jnp.uint8
  np.testing.assert_array_equal(model.decompress_nm(a), w)
  assert model.decompress_nm(a, jnp.bfloat16).dtype == jnp.bfloat16
  idx = np.asarray(nm.unpack_indices(a)).reshape(32 // m, n, 6)
  assert (np.diff(idx, axis=1) > 0).all()  # distinct, ascending positions in every group


def test_mask_selects_kept_entries_and_bf16_is_exact():
  w = jax.random.normal(jax.random.key(1), (16, 4), jnp.bfloat16)
  mask = prune_nm(jnp.ones((16, 4)) + jnp.arange(64).reshape(16, 4) % 5, 2, 4) != 0
  a = model.compress_nm(w, 2, 4, mask=mask)
  assert a.dtype == jnp.bfloat16 and a.values.dtype == jnp.bfloat16
  np.testing.assert_array_equal(model.decompress_nm(a), jnp.where(mask, w, 0))


def test_indices_are_packed():
  w = jnp.zeros((8, 3)).at[1].set(1.0).at[3].set(2.0).at[4].set(3.0)  # group 1 keeps row 4 only
  a = model.compress_nm(w, 2, 4)
  # positions (1, 3 | 0, 1 = zero padding) at 2 bits, four to a byte
  assert a.indices.shape == (1, 3) and int(a.indices[0, 0]) == 1 | 3 << 2 | 0 << 4 | 1 << 6
  np.testing.assert_array_equal(nm.unpack_indices(a)[:, 0], [1, 3, 0, 1])
  np.testing.assert_array_equal(a.values[:, 0], [1, 2, 3, 0])
  assert [nm.index_bits(m) for m in (2, 4, 8, 16, 32, 256)] == [1, 2, 4, 4, 8, 8]
  b = model.compress_nm(jnp.zeros((16, 2)).at[7].set(1.0), 4, 8)  # 3-bit positions in nibbles
  assert b.indices.shape == (4, 2)  # 8 kept rows, two per byte
  np.testing.assert_array_equal(nm.unpack_indices(b)[:4, 0], [0, 1, 2, 7])
  c = model.compress_nm(jnp.zeros((12, 2)), 1, 4)  # 3 kept rows pad up to one byte
  assert c.indices.shape == (1, 2)


def test_nbytes_are_honest():
  i, o = 64, 32
  w = prune_nm(jax.random.normal(jax.random.key(2), (i, o)), 2, 4)
  dense = i * o * 4
  a = model.compress_nm(w, 2, 4)
  assert a.nbytes == dense // 2 + i * o // 8  # f32 kept values + 2 bits per kept value
  assert a.nbytes / dense == 0.5 + 1 / 32
  q = nm.with_values(a, quant.quantize_tensor(a.values, bits=4))  # per-channel int4
  assert q.nbytes == i * o // 4 + i * o // 8 + 4 * o  # codes + indices + f32 scales
  assert q.nbytes / dense == pytest.approx(1 / 16 + 1 / 32 + 1 / i)
  b = model.compress_nm(prune_nm(jax.random.normal(jax.random.key(3), (i, o)), 4, 8), 4, 8)
  assert b.nbytes == dense // 2 + i * o // 4  # 3-bit positions stored in 4-bit nibbles
  tree = {"a": a, "q": q, "d": w}
  assert model.flatten(tree)[0] == ["a", "d", "q"]  # NMArrays are single leaves
  assert model.tree_nbytes(tree) == a.nbytes + q.nbytes + dense
  assert model.tree_size(tree) == 3 * i * o
  abstract = nm.abstract_compress_nm(jax.ShapeDtypeStruct((i, o), jnp.float32), 2, 4)
  assert jax.tree.structure(abstract) == jax.tree.structure(a)
  assert abstract.nbytes == a.nbytes


def test_ops_dot_and_einsum():
  w = prune_nm(jax.random.normal(jax.random.key(4), (16, 8)), 2, 4)
  a = model.compress_nm(w, 2, 4)
  x = jax.random.normal(jax.random.key(5), (3, 16))
  np.testing.assert_allclose(ops.dot(x, a), x @ w, rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(ops.einsum("bi,io->bo", x, a), x @ w, rtol=1e-6, atol=1e-6)
  assert jax.jit(ops.dot)(x, a).shape == (3, 8)


def test_apply_matches_dense_pruned_and_int4_values(pruned):
  tokens = jnp.arange(24, dtype=jnp.int32).reshape(2, 12) % CFG.vocab_size
  logits = jax.jit(lambda p: model.apply(CFG, p, tokens)[0])
  sparse = compress_kernels(pruned)
  leaves = jax.tree.leaves(sparse, is_leaf=model.is_weight_leaf)
  assert sum(model.is_nmarray(x) for x in leaves) == 7 * CFG.n_layers
  np.testing.assert_allclose(logits(sparse), logits(pruned), atol=1e-5, rtol=1e-5)
  int4 = compress_kernels(pruned, values_fn=lambda v: quant.quantize_tensor(v, bits=4))
  deq = jax.tree.map(lambda x: model.decompress_nm(x) if model.is_nmarray(x) else x, int4,
                     is_leaf=model.is_nmarray)
  k, w = (np.asarray(t["layers_0"]["attn"]["q"]["kernel"]) for t in (deq, pruned))
  assert (k[w == 0] == 0).all()  # quantized values cannot break the 2:4 pattern
  np.testing.assert_allclose(logits(int4), logits(deq), atol=1e-5, rtol=1e-5)


def _assert_same_tree(a, b):
  assert jax.tree.structure(a) == jax.tree.structure(b)  # static fields are in the treedef
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
    assert x.dtype == y.dtype
    np.testing.assert_array_equal(np.asarray(x, np.float32), np.asarray(y, np.float32))


def test_checkpoint_round_trip(tmp_path, pruned):
  params = dict(pruned, layers_0=compress_kernels(pruned["layers_0"]))
  l1 = pruned["layers_1"]
  int4 = lambda **kw: (lambda v: quant.quantize_tensor(v, bits=4, **kw))
  attn = dict(l1["attn"], q=compress_kernels(l1["attn"]["q"], values_fn=int4()),
              k=compress_kernels(l1["attn"]["k"], values_fn=int4(group_size=16,
                                                                  symmetric=False)))
  mlp = dict(l1["mlp"], up=dict(kernel=quant.quantize_tensor(l1["mlp"]["up"]["kernel"])))
  params["layers_1"] = dict(l1, attn=attn, mlp=mlp)
  folder = checkpoint.save_params(str(tmp_path / "nm"), params)
  assert folder.endswith("/0")
  restored, meta, _ = checkpoint.load_params(str(tmp_path / "nm"))
  _assert_same_tree(restored, params)
  assert meta["nmarrays"]["layers_1/attn/q/kernel"] == dict(n=2, m=4, shape=[64, 64],
                                                           dtype="float32")
  assert len(meta["nmarrays"]) == 9
  assert meta["qarrays"]["layers_1/attn/k/kernel/values"]["group_size"] == 16
  assert set(meta["qarrays"]) == {"layers_1/attn/q/kernel/values",
                                  "layers_1/attn/k/kernel/values", "layers_1/mlp/up/kernel"}
  # The abstract route restores straight into NMArrays.
  target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), params)
  direct, _, _ = checkpoint.load_params(str(tmp_path / "nm"), target=target)
  _assert_same_tree(direct, params)


def test_state_dict_round_trip_and_bad_metadata(pruned):
  params = compress_kernels(pruned["layers_0"], values_fn=lambda v: quant.quantize_tensor(v,
                                                                                          bits=4))
  state, qman = checkpoint.to_state_dict(params)
  nman = checkpoint.nmarray_manifest(params)
  assert set(state["attn"]["q"]["kernel"]) == {"values", "indices"}
  assert set(state["attn"]["q"]["kernel"]["values"]) == {"values", "scale"}
  _assert_same_tree(checkpoint.from_state_dict(state, qman, nman), params)
  with pytest.raises(ValueError, match="NMArray metadata names paths absent"):
    checkpoint.from_state_dict(state, qman, {**nman, "x/kernel": nman["attn/q/kernel"]})
  with pytest.raises(ValueError, match="not a stored NMArray"):
    checkpoint.from_state_dict(state, qman, {"attn/q/kernel/values": nman["attn/q/kernel"]})
  with pytest.raises(ValueError, match=r"values shape \(32, 64\) must be \(16, 64\) for 1:4"):
    checkpoint.from_state_dict(state, qman, {**nman, "attn/q/kernel": dict(
        nman["attn/q/kernel"], n=1)})


@pytest.mark.parametrize("args, kw, match", [
    ((jnp.ones((8, 4)), 5, 4), {}, r"n=5 must be in \[1, m=4\]"),
    ((jnp.ones((8, 4)), 0, 4), {}, r"n=0 must be in \[1, m=4\]"),
    ((jnp.ones((8, 4)), 1, 0), {}, r"m=0 must be in \[1, 256\]"),
    ((jnp.ones((512, 4)), 1, 512), {}, r"m=512 must be in \[1, 256\]"),
    ((jnp.ones((8, 4)), 2, 3), {}, r"m=3 must divide the kernel's input axis \(shape\[0\]=8\)"),
    ((jnp.ones((8, 4)), 2, 2.0), {}, r"m=2.0 must be an int"),
    ((jnp.ones((8, 4)), 2, 4), {}, r"group 0 \(rows 0..3\), column 0 has 4 non-zeros > n=2"),
    ((jnp.zeros((8, 4)).at[5, 3].set(1).at[6, 3].set(1), 1, 4), {},
     r"group 1 \(rows 4..7\), column 3 has 2 non-zeros > n=1"),
    ((jnp.ones((8,)), 2, 4), {}, r"kernel must be a 2-D \[in, out\] array, got shape \(8,\)"),
    ((jnp.ones((2, 8, 4)), 2, 4), {}, r"kernel must be a 2-D"),
    ((jnp.ones((8, 4), jnp.int32), 2, 4), {}, "kernel must be floating"),
    ((jnp.ones((8, 4)), 2, 4), dict(mask=jnp.ones((8, 4), bool)), "4 mask entries > n=2"),
    ((jnp.ones((8, 4)), 2, 4), dict(mask=jnp.ones((8, 2), bool)), "mask shape"),
    ((jnp.ones((8, 4)), 2, 4), dict(mask=jnp.ones((8, 4))), "mask must be boolean"),
])
def test_bad_compress_inputs(args, kw, match):
  with pytest.raises(ValueError, match=match):
    model.compress_nm(*args, **kw)


def test_bad_with_values():
  a = model.compress_nm(prune_nm(jax.random.normal(jax.random.key(6), (16, 8)), 2, 4), 2, 4)
  with pytest.raises(ValueError, match=r"values shape \(16, 8\) must equal .* \(8, 8\)"):
    nm.with_values(a, jnp.zeros((16, 8)))
  with pytest.raises(ValueError, match="values dtype bfloat16 must equal"):
    nm.with_values(a, a.values.astype(jnp.bfloat16))
  with pytest.raises(ValueError, match="per-row scales"):
    nm.with_values(a, quant.quantize_tensor(a.values, bits=8, axis=1))
  with pytest.raises(ValueError, match="group_size=1 must be a multiple of n=2"):
    nm.with_values(a, quant.quantize_tensor(a.values, bits=8, group_size=1))
  with pytest.raises(ValueError, match="already transformed"):
    model.compress_nm(quant.quantize_tensor(jnp.ones((8, 4))), 2, 4)
  ok = nm.with_values(a, quant.quantize_tensor(a.values, bits=4, group_size=4))
  assert ok.values.group_size == 4 and ok.values.scale.shape == (2, 8)

"""Sharding rules: path matching, divisibility fallback, meshes."""

import jax
import jax.numpy as jnp
import optax
import pytest
from jax.sharding import AbstractMesh
from jax.sharding import PartitionSpec as P

import model
from model import sharding
from model.qarray import QArray

MESH = AbstractMesh((2, 4, 1), sharding.MESH_AXES)


def test_param_specs_follow_rules():
  shapes = model.param_shapes(model.get_preset("test"))
  specs = sharding.tree_specs(shapes, MESH)
  assert specs["embed"]["embedding"] == P(None, "fsdp")  # vocab 259 not divisible -> replicated
  assert specs["layers_0"]["attn"]["q"]["kernel"] == P("fsdp", None)
  assert specs["layers_1"]["attn"]["o"]["kernel"] == P(None, "fsdp")
  assert specs["layers_0"]["mlp"]["down"]["kernel"] == P(None, "fsdp")
  assert specs["layers_0"]["attn_norm"]["scale"] == P()
  # Defaults may win nothing (tied embeddings: no lm_head); a user rule must win a path.
  user = sharding.tree_specs(shapes, MESH, [(r"mlp/up/kernel", P("mlp", "embed"))])
  assert user["layers_0"]["mlp"]["up"]["kernel"] == P(None, "fsdp")
  with pytest.raises(ValueError, match="sharding rule 'lm_head/' matches no param path"):
    sharding.tree_specs(shapes, MESH, [(r"lm_head/", P())])


def test_tensor_axis_and_divisibility():
  mesh = AbstractMesh((1, 2, 4), sharding.MESH_AXES)
  shapes = model.param_shapes(model.get_preset("test"))  # d_model 64, ffn 128, kv dim 32
  specs = sharding.tree_specs(shapes, mesh)
  assert specs["layers_0"]["mlp"]["gate"]["kernel"] == P("fsdp", "tensor")
  assert specs["layers_0"]["attn"]["k"]["kernel"] == P("fsdp", "tensor")
  odd = AbstractMesh((1, 3, 1), sharding.MESH_AXES)
  specs = sharding.tree_specs(shapes, odd)  # 3 divides nothing here
  assert all(s == P(None, None) or s == P() or s == P(None)
             for s in jax.tree.leaves(specs, is_leaf=lambda x: isinstance(x, P)))


def test_optimizer_state_and_qarray_leaves_share_the_rules():
  shapes = model.param_shapes(model.get_preset("test"))
  opt = jax.eval_shape(optax.adam(1e-3).init, shapes)
  specs = sharding.tree_specs(opt, MESH)
  assert specs[0].mu["layers_0"]["attn"]["q"]["kernel"] == P("fsdp", None)
  assert specs[0].count == P()
  q = QArray(values=jnp.zeros((64, 64), jnp.int8), scale=jnp.ones((1, 64)), shape=(64, 64))
  specs = sharding.tree_specs({"layers_0": {"attn": {"q": {"kernel": q}}}}, MESH)
  qs = specs["layers_0"]["attn"]["q"]["kernel"]
  assert qs.values == P("fsdp", None) and qs.scale == P(None, None)


def test_make_mesh_and_errors():
  mesh = sharding.make_mesh()
  assert mesh.axis_names == sharding.MESH_AXES
  assert mesh.devices.size == len(jax.devices())
  assert sharding.batch_divisor(mesh) == len(jax.devices())
  with pytest.raises(ValueError, match="config.mesh.fsdp=0"):
    sharding.make_mesh(fsdp=0)
  n = len(jax.devices())
  with pytest.raises(ValueError, match=f"needs {n + 1} devices"):
    sharding.make_mesh(data=n + 1)
  with pytest.raises(ValueError, match="only one axis"):
    sharding.make_mesh(data=-1, fsdp=-1)

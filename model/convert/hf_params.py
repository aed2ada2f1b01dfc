"""Hugging Face parameter names <-> sparq param paths; `load_hf` and `export_hf`.

Import validates every tensor name and shape from the safetensors headers before
reading any data, then reads one tensor at a time, largest first, so the peak
memory stays close to the size of the params being built (see
scripts/bench_convert.py). Torch `Linear` weights are [out, in]; sparq kernels
are [in, out], so projections are transposed on the way in and out.
"""

from __future__ import annotations

import json
import os

import jax
import numpy as np

from model.config import ModelConfig
from model.convert import safetensors_io as st
from model.convert.hf_config import (
    architecture_of,
    checkpoint_dtype,
    from_hf_config,
    to_hf_config,
)
from model.transformer import param_shapes
from model.tree import check_finite

Path = tuple[str, ...]
# Tensors some checkpoints carry that are recomputed, not learned.
_IGNORED_SUFFIXES = (".rotary_emb.inv_freq",)
DEFAULT_MAX_SHARD_BYTES = 5 * 2**30


def name_map(cfg: ModelConfig) -> list[tuple[str, Path, bool]]:
  """(hf_name, sparq path, transposed) for every param of `cfg`, in HF's order."""
  out: list[tuple[str, Path, bool]] = [("model.embed_tokens.weight", ("embed", "embedding"),
                                        False)]
  for i in range(cfg.n_layers):
    hf, ours = f"model.layers.{i}", f"layers_{i}"
    out.append((f"{hf}.input_layernorm.weight", (ours, "attn_norm", "scale"), False))
    for p in "qkvo":
      out.append((f"{hf}.self_attn.{p}_proj.weight", (ours, "attn", p, "kernel"), True))
      if cfg.qkv_bias and p != "o":
        out.append((f"{hf}.self_attn.{p}_proj.bias", (ours, "attn", p, "bias"), False))
    if cfg.qk_norm:
      for p in "qk":
        out.append((f"{hf}.self_attn.{p}_norm.weight", (ours, "attn", f"{p}_norm", "scale"),
                    False))
    out.append((f"{hf}.post_attention_layernorm.weight", (ours, "mlp_norm", "scale"), False))
    for p in ("gate", "up", "down"):
      out.append((f"{hf}.mlp.{p}_proj.weight", (ours, "mlp", p, "kernel"), True))
  out.append(("model.norm.weight", ("final_norm", "scale"), False))
  if not cfg.tie_embeddings:
    out.append(("lm_head.weight", ("lm_head", "kernel"), True))
  return out


def _layout(x: np.ndarray, transposed: bool, dtype: np.dtype) -> np.ndarray:
  """x (or x.T) as a C-contiguous array of `dtype`; no copy when nothing changes."""
  if not transposed:
    return np.ascontiguousarray(x, dtype=dtype)
  out = np.empty(x.shape[::-1], dtype)
  for i in range(0, x.shape[0], 256):  # row blocks: ~2x faster than one strided copy
    out[:, i:i + 256] = x[i:i + 256].T
  return out


def _get(tree, path: Path):
  for k in path:
    tree = tree[k]
  return tree


def _set(tree: dict, path: Path, value) -> None:
  for k in path[:-1]:
    tree = tree.setdefault(k, {})
  tree[path[-1]] = value


def read_config(path: str) -> dict:
  """The config.json dict of a Hugging Face model dir."""
  if not os.path.isdir(path):
    raise FileNotFoundError(f"Hugging Face model dir {path!r} does not exist")
  file = os.path.join(path, "config.json")
  if not os.path.isfile(file):
    raise FileNotFoundError(f"{path} has no config.json (expected a Hugging Face model dir)")
  with open(file) as f:
    return json.load(f)


def load_hf(path: str, *, param_dtype: str | None = None,
            dtype: str | None = None) -> tuple[ModelConfig, dict]:
  """Imports a Hugging Face model dir as (ModelConfig, params).

  Args:
    path: dir with config.json and model.safetensors (or shards + index).
    param_dtype: dtype of the imported params; default: the checkpoint's dtype.
    dtype: compute dtype of the ModelConfig; default: param_dtype.
  """
  hf = read_config(path)
  tensors = st.index_weights(path)
  if param_dtype is None and checkpoint_dtype(hf) is None:  # fall back to the tensors' dtype
    param_dtype = next((t.dtype.name for t in tensors.values() if t.dtype.name in
                        ("float32", "bfloat16", "float16")), "float32")
  cfg = from_hf_config(hf, param_dtype=param_dtype, dtype=dtype)
  shapes = param_shapes(cfg)
  plan = name_map(cfg)
  expected = {name for name, _, _ in plan}
  ignorable = {n for n in tensors if n.endswith(_IGNORED_SUFFIXES)}
  if cfg.tie_embeddings:
    ignorable.add("lm_head.weight")  # some tied checkpoints store the shared matrix twice
  missing = sorted(expected - set(tensors))
  unexpected = sorted(set(tensors) - expected - ignorable)
  if missing or unexpected:
    raise ValueError(f"weights in {path} do not match config.json "
                     f"({architecture_of(hf)}): missing {missing[:8]}"
                     f"{'...' if len(missing) > 8 else ''}, unexpected {unexpected[:8]}"
                     f"{'...' if len(unexpected) > 8 else ''}")
  for name, p, transposed in plan:
    want = tuple(_get(shapes, p).shape)
    want = want[::-1] if transposed else want
    if tensors[name].shape != want:
      raise ValueError(f"{name} in {tensors[name].file} has shape {tensors[name].shape}; "
                       f"config.json implies {want}")
  target = np.dtype(cfg.jnp_param_dtype)
  params: dict = {}
  # Largest first: the transient copies of big tensors happen while little is held.
  for name, p, transposed in sorted(plan, key=lambda e: -tensors[e[0]].nbytes):
    raw = st.read_tensor(tensors[name])
    check_finite({name: raw}, tensors[name].file)  # safetensors carry no checksum
    arr = _layout(raw, transposed, target)
    del raw
    _set(params, p, jax.device_put(arr))
    del arr
  return cfg, params


def _plain(leaf, path: Path) -> None:
  if not isinstance(leaf, (jax.Array, np.ndarray)):
    raise ValueError(f"param {'/'.join(path)} is a {type(leaf).__name__}; export needs plain "
                     "arrays (dequantize / densify the params first)")


def export_hf(cfg: ModelConfig, params, out_dir: str, *, dtype: str | None = None,
              architecture: str | None = None, extra_config: dict | None = None,
              max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES, overwrite: bool = False) -> str:
  """Writes config.json + model.safetensors (sharded above `max_shard_bytes`) to `out_dir`.

  Args:
    dtype: dtype of the written weights; default: cfg.param_dtype.
    architecture: one of model.convert.ARCHITECTURES; default: inferred from cfg.
    extra_config: config.json keys to add or override (e.g. bos/eos token ids).
  Returns the architecture written. Everything is validated before anything is written.
  """
  dtype = dtype or cfg.param_dtype
  if dtype not in ("float32", "bfloat16", "float16"):
    raise ValueError(f"dtype={dtype!r}; valid: 'float32', 'bfloat16', 'float16'")
  if max_shard_bytes < 1:
    raise ValueError(f"max_shard_bytes={max_shard_bytes} must be >= 1")
  hf = {**to_hf_config(cfg, architecture, dtype=dtype), **(extra_config or {})}
  plan = name_map(cfg)
  shapes = param_shapes(cfg)
  want_paths = {p for _, p, _ in plan}
  got_paths = {tuple(k.key for k in kp) for kp, _ in jax.tree_util.tree_leaves_with_path(
      params, is_leaf=lambda x: not isinstance(x, dict))}
  if got_paths != want_paths:
    raise ValueError(f"params do not match the config: missing "
                     f"{sorted('/'.join(p) for p in want_paths - got_paths)}, unexpected "
                     f"{sorted('/'.join(p) for p in got_paths - want_paths)}")
  for _, p, _ in plan:
    leaf = _get(params, p)
    _plain(leaf, p)
    if tuple(leaf.shape) != tuple(_get(shapes, p).shape):
      raise ValueError(f"param {'/'.join(p)} has shape {tuple(leaf.shape)}, the config "
                       f"expects {tuple(_get(shapes, p).shape)}")
  if os.path.isdir(out_dir) and not overwrite and any(
      n == "config.json" or n.endswith(".safetensors") for n in os.listdir(out_dir)):
    raise ValueError(f"out_dir={out_dir!r} already holds a model; pass overwrite=True")
  target = np.dtype(jax.numpy.dtype(dtype))

  def fetch(p: Path, transposed: bool):
    def thunk():
      return _layout(np.asarray(_get(params, p)), transposed, target)
    return thunk

  tensors = []
  for name, p, transposed in plan:
    shape = tuple(_get(params, p).shape)
    tensors.append(st.PlannedTensor(name, target, shape[::-1] if transposed else shape,
                                    fetch(p, transposed)))
  os.makedirs(out_dir, exist_ok=True)
  for n in os.listdir(out_dir):  # stale shards from an overwritten export
    if n.endswith(".safetensors") or n == st.INDEX_FILE:
      os.remove(os.path.join(out_dir, n))
  st.write_sharded(out_dir, tensors, max_shard_bytes)
  with open(os.path.join(out_dir, "config.json"), "w") as f:  # last: marks a complete export
    json.dump(hf, f, indent=2)
  return hf["architectures"][0]

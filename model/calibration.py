"""Calibration capture: per-kernel input statistics for one-shot pruning and quantization.

For every `[in, out]` kernel the model multiplies by (attention q/k/v/o, MLP
gate/up/down, the LM head), the calibration pass accumulates over the
calibration tokens

  xtx      = sum_t x_t x_t^T        f32[in, in]   (SparseGPT / GPTQ Hessian, up to scale)
  sq_norm  = sum_t x_t ** 2         f32[in]       (Wanda: x_norm = sqrt(sq_norm))
  abs_sum  = sum_t |x_t|            f32[in]       (AWQ: x_max = abs_sum / count)
  abs_max  = max_t |x_t|            f32[in]       (SmoothQuant's activation scales)
  count    = number of tokens

without storing the activations: each batch's contribution is reduced inside
the jitted forward. Two modes:

  calibrate(cfg, params, batches)                   one pass of the given params;
  calibrate_sequential(cfg, params, batches, fn)    block by block, as the official
      SparseGPT / Wanda / GPTQ code does it: block i's statistics are taken on the
      outputs of the already-compressed blocks 0..i-1, then `fn` compresses block i
      and its outputs feed block i+1. Only the residual stream entering the current
      block ([N, T, D] per batch) is kept between blocks.

Tokens with segment id 0 (padding, where `segment_ids` is given) are excluded.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Iterable, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float

from model.attention import context
from model.config import ModelConfig
from model.layers import Dense, Embed
from model.transformer import Block, Transformer, param_shapes
from model.tree import flatten


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class KernelStats:
  """Input statistics of one kernel, summed over the calibration tokens."""

  xtx: Float[Array, "In In"] | None
  sq_norm: Float[Array, " In"]
  count: Array  # i32 scalar: number of calibration tokens seen
  abs_sum: Float[Array, " In"] | None = None  # sum_t |x_t|
  abs_max: Float[Array, " In"] | None = None  # max_t |x_t|

  @property
  def abs_mean(self) -> Float[Array, " In"]:
    """Mean |x| of each input channel (llm-awq's activation scale `x_max`)."""
    if self.abs_sum is None:
      raise ValueError("these statistics have no abs_sum (captured before it existed)")
    return self.abs_sum / jnp.maximum(self.count, 1).astype(jnp.float32)

  @property
  def x_norm(self) -> Float[Array, " In"]:
    """L2 norm of each input channel over the calibration tokens (Wanda's ||X_j||)."""
    return jnp.sqrt(self.sq_norm)

  def hessian(self) -> Float[Array, "In In"]:
    """2 X^T X / count, SparseGPT's / GPTQ's layer Hessian (any positive scale works)."""
    if self.xtx is None:
      raise ValueError("these statistics were captured with hessian=False (no X^T X)")
    return self.xtx * (2.0 / jnp.maximum(self.count, 1).astype(jnp.float32))

  def __add__(self, other: KernelStats) -> KernelStats:
    both = lambda a, b, f: None if a is None or b is None else f(a, b)
    return KernelStats(both(self.xtx, other.xtx, jnp.add), self.sq_norm + other.sq_norm,
                       self.count + other.count, both(self.abs_sum, other.abs_sum, jnp.add),
                       both(self.abs_max, other.abs_max, jnp.maximum))


Stats = dict[str, KernelStats]
Batch = Array | Mapping[str, Array]  # tokens [B, T], or {"tokens", "segment_ids"?}


def _kernel_path(module: nn.Module) -> str:
  return "/".join(module.scope.path) + "/kernel"


def _capture(weights_BT, want: Callable[[str], bool], hessian: bool, out: dict, prefix: str):
  """A Linen method interceptor adding each Dense input's statistics to `out`."""

  def interceptor(next_fun, args, kwargs, ctx):
    if isinstance(ctx.module, Dense) and ctx.method_name == "__call__":
      path = prefix + _kernel_path(ctx.module)
      if want(path):
        x_NI = args[0].astype(jnp.float32)
        x_NI = (x_NI * weights_BT[..., None]).reshape(-1, x_NI.shape[-1])
        a_NI = jnp.abs(x_NI)
        stats = KernelStats(x_NI.T @ x_NI if hessian else None, jnp.sum(x_NI * x_NI, 0),
                            jnp.sum(weights_BT > 0).astype(jnp.int32), jnp.sum(a_NI, 0),
                            jnp.max(a_NI, 0))
        out[path] = out[path] + stats if path in out else stats
    return next_fun(*args, **kwargs)

  return interceptor


def split_batch(batch: Batch, name: str = "batches") -> tuple[Array, Array | None]:
  if isinstance(batch, Mapping):
    if "tokens" not in batch:
      raise ValueError(f"{name}: a dict batch needs a 'tokens' entry, got keys {sorted(batch)}")
    tokens, seg = batch["tokens"], batch.get("segment_ids")
  else:
    tokens, seg = batch, None
  tokens = jnp.asarray(tokens)
  if tokens.ndim != 2 or not jnp.issubdtype(tokens.dtype, jnp.integer):
    raise ValueError(f"{name}: tokens must be an integer array [B, T], got "
                     f"{tokens.dtype}{list(tokens.shape)}")
  if seg is not None and tuple(jnp.shape(seg)) != tuple(tokens.shape):
    raise ValueError(f"{name}: segment_ids shape {list(jnp.shape(seg))} != tokens shape "
                     f"{list(tokens.shape)}")
  return tokens, seg


def _check_batches(cfg: ModelConfig, batches: Iterable[Batch]) -> list[tuple[Array, Array]]:
  if batches is None:
    raise ValueError("calibration needs batches (token arrays [B, T]); got None")
  out = []
  for batch in batches:
    tokens, seg = split_batch(batch)
    if tokens.shape[1] > cfg.max_seq_len:
      raise ValueError(f"calibration sequence length {tokens.shape[1]} exceeds "
                       f"max_seq_len={cfg.max_seq_len}")
    lo, hi = int(jnp.min(tokens)), int(jnp.max(tokens))
    if lo < 0 or hi >= cfg.vocab_size:
      raise ValueError(f"calibration token ids span [{lo}, {hi}], outside the model's "
                       f"vocabulary [0, {cfg.vocab_size})")
    out.append((tokens, seg))
  if not out:
    raise ValueError("calibration needs at least one batch; got an empty iterable")
  return out


def _positions_weights(tokens, seg):
  b, t = tokens.shape
  if seg is None:
    positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32)[None], (b, t))
    return positions, None, jnp.ones((b, t), jnp.float32)
  # Packed rows restart positions at each segment start.
  seg = jnp.asarray(seg, jnp.int32)
  idx = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32)[None], (b, t))
  start = jnp.where(jnp.concatenate([jnp.ones((b, 1), bool), seg[:, 1:] != seg[:, :-1]], 1),
                    idx, 0)
  positions = idx - jax.lax.cummax(start, axis=1)
  return positions, seg, (seg > 0).astype(jnp.float32)


@functools.partial(jax.jit, static_argnames=("cfg", "paths", "hessian"))
def _batch_stats(cfg: ModelConfig, params, tokens, seg, paths: tuple[str, ...] | None,
                 hessian: bool) -> Stats:
  positions, seg, w_BT = _positions_weights(tokens, seg)
  out: Stats = {}
  want = (lambda p: True) if paths is None else (lambda p: p in paths)
  with nn.intercept_methods(_capture(w_BT, want, hessian, out, "")):
    Transformer(cfg).apply({"params": params}, tokens, positions, seg)
  return out


def _check_paths(params, paths) -> tuple[str, ...] | None:
  if paths is None:
    return None
  known = set(flatten(params)[0])
  paths = tuple(sorted(paths))
  missing = [p for p in paths if p not in known]
  if missing:
    raise ValueError(f"calibration paths {missing[:3]} are not param paths of the model")
  return paths


def calibrate(cfg: ModelConfig, params, batches: Iterable[Batch], *,
              paths: Iterable[str] | None = None, hessian: bool = True) -> Stats:
  """One pass: {kernel path: KernelStats} of every Dense kernel (or only `paths`).

  Args:
    cfg, params: the model as it is (no block is compressed in between).
    batches: token arrays [B, T] or dicts with "tokens" (and "segment_ids": 0 = padding).
    paths: restrict to these kernel paths (e.g. the prunable ones).
    hessian: also accumulate X^T X (set False when only channel norms are needed).
  """
  data = _check_batches(cfg, batches)
  paths = _check_paths(params, paths)
  total: Stats = {}
  for tokens, seg in data:
    stats = _batch_stats(cfg, params, tokens, seg, paths, hessian)
    total = {p: total[p] + s if p in total else s for p, s in stats.items()}
  return total


@functools.partial(jax.jit, static_argnames=("cfg", "layer", "hessian", "want"))
def _block_stats(cfg: ModelConfig, layer_params, x_BTD, positions, seg, w_BT, *, layer: int,
                 hessian: bool, want: tuple[str, ...] | None):
  b, t, _ = x_BTD.shape
  ctx = context(b, t, positions=positions, segment_ids=seg)
  out: Stats = {}
  keep = (lambda p: True) if want is None else (lambda p: p in want)
  with nn.intercept_methods(_capture(w_BT, keep, hessian, out, f"layers_{layer}/")):
    Block(cfg).apply({"params": layer_params}, x_BTD, ctx, layer)
  return out


@functools.partial(jax.jit, static_argnames=("cfg", "layer"))
def _block_forward(cfg: ModelConfig, layer_params, x_BTD, positions, seg, *, layer: int):
  b, t, _ = x_BTD.shape
  ctx = context(b, t, positions=positions, segment_ids=seg)
  return Block(cfg).apply({"params": layer_params}, x_BTD, ctx, layer)[0]


@functools.partial(jax.jit, static_argnames="cfg")
def _embed(cfg: ModelConfig, embed_params, tokens):
  return Embed(cfg.vocab_size, cfg.d_model, cfg.jnp_dtype, cfg.jnp_param_dtype).apply(
      {"params": embed_params}, tokens)


UpdateBlock = Callable[[int, dict, Stats], dict]


def calibrate_sequential(cfg: ModelConfig, params, batches: Iterable[Batch],
                         update_block: UpdateBlock, *, paths: Iterable[str] | None = None,
                         hessian: bool = True, progress: Callable[[int, int], None] | None = None):
  """Compresses block by block; each block is calibrated on the compressed blocks before it.

  Args:
    update_block: `(layer, block_params, stats) -> new block_params`, where block_params
      is `params["layers_{layer}"]` and stats maps full kernel paths of that block
      (e.g. "layers_3/mlp/down/kernel") to their KernelStats. It returns the compressed
      block (same structure; leaves may become QArrays).
    paths: restrict the statistics to these kernel paths.
    progress: optional `(layer, n_layers)` callback after each block.
  Returns: the params with every block replaced by `update_block`'s result (embedding,
  final norm and LM head unchanged).
  """
  data = _check_batches(cfg, batches)
  want = _check_paths(params, paths)
  prepared = [(_positions_weights(tokens, seg), tokens) for tokens, seg in data]
  xs = [_embed(cfg, params["embed"], tokens) for _, tokens in prepared]
  params = dict(params)
  for i in range(cfg.n_layers):
    name = f"layers_{i}"
    stats: Stats = {}
    for ((positions, seg, w_BT), _), x in zip(prepared, xs, strict=True):
      s = _block_stats(cfg, params[name], x, positions, seg, w_BT, layer=i, hessian=hessian,
                       want=want)
      stats = {p: stats[p] + v if p in stats else v for p, v in s.items()}
    params[name] = update_block(i, params[name], stats)
    xs = [_block_forward(cfg, params[name], x, positions, seg, layer=i)
          for ((positions, seg, _), _), x in zip(prepared, xs, strict=True)]
    if progress is not None:
      progress(i, cfg.n_layers)
  return params


def check_stats(stats: Mapping[str, KernelStats], paths: Iterable[str], *,
                hessian: bool = False) -> None:
  """ValueError unless every path has finite statistics (and X^T X where `hessian`)."""
  for p in paths:
    if p not in stats:
      raise ValueError(f"calibration statistics have no entry for {p!r} "
                       f"(have {sorted(stats)[:4]}...)")
    s = stats[p]
    if hessian and s.xtx is None:
      raise ValueError(f"calibration statistics for {p!r} have no X^T X (hessian=False)")
    arrays = [s.sq_norm] + ([s.xtx] if s.xtx is not None else [])
    if not all(bool(np.isfinite(np.asarray(a)).all()) for a in arrays):
      raise ValueError(f"calibration statistics for {p!r} contain NaN or Inf")
    if int(s.count) < 1:
      raise ValueError(f"calibration statistics for {p!r} saw no tokens")


@dataclasses.dataclass(frozen=True)
class Calibration:
  """What a data-aware compression method needs: the model config, batches and the mode.

  sequential=True (the official SparseGPT / Wanda / GPTQ procedure): block i is
  calibrated on the outputs of the already-compressed blocks; False: one pass over
  the uncompressed model.
  """

  cfg: ModelConfig
  batches: tuple
  sequential: bool = True

  def __post_init__(self):
    if not isinstance(self.cfg, ModelConfig):
      raise ValueError(f"Calibration.cfg must be a model.ModelConfig, got "
                       f"{type(self.cfg).__name__}")
    object.__setattr__(self, "batches", tuple(self.batches))
    _check_batches(self.cfg, self.batches)

  @property
  def n_tokens(self) -> int:
    return sum(int(split_batch(b)[0].size) for b in self.batches)


def check_calibration(calib, params=None, *, what: str = "this recipe") -> Calibration:
  """The calib= argument as a `Calibration` (whose cfg describes `params`), or a ValueError."""
  if calib is None:
    raise ValueError(f"{what} needs calib= (a model.calibration.Calibration with the model "
                     "config and calibration token batches); got None")
  if not isinstance(calib, Calibration):
    raise ValueError(f"calib= must be a model.calibration.Calibration, got "
                     f"{type(calib).__name__}")
  if params is not None:
    shapes = jax.tree.map(lambda x: tuple(x.shape), param_shapes(calib.cfg))
    if shapes != jax.tree.map(lambda x: tuple(x.shape), params):
      raise ValueError("calib.cfg does not describe these params (param shapes differ); "
                       "pass the model config the params were trained with")
  return calib


def block_inputs(cfg: ModelConfig, params, batches: Iterable[Batch]):
  """Yields `(layer, [(x_BTD, positions, segment_ids), ...])`: each block's float inputs.

  The residual stream entering block `layer` for every batch, computed block by block
  with the given params (for searches that need a block's real activations, as AWQ's
  module-level losses); only one block's inputs are held at a time.
  """
  data = _check_batches(cfg, batches)
  prepared = [(_positions_weights(tokens, seg), tokens) for tokens, seg in data]
  xs = [_embed(cfg, params["embed"], tokens) for _, tokens in prepared]
  for i in range(cfg.n_layers):
    yield i, [(x, positions, seg) for ((positions, seg, _), _), x in zip(prepared, xs,
                                                                           strict=True)]
    xs = [_block_forward(cfg, params[f"layers_{i}"], x, positions, seg, layer=i)
          for ((positions, seg, _), _), x in zip(prepared, xs, strict=True)]

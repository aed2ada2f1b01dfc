"""Self-speculative decoding with an early-exit draft (LayerSkip / draft-and-verify style).

The draft is the target's first k layers (`model.hidden_states`) plus a small
learned head with its own param subtree `params["exit_head"]`: h + h @ W (W
zero-initialised), an RMSNorm (initialised from the final norm), then the
target's shared LM head (`model.unembed`). The base model knows nothing of it.
The draft writes layers < k of the target's own KV cache, which the verify call
then overwrites, so no second cache and no draft prefill are needed.
"""

from __future__ import annotations

import dataclasses
import re

import flax.linen as nn
import jax
import jax.numpy as jnp

from decoding import speculative
from model import transformer
from model.config import ModelConfig
from model.decoder import Decoder
from model.layers import Dense, RMSNorm

HEAD = "exit_head"


class ExitHead(nn.Module):
  """norm(h + h @ proj): the draft's head before the shared LM head."""

  cfg: ModelConfig

  @nn.compact
  def __call__(self, x_BTD):
    cfg = self.cfg
    proj = Dense(cfg.d_model, impl=cfg.matmul_impl, dtype=cfg.jnp_dtype,
                 param_dtype=cfg.jnp_param_dtype, name="proj")
    return RMSNorm(cfg.norm_eps, cfg.jnp_dtype, cfg.jnp_param_dtype, name="norm")(
        x_BTD + proj(x_BTD))


def init_exit_head(cfg: ModelConfig, params) -> dict:
  """Head params equal to the model's own head at any exit layer (zero adapter)."""
  d = cfg.d_model
  return {"proj": {"kernel": jnp.zeros((d, d), cfg.jnp_param_dtype)},
          "norm": {"scale": jnp.array(params["final_norm"]["scale"])}}


def with_exit_head(params, head) -> dict:
  """The target's params plus an exit head subtree (what an `ExitDecoder` reads)."""
  if not isinstance(head, dict) or set(head) != {"proj", "norm"}:
    raise ValueError(f"exit head params must have keys ['norm', 'proj'], got "
                     f"{sorted(head) if isinstance(head, dict) else type(head).__name__}")
  return {**params, HEAD: head}


def from_legacy(params) -> dict:
  """Params written before the head had its own subtree (top-level exit_proj / exit_norm)."""
  if "exit_proj" not in params:
    return params
  rest = {k: v for k, v in params.items() if k not in ("exit_proj", "exit_norm")}
  return with_exit_head(rest, {"proj": params["exit_proj"], "norm": params["exit_norm"]})


def model_params(params) -> dict:
  """The base model's params (without the exit head)."""
  return {k: v for k, v in params.items() if k != HEAD}


def exit_logits(cfg: ModelConfig, params, x_BTD):
  """The exit head (the final norm where params hold none) and the shared LM head."""
  if HEAD in params:
    h_BTD = ExitHead(cfg).apply({"params": params[HEAD]}, x_BTD)
  else:
    norm = RMSNorm(cfg.norm_eps, cfg.jnp_dtype, cfg.jnp_param_dtype)
    h_BTD = norm.apply({"params": params["final_norm"]}, x_BTD)
  return transformer.unembed(cfg, params, h_BTD)


@dataclasses.dataclass(frozen=True)
class ExitDecoder(Decoder):
  """A step_fn running the first `exit_layer` layers, the exit head and the LM head (params
  without an `exit_head` subtree get the final norm instead).

  Its caches are the full model's (the draft shares the target's); layers from
  `exit_layer` on are left untouched.
  """

  exit_layer: int = 1

  def __post_init__(self):
    n = self.cfg.n_layers
    if isinstance(self.exit_layer, bool) or not isinstance(self.exit_layer, int) or not (
        1 <= self.exit_layer <= n):
      raise ValueError(f"exit_layer={self.exit_layer!r} must be an int in [1, {n}]")

  def __call__(self, params, tokens_BT, cache):
    x_BTD, cache = transformer.hidden_states(self.cfg, model_params(params), tokens_BT,
                                             n_layers=self.exit_layer, cache=cache)
    return exit_logits(self.cfg, params, x_BTD), cache

  def read_params(self, params):
    """Layers < exit_layer, embedding / LM head and the exit head (not the final norm)."""
    keep = lambda name: (not re.fullmatch(r"layers_\d+", name)
                         or int(name.split("_")[1]) < self.exit_layer) and name != "final_norm"
    return {k: v for k, v in params.items() if keep(k)}

  @property
  def n_layers(self) -> int:
    return self.exit_layer


def self_speculative_decode(cfg: ModelConfig, params, exit_layer: int, prompt_tokens, *,
                            max_new_tokens: int, **kwargs) -> speculative.SpeculativeOutput:
  """Speculative decoding whose draft is the first `exit_layer` layers + the exit head.

  `params` should hold an exit head (`with_exit_head`); without one, the final norm and
  LM head are applied after layer k. Other arguments as in
  `speculative.speculative_generate` (`target_cache` defaults to a fresh cache).
  """
  if isinstance(exit_layer, bool) or not isinstance(exit_layer, int) or not (
      1 <= exit_layer < cfg.n_layers):
    raise ValueError(f"exit_layer={exit_layer!r} must be an int in [1, {cfg.n_layers - 1}] "
                     f"(the target has {cfg.n_layers} layers)")
  return speculative.speculative_generate(
      params, params, prompt_tokens, target_step_fn=Decoder(cfg),
      draft_step_fn=ExitDecoder(cfg, exit_layer), share_cache=True,
      max_new_tokens=max_new_tokens, **kwargs)


def distill_loss(cfg: ModelConfig, params, batch, *, exit_layer: int):
  """KL(target || exit draft) per valid position, plus greedy agreement (metrics).

  `params` are the target's plus the exit head; gradients reach only the head (the
  target's logits are a stop-gradient, and the draft reads the frozen layers).
  """
  tokens = batch["tokens"]
  kw = dict(positions=batch.get("positions"), segment_ids=batch.get("segment_ids"))
  base = model_params(params)
  target_BTV = jax.lax.stop_gradient(transformer.apply(cfg, base, tokens, **kw)[0])
  x_BTD, _ = transformer.hidden_states(cfg, base, tokens, n_layers=exit_layer, **kw)
  exit_BTV = exit_logits(cfg, params, x_BTD)
  logp_BTV = jax.nn.log_softmax(target_BTV)
  kl_BT = jnp.sum(jnp.exp(logp_BTV) * (logp_BTV - jax.nn.log_softmax(exit_BTV)), axis=-1)
  seg = batch.get("segment_ids")
  valid_BT = jnp.ones(kl_BT.shape, bool) if seg is None else seg > 0
  n = jnp.maximum(jnp.sum(valid_BT), 1)
  kl = jnp.sum(jnp.where(valid_BT, kl_BT, 0.0)) / n
  agree_BT = jnp.argmax(target_BTV, -1) == jnp.argmax(exit_BTV, -1)
  return kl, {"kl": kl, "agree": jnp.sum(agree_BT & valid_BT) / n}

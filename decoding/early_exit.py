"""Self-speculative decoding with an early-exit draft (LayerSkip / draft-and-verify style).

The draft is the target's first k layers plus a small learned head: h + h @ W
(W zero-initialised), its own RMSNorm (initialised from the final norm), then
the target's shared LM head. It runs through `model.apply(..., exit_layer=k)`
and writes layers < k of the target's own KV cache, which the verify call then
overwrites, so no second cache and no draft prefill are needed.
"""

from __future__ import annotations

import functools
import re

import jax
import jax.numpy as jnp
import optax

from decoding import speculative

HEAD_KEYS = ("exit_proj", "exit_norm")


def init_exit_head(cfg, params) -> dict:
  """Head params equal to the model's own head at any exit layer (zero adapter)."""
  d = cfg.d_model
  return {"exit_proj": {"kernel": jnp.zeros((d, d), cfg.jnp_param_dtype)},
          "exit_norm": {"scale": jnp.array(params["final_norm"]["scale"])}}


def with_exit_head(params, head) -> dict:
  """The target's params plus an exit head (what `exit_layer=` applies read)."""
  missing = [k for k in HEAD_KEYS if k not in head]
  if missing:
    raise ValueError(f"exit head params lack {missing}; expected keys {HEAD_KEYS}")
  return {**params, **{k: head[k] for k in HEAD_KEYS}}


def draft_params(params, exit_layer: int) -> dict:
  """The subtree an early-exit draft reads (for cost accounting)."""
  keep = lambda name: (not re.fullmatch(r"layers_\d+", name)
                       or int(name.split("_")[1]) < exit_layer) and name != "final_norm"
  return {k: v for k, v in params.items() if keep(k)}


def self_speculative_decode(cfg, params, exit_layer: int, prompt_tokens, *,
                            max_new_tokens: int, **kwargs) -> speculative.SpeculativeOutput:
  """Speculative decoding whose draft is the first `exit_layer` layers + the exit head.

  `params` should hold an exit head (`with_exit_head`); without one, the final
  norm and LM head are applied after layer k. Other arguments as in
  `speculative.speculative_generate` (`target_cache` defaults to a fresh cache).
  """
  if not isinstance(exit_layer, int) or not 1 <= exit_layer < cfg.n_layers:
    raise ValueError(f"exit_layer={exit_layer!r} must be an int in [1, {cfg.n_layers - 1}] "
                     f"(the target has {cfg.n_layers} layers)")
  kwargs.setdefault("target_cache", functools.partial(speculative.model_cache, cfg))
  return speculative.speculative_generate(
      params, params, prompt_tokens, target_step_fn=speculative.model_step_fn(cfg),
      draft_step_fn=speculative.model_step_fn(cfg, exit_layer), draft_cache=None,
      max_new_tokens=max_new_tokens, draft_cost_params=draft_params(params, exit_layer),
      **kwargs)


def distill_loss(cfg, head, params, batch, exit_layer: int):
  """KL(target || exit head) per valid position, plus greedy agreement (metrics)."""
  from model import transformer  # local: model imports decoding.kv_cache

  tokens = batch["tokens"]
  kw = dict(positions_BT=batch.get("positions"), segment_ids_BT=batch.get("segment_ids"))
  target_BTV = jax.lax.stop_gradient(transformer.apply(cfg, params, tokens, **kw)[0])
  exit_BTV = transformer.apply(cfg, with_exit_head(params, head), tokens, exit_layer=exit_layer,
                               **kw)[0]
  logp_BTV = jax.nn.log_softmax(target_BTV)
  kl_BT = jnp.sum(jnp.exp(logp_BTV) * (logp_BTV - jax.nn.log_softmax(exit_BTV)), axis=-1)
  seg = batch.get("segment_ids")
  valid_BT = jnp.ones(kl_BT.shape, bool) if seg is None else seg > 0
  n = jnp.maximum(jnp.sum(valid_BT), 1)
  kl = jnp.sum(jnp.where(valid_BT, kl_BT, 0.0)) / n
  agree_BT = jnp.argmax(target_BTV, -1) == jnp.argmax(exit_BTV, -1)
  return kl, {"kl": kl, "agree": jnp.sum(agree_BT & valid_BT) / n}


def make_train_step(cfg, exit_layer: int, tx: optax.GradientTransformation):
  """A jitted `(head, opt_state, params, batch) -> (head, opt_state, metrics)`; params frozen."""

  def step(head, opt_state, params, batch):
    grad_fn = jax.value_and_grad(distill_loss, argnums=1, has_aux=True)
    (_, metrics), grads = grad_fn(cfg, head, params, batch, exit_layer)
    updates, opt_state = tx.update(grads, opt_state, head)
    return optax.apply_updates(head, updates), opt_state, metrics

  return jax.jit(step, donate_argnums=(0, 1))


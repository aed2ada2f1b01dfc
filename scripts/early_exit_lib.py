"""Distils an early-exit head onto a trained target, through the one trainer (`train_lib`).

The run's params are the target's plus an `exit_head` subtree; only the head trains
(`Hooks.trainable`), towards the target's next-token distribution (KL,
`decoding.early_exit.distill_loss`) on the target's own corpus. The run resumes,
logs metrics.jsonl / TensorBoard and checkpoints like any training run; the
checkpoint meta records `exit_layer`, which `--draft=exit:K` and the speculative
benchmark read.
"""

from __future__ import annotations

import functools

import jax
import numpy as np

from decoding import early_exit
from scripts import checkpoint_lib, data_lib, eval_lib, train_lib


def _eval(exit_layer, model_cfg, params, batches, put_batch) -> dict:
  fn = _metrics_fn(model_cfg, exit_layer)
  ms = jax.device_get([fn(params, put_batch(b)) for b in batches])
  return {k: float(np.mean([m[k] for m in ms])) for k in ("kl", "agree")}


@functools.cache
def _metrics_fn(model_cfg, exit_layer):
  return jax.jit(lambda p, b: early_exit.distill_loss(model_cfg, p, b, exit_layer=exit_layer)[1])


def config(target_workdir: str, *, steps: int, batch_size: int, seq_len: int, lr: float):
  """The run's config: the target's data section, Adam with warmup + cosine to lr / 10."""
  c = train_lib.default_config()
  c.data = eval_lib.data_config_for(target_workdir)
  c.data.update(seq_len=seq_len, batch_size=batch_size, seed=1)
  c.opt.update(lr=lr, warmup_steps=min(20, steps), b2=0.999, weight_decay=0.0, grad_clip=0.0)
  c.train.update(steps=steps, eval_every=0, eval_batches=8)
  c.ckpt.update(every=steps, keep=1)
  return c


def train_exit_head(target_workdir: str, workdir: str, *, exit_layer: int, steps: int,
                    batch_size: int, seq_len: int, lr: float, log=print) -> dict:
  """Distils an exit head at `exit_layer` into a run in `workdir`; returns its summary."""
  meta = checkpoint_lib.load_meta(target_workdir)
  n_layers, max_len = (meta["model_config"][k] for k in ("n_layers", "max_seq_len"))
  checks = [("exit_layer", exit_layer, 1 <= exit_layer < n_layers, f"[1, {n_layers - 1}]"),
            ("steps", steps, steps >= 1, ">= 1"),
            ("batch_size", batch_size, batch_size >= 1, ">= 1"),
            ("seq_len", seq_len, 2 <= seq_len <= max_len, f"[2, {max_len}]"),
            ("lr", lr, lr > 0, "> 0")]
  for name, value, ok, valid in checks:
    if not ok:
      raise ValueError(f"--{name}={value}; valid: {valid}")
  params, cfg, _ = checkpoint_lib.load_params(target_workdir)
  params = early_exit.with_exit_head(params, early_exit.init_exit_head(cfg, params))
  hooks = train_lib.Hooks(
      loss_fn=functools.partial(early_exit.distill_loss, exit_layer=exit_layer),
      eval_fn=functools.partial(_eval, exit_layer), trainable=rf"^{early_exit.HEAD}/")
  c = config(target_workdir, steps=steps, batch_size=batch_size, seq_len=seq_len, lr=lr)
  if checkpoint_lib.has_checkpoint(workdir):  # resuming: the untrained head was measured
    before = checkpoint_lib.load_meta(workdir)["before"]
  else:
    val = data_lib.eval_batches(data_lib.load_split(c.data, "val"), batch_size, seq_len,
                                c.train.eval_batches)
    before = _eval(exit_layer, cfg, params, list(val), lambda b: jax.tree.map(jax.numpy.asarray, b))
  result = train_lib.train_and_evaluate(
      c, workdir, init_params=params, hooks=hooks, model_cfg=cfg,
      meta=dict(exit_layer=exit_layer, target_workdir=target_workdir, before=before))
  s = dict(result.summary, **{f"val_{k}_before": v for k, v in before.items()})
  log(f"exit layer {exit_layer}/{n_layers}, head after {s['step']} steps: val KL "
      f"{before['kl']:.3f} -> {s['val_kl']:.3f}, greedy agreement {before['agree']:.3f} -> "
      f"{s['val_agree']:.3f}")
  return s


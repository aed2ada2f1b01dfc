r"""Trains the early-exit head of a trained target for self-speculative decoding.

python -m scripts.train_early_exit --target_workdir=runs/spec_target --exit_layer=1 \
    --workdir=runs/spec_exit

The target is frozen; the head (h + h @ W, an RMSNorm, the shared LM head after
layer k) is distilled towards the target's next-token distribution (KL) on the
target's training corpus. Writes a params-only checkpoint of the target plus
the head to --workdir (meta: exit_layer, val KL and greedy agreement), which
`decoding.self_speculative_decode` and scripts/bench_speculative.py load.
"""

from __future__ import annotations

import time

import jax
import numpy as np
import optax
from absl import app, flags

from decoding import early_exit
from scripts import checkpoint_lib, data_lib, eval_lib

_TARGET = flags.DEFINE_string("target_workdir", None, "Workdir of the trained target.")
_WORKDIR = flags.DEFINE_string("workdir", None, "Output folder for target + exit head.")
_EXIT = flags.DEFINE_integer("exit_layer", 1, "Layers the draft runs (1 .. n_layers - 1).")
_STEPS = flags.DEFINE_integer("steps", 150, "Training steps.")
_BATCH = flags.DEFINE_integer("batch_size", 8, "Rows per step.")
_SEQ = flags.DEFINE_integer("seq_len", 256, "Tokens per row.")
_LR = flags.DEFINE_float("lr", 3e-3, "Adam learning rate.")
flags.mark_flags_as_required(["target_workdir", "workdir"])


def train_exit_head(target_workdir: str, workdir: str, *, exit_layer: int, steps: int,
                    batch_size: int, seq_len: int, lr: float, log=print) -> dict:
  """Distils an exit head at `exit_layer`, saves target + head to `workdir`; returns metrics."""
  meta = checkpoint_lib.load_meta(target_workdir)
  n_layers = meta["model_config"]["n_layers"]
  max_len = meta["model_config"]["max_seq_len"]
  checks = [("exit_layer", exit_layer, 1 <= exit_layer < n_layers, f"[1, {n_layers - 1}]"),
            ("steps", steps, steps >= 1, ">= 1"), ("batch_size", batch_size, batch_size >= 1,
                                                    ">= 1"),
            ("seq_len", seq_len, 2 <= seq_len <= max_len, f"[2, {max_len}]"),
            ("lr", lr, lr > 0, "> 0")]
  for name, value, ok, valid in checks:
    if not ok:
      raise ValueError(f"--{name}={value}; valid: {valid}")
  params, cfg, _ = checkpoint_lib.load_params(target_workdir)
  data = eval_lib.data_config_for(target_workdir)
  it = data_lib.BatchIterator(data_lib.load_split(data, "train"), batch_size, seq_len, seed=1)
  val = list(data_lib.eval_batches(data_lib.load_split(data, "val"), batch_size, seq_len, 8))
  head = early_exit.init_exit_head(cfg, params)
  tx = optax.adam(optax.warmup_cosine_decay_schedule(0.0, lr, min(20, steps), steps, lr * 0.1))
  opt_state = tx.init(head)
  distill = lambda h, b: early_exit.distill_loss(cfg, early_exit.with_exit_head(params, h), b,
                                                 exit_layer=exit_layer)

  @jax.jit
  def step_fn(head, opt_state, batch):
    (_, m), grads = jax.value_and_grad(distill, has_aux=True)(head, batch)
    updates, opt_state = tx.update(grads, opt_state, head)
    return optax.apply_updates(head, updates), opt_state, m

  loss_fn = jax.jit(lambda h, b: distill(h, b)[1])

  def evaluate(h):
    ms = [jax.device_get(loss_fn(h, b)) for b in val]
    return {k: float(np.mean([m[k] for m in ms])) for k in ("kl", "agree")}

  before = evaluate(head)
  log(f"exit layer {exit_layer}/{n_layers}, untrained head: val KL {before['kl']:.3f}, "
      f"greedy agreement {before['agree']:.3f}")
  t0 = time.perf_counter()
  for step in range(1, steps + 1):
    head, opt_state, m = step_fn(head, opt_state, next(it))
    if step % 25 == 0 or step == steps:
      log(f"step {step}: KL {float(m['kl']):.3f} agree {float(m['agree']):.3f} "
          f"({time.perf_counter() - t0:.0f}s)")
  after = evaluate(head)
  log(f"trained head: val KL {after['kl']:.3f}, greedy agreement {after['agree']:.3f}")
  result = {"exit_layer": exit_layer, "target_workdir": target_workdir, "steps": steps,
            "val_kl_before": before["kl"], "val_agree_before": before["agree"],
            "val_kl": after["kl"], "val_agree": after["agree"]}
  checkpoint_lib.save_params(workdir, early_exit.with_exit_head(params, head), cfg, step=steps,
                             meta=result)
  return result


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  try:
    train_exit_head(_TARGET.value, _WORKDIR.value, exit_layer=_EXIT.value, steps=_STEPS.value,
                    batch_size=_BATCH.value, seq_len=_SEQ.value, lr=_LR.value)
  except ValueError as e:
    raise SystemExit(f"error: {e}") from None


if __name__ == "__main__":
  app.run(main)

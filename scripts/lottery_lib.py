"""Lottery tickets: iterative magnitude pruning with weight rewinding, plus controls.

Round 0 trains the dense model for `train.steps`, capturing its weights at step
`lottery.rewind_step` k inside the optimizer state (k=0: the original LTH,
rewinding to the init). Round r = 1..rounds prunes `prune_fraction` of the
weights that survived round r-1 (by |w| of round r-1's trained ticket, globally
or per layer), so the density is exactly (1 - p)^r of the prunable kernels
(`masks.n_pruned`), rewinds the survivors to the step-k weights and retrains for
`train.steps` with the masked optimizer. Controls per round, on the same budget:
  random_reinit  the same masks on a fresh init (seed `control_seed` + r);
  random_mask    the same per-layer sparsity, uniformly random masks, rewound weights.

Layout: `workdir/round_R/{dense|ticket,random_reinit,random_mask}/` (train runs,
each resumable), `round_R/masks.npz`, `round_R/done.json` (the round's record,
written atomically last) and `workdir/results.jsonl` (one line per finished round,
rebuilt from the done markers). A killed run restarts at the first round without a
done marker; inside a round each train run resumes from its own checkpoint.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

import model
import sparsity
from scripts import checkpoint_lib, sparse_train_lib, sweep_lib, train_lib

CONTROLS = ("random_reinit", "random_mask")


def default_config(preset: str = "test") -> ml_collections.ConfigDict:
  """A small run: 3 rounds of the "test" preset finish in a few minutes on 2 CPU cores."""
  c = train_lib.default_config(preset)
  c.data.update(seq_len=64, batch_size=8)
  c.opt.update(lr=3e-3, warmup_steps=20)
  c.train.update(steps=150, log_every=50, eval_every=0, eval_batches=8)
  c.ckpt.update(every=50, keep=1)
  c.lottery = ml_collections.ConfigDict(dict(
      rounds=3,
      prune_fraction=0.2,  # of the remaining weights, per round
      rewind_step=0,  # 0: rewind to the init (original LTH); k: to the step-k weights
      scope="global",  # or "layerwise"
      rules="",  # ";"-separated REGEX=SPEC pruning rules (see sparsity.rules)
      random_reinit=True, random_mask=True,  # the controls
      control_seed=1))
  c.lock()
  return c


class CaptureState(NamedTuple):
  """The inner state, an update counter and the params captured at the rewind step."""

  inner: Any
  count: jax.Array
  captured: Any


@dataclasses.dataclass(frozen=True)
class Capture:
  """`tx -> tx` that stores the params seen at update `step` (the step-`step` weights)."""

  step: int

  def __call__(self, inner: optax.GradientTransformation) -> optax.GradientTransformation:
    inner = optax.with_extra_args_support(inner)

    def init(params):
      return CaptureState(inner.init(params), jnp.zeros([], jnp.int32),
                          jax.tree.map(jnp.array, params))

    def update(updates, state, params=None, **extra):
      captured = jax.lax.cond(state.count == self.step, lambda: params, lambda: state.captured)
      updates, inner_state = inner.update(updates, state.inner, params, **extra)
      return updates, CaptureState(inner_state, optax.safe_int32_increment(state.count),
                                   captured)

    return optax.GradientTransformationExtraArgs(init, update)


def validate(config) -> tuple:
  """Checks the lottery section (ValueError naming the field); returns the parsed rules."""
  lt, steps = config.lottery, config.train.steps
  checks = [
      ("rounds", lt.rounds, isinstance(lt.rounds, int) and lt.rounds >= 1, ">= 1"),
      ("prune_fraction", lt.prune_fraction, 0 < lt.prune_fraction < 1, "(0, 1)"),
      ("rewind_step", lt.rewind_step, 0 <= lt.rewind_step < steps,
       f"0 .. {steps - 1} (train.steps - 1)"),
      ("scope", lt.scope, lt.scope in sparsity.SCOPES, f"one of {sparsity.SCOPES}")]
  for name, value, ok, valid in checks:
    if not ok:
      raise ValueError(f"config.lottery.{name}={value!r}; valid: {valid}")
  try:
    return sparse_train_lib.parse_rules(lt.rules)
  except ValueError as e:
    raise ValueError(f"config.lottery.rules={lt.rules!r}: {e}") from None


def prune_round(params, prev_masks, density: float, *, scope: str, rules=()):
  """Masks at `density` of the prunable weights, pruning the smallest |w| of the survivors."""
  prev = {}
  if prev_masks is not None:
    mpaths, ms, _ = model.flatten(prev_masks, is_leaf=lambda x: x is None)
    prev = {p: m for p, m in zip(mpaths, ms, strict=True) if m is not None}

  def score(path, w, i):
    s = jnp.abs(w).astype(jnp.float32)
    return jnp.where(prev[path], s, -jnp.inf) if path in prev else s

  return sparsity.masks_from_scores(params, score, 1.0 - density, rules=rules, scope=scope)


def random_like(masks, key: jax.Array):
  """Uniformly random masks with each leaf's number of pruned entries (leaf i: fold_in(key, i))."""
  _, ms, treedef = model.flatten(masks, is_leaf=lambda x: x is None)
  out = []
  for i, m in enumerate(ms):
    if m is None:
      out.append(None)
      continue
    k = int(m.size - np.count_nonzero(np.asarray(m)))
    score = jax.random.uniform(jax.random.fold_in(key, i), m.shape)
    order = np.argsort(np.asarray(score).reshape(-1), kind="stable")
    keep = np.ones(m.size, bool)
    keep[order[:k]] = False
    out.append(jnp.asarray(keep.reshape(m.shape)))
  return jax.tree_util.tree_unflatten(treedef, out)


def _save_masks(path: str, masks) -> None:
  paths, ms, _ = model.flatten(masks, is_leaf=lambda x: x is None)
  tmp = path + ".tmp.npz"
  np.savez(tmp, **{p: np.asarray(m) for p, m in zip(paths, ms, strict=True) if m is not None})
  os.replace(tmp, path)


def load_masks(path: str, like):
  """The mask tree saved by a round (`like`: params of the model, for the structure)."""
  saved = np.load(path)
  paths, _, treedef = model.flatten(like)
  return jax.tree_util.tree_unflatten(
      treedef, [jnp.asarray(saved[p]) if p in saved.files else None for p in paths])


def _write_json(path: str, obj) -> None:
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    json.dump(obj, f, indent=2)
  os.replace(tmp, path)


def _train(config, workdir: str, init_params, masks=None, hooks=None) -> dict:
  hooks = hooks or train_lib.Hooks(wrap_optimizer=functools.partial(sparsity.masked, masks=masks))
  return train_lib.train_and_evaluate(config, workdir, init_params=init_params, hooks=hooks).summary


def _dense_round(config, rdir: str, model_cfg) -> dict:
  hooks = train_lib.Hooks(wrap_optimizer=Capture(config.lottery.rewind_step))
  init = model.init(model_cfg, jax.random.key(config.train.seed))
  run_dir = os.path.join(rdir, "dense")
  summary = _train(config, run_dir, init, hooks=hooks)
  opt_state = sparse_train_lib.restore_opt_state(config, run_dir, hooks, model_cfg)
  checkpoint_lib.save_params(os.path.join(rdir, "rewind"), opt_state.captured, model_cfg,
                             step=config.lottery.rewind_step, replace=True)
  return {"round": 0, "density": 1.0, "ticket_val_bpb": summary["val_bpb"]}


def _round(config, workdir: str, r: int, model_cfg, rules) -> dict:
  lt = config.lottery
  rdir, prev_dir = os.path.join(workdir, f"round_{r}"), os.path.join(workdir, f"round_{r - 1}")
  trained, _, _ = checkpoint_lib.load_params(os.path.join(prev_dir, "dense" if r == 1 else
                                                          "ticket"))
  prev = None if r == 1 else load_masks(os.path.join(prev_dir, "masks.npz"), trained)
  rewind, _, _ = checkpoint_lib.load_params(os.path.join(workdir, "round_0", "rewind"))
  density = (1.0 - lt.prune_fraction) ** r
  masks = prune_round(trained, prev, density, scope=lt.scope, rules=rules)
  _save_masks(os.path.join(rdir, "masks.npz"), masks)
  hooks = train_lib.Hooks(wrap_optimizer=functools.partial(sparsity.masked, masks=masks))
  rec = {"round": r, "density": 1.0 - sparsity.mask_sparsity(masks), "target_density": density}
  rec["ticket_val_bpb"] = _train(config, os.path.join(rdir, "ticket"),
                                 sparsity.apply_masks(rewind, masks), hooks=hooks)["val_bpb"]
  if lt.random_reinit:
    fresh = model.init(model_cfg, jax.random.key(lt.control_seed + r))
    rec["random_reinit_val_bpb"] = _train(
        config, os.path.join(rdir, "random_reinit"), sparsity.apply_masks(fresh, masks),
        hooks=hooks)["val_bpb"]
  if lt.random_mask:
    rmasks = random_like(masks, jax.random.key(lt.control_seed + 1000 + r))
    rec["random_mask_val_bpb"] = _train(config, os.path.join(rdir, "random_mask"),
                                        sparsity.apply_masks(rewind, rmasks), rmasks)["val_bpb"]
  return rec


def run(config, workdir: str) -> list[dict]:
  """Runs (or resumes) every round; returns the per-round records (also in results.jsonl)."""
  rules = validate(config)
  model_cfg = train_lib.validate_config(config, workdir)
  records = []
  for r in range(config.lottery.rounds + 1):
    rdir = os.path.join(workdir, f"round_{r}")
    done = os.path.join(rdir, "done.json")
    if os.path.exists(done):
      with open(done) as f:
        records.append(json.load(f))
      continue
    os.makedirs(rdir, exist_ok=True)
    rec = (_dense_round(config, rdir, model_cfg) if r == 0 else
           _round(config, workdir, r, model_cfg, rules))
    _write_json(done, rec)
    records.append(rec)
    tmp = os.path.join(workdir, "results.jsonl.tmp")
    with open(tmp, "w") as f:
      f.writelines(json.dumps(x) + "\n" for x in records)
    os.replace(tmp, os.path.join(workdir, "results.jsonl"))
  plot(records, os.path.join(workdir, "bpb_vs_density.png"))
  return records


def plot(records: list[dict], path: str) -> str:
  """Val bits/byte vs density of the ticket and its controls (dense as a reference line)."""
  rows = [dict(density=r["density"], bpb=r[f"{c}_val_bpb"], series=c)
          for c in ("ticket", *CONTROLS) for r in records[1:] if f"{c}_val_bpb" in r]
  if not rows:
    return ""
  return sweep_lib.plot(rows, x="density", y="bpb", series="series", path=path,
                        xscale="log", xlabel="density (kept fraction of prunable weights)",
                        ylabel="val bits/byte", title="Lottery tickets (IMP with rewinding)",
                        references={"dense": records[0]["ticket_val_bpb"]})


def format_records(records: list[dict]) -> str:
  """A table: round, density, val bits/byte of the ticket and the controls."""
  cols = ["ticket"] + [c for c in CONTROLS if any(f"{c}_val_bpb" in r for r in records)]
  lines = ["| round | density | " + " | ".join(f"{c} val bpb" for c in cols) + " |",
           "|---:|---:|" + "---:|" * len(cols)]
  for r in records:
    vals = [r.get(f"{c}_val_bpb") for c in cols]
    lines.append(f"| {r['round']} | {r['density']:.4f} | " + " | ".join(
        "-" if v is None else f"{v:.4f}" for v in vals) + " |")
  return "\n".join(lines)

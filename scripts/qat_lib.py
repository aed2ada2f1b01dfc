"""Quantization-aware training through the trainer's config: a `qat` section -> `Hooks`.

  recipe           weight fake quant (`quant.qat`, STE) of the kernels PTQ's `plan(params,
                   recipe, rules)` selects: "int4", "int4:g32", "int2", ... ("" : none)
  rules            ";"-separated REGEX=SPEC (SPEC a recipe or "none"), before the defaults
  first_last_bits  0 or 2/4/8: the first and last decoder blocks at this width ("mostly 4-bit")
  act_bits         0 or 2..8: the input of every selected Dense fake-quantized (signed,
                   per tensor) with the absmax over `calib_batches` train batches of the
                   initial model (fixed ranges: no EMA; they are re-derived identically on
                   resume and stored in summary.json)
  matryoshka_bits  "" or e.g. "8,4,2": MatQuant (`quant.matryoshka`); the loss is the
                   (`matryoshka_weights`-weighted) sum of the LM losses with the kernels
                   sliced to each width; replaces `recipe` for the weights
  init_from        a checkpoint to fine-tune (its model config is used)

The validation metrics are the fake-quant model's (per width for Matryoshka). At the
end `train_qat` exports the deployable QArray model: `workdir/quantized` (the PTQ of
the QAT weights with the same recipe and rules, which equals the fake-quant forward)
or `workdir/matryoshka_int{r}` per width; summary.json gains a `qat` entry with the
bit-ops of each (`quant.cost`).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

import model
from model.tree import is_weight_leaf
from quant import cost, matryoshka, qat
from quant import transform as qtransform
from scripts import checkpoint_lib, data_lib, eval_lib, train_lib


def default_config() -> ml_collections.ConfigDict:
  """The `qat` section's fields and defaults (weight-only int4 QAT from the fresh init)."""
  return ml_collections.ConfigDict(dict(
      recipe="int4", rules="", first_last_bits=0, act_bits=0, calib_batches=4,
      matryoshka_bits="", matryoshka_weights="", init_from=""))


def _fail(name: str, value, valid: str):
  raise ValueError(f"config.qat.{name}={value!r}; valid: {valid}")


def parse_rules(text: str) -> tuple:
  """'REGEX=SPEC;REGEX=SPEC' -> ((regex, spec or None), ...); SPEC "none" keeps float."""
  out = []
  for part in (text or "").split(";"):
    if not part.strip():
      continue
    regex, eq, spec = part.strip().partition("=")
    if not eq or not regex or not spec:
      _fail("rules", text, "';'-separated REGEX=SPEC with SPEC a recipe or 'none'")
    out.append((regex, None if spec.strip().lower() == "none" else spec.strip()))
  return tuple(out)


def _ints(name: str, text: str, cast=int) -> tuple:
  try:
    return tuple(cast(t) for t in str(text or "").split(",") if t.strip())
  except ValueError:
    _fail(name, text, "comma-separated numbers, e.g. '8,4,2'")


@dataclasses.dataclass(frozen=True)
class QATModel:
  """How the QAT model computes a forward (hashable: it is a jit static and the loss hook).

  weights: ((path, QuantSpec), ...) fake-quantized kernels (`quant.qat.qat_plan`).
  act_bits / act_ranges: Dense inputs fake-quantized at these calibrated absmaxes.
  matryoshka: ((bits, loss weight), ...); mat_paths: the sliced kernels.
  """

  weights: tuple = ()
  act_bits: int = 0
  act_paths: tuple = ()
  act_ranges: tuple = ()
  matryoshka: tuple = ()
  mat_paths: tuple = ()

  @property
  def widths(self) -> tuple:
    return tuple(b for b, _ in self.matryoshka) or (None,)

  def params_at(self, params, bits: int | None = None):
    """The weights the forward uses: fake-quantized by the recipe, or sliced to `bits`."""
    if self.matryoshka:
      return matryoshka.fake_quant_params(params, bits, self.mat_paths)
    return qat.fake_quant_params(params, self.weights) if self.weights else params

  def nll_sum(self, model_cfg, params, batch, bits: int | None = None):
    """(sum of NLL, targets) of the fake-quant model (activation quant while tracing)."""
    fq = self.params_at(params, bits)
    if not self.act_bits:
      return eval_lib.nll_sum(model_cfg, fq, batch)
    with nn.intercept_methods(qat.act_quant_interceptor(dict(self.act_ranges), self.act_bits)):
      return eval_lib.nll_sum(model_cfg, fq, batch)

  def __call__(self, model_cfg, params, batch):
    """The loss hook: the fake-quant LM loss (Matryoshka: the weighted sum over widths)."""
    total, metrics = 0.0, {}
    for bits, w in self.matryoshka or ((None, 1.0),):
      nll, count = self.nll_sum(model_cfg, params, batch, bits)
      loss = nll / jnp.maximum(count, 1.0)
      total = total + w * loss
      if bits is not None:
        metrics[f"bpb_int{bits}"] = loss / math.log(2)
    if not self.matryoshka:
      metrics["bpb"] = total / math.log(2)
    return total, metrics

  def evaluate(self, model_cfg, params, batches, put_batch=None) -> dict:
    """The eval hook: loss / bpb / ppl of the fake-quant model (per width for Matryoshka)."""
    parts = {b: [] for b in self.widths}
    for batch in batches:
      batch = put_batch(batch) if put_batch else jax.tree.map(jnp.asarray, batch)
      for b in self.widths:
        parts[b].append(_eval_step(self, model_cfg, params, batch, b))
    out = {}
    for b, ps in parts.items():
      got = jax.device_get(ps)
      r = eval_lib.summarize(sum(float(s) for s, _ in got), sum(float(c) for _, c in got))
      if b is None:
        out.update({k: r[k] for k in ("loss", "bpb", "ppl")})
      else:
        out.update({f"{k}_int{b}": r[k] for k in ("loss", "bpb")})
    if self.matryoshka:  # the headline: the narrowest width
      b = min(self.widths)
      out.update(loss=out[f"loss_int{b}"], bpb=out[f"bpb_int{b}"])
    return out


@functools.partial(jax.jit, static_argnums=(0, 1, 4))
def _eval_step(qm: QATModel, model_cfg, params, batch, bits):
  return qm.nll_sum(model_cfg, params, batch, bits)


def weight_rules(qc, n_layers: int) -> tuple:
  """The user rules, then the first / last block rules of `first_last_bits`."""
  rules = parse_rules(qc.rules)
  if qc.first_last_bits:
    rules += tuple(qat.first_last_rules(n_layers, f"int{qc.first_last_bits}"))
  return rules


def build(qc, model_cfg, params) -> QATModel:
  """Validates the section against `params` (abstract is fine); a QATModel without ranges."""
  if qc.act_bits != 0 and qc.act_bits not in qat.BITS:
    _fail("act_bits", qc.act_bits, f"0 (off) or one of {list(qat.BITS)}")
  if qc.first_last_bits not in (0, 2, 4, 8):
    _fail("first_last_bits", qc.first_last_bits, "0 (off), 2, 4 or 8")
  if not isinstance(qc.calib_batches, int) or qc.calib_batches < 1:
    _fail("calib_batches", qc.calib_batches, ">= 1")
  bits = _ints("matryoshka_bits", qc.matryoshka_bits)
  if any(b not in matryoshka.BITS for b in bits) or len(set(bits)) != len(bits):
    _fail("matryoshka_bits", qc.matryoshka_bits, f"distinct widths from {list(matryoshka.BITS)}")
  weights = _ints("matryoshka_weights", qc.matryoshka_weights, float) or (1.0,) * len(bits)
  if len(weights) != len(bits) or any(not 0 < w < math.inf for w in weights):
    _fail("matryoshka_weights", qc.matryoshka_weights,
          f"'' (all 1) or {len(bits)} finite weights > 0, one per matryoshka_bits entry")
  if bits and (qc.recipe or qc.first_last_bits):
    _fail("recipe" if qc.recipe else "first_last_bits", qc.recipe or qc.first_last_bits,
          "'' / 0 with matryoshka_bits (Matryoshka sets the weights' widths)")
  if qc.first_last_bits and not qc.recipe:
    _fail("first_last_bits", qc.first_last_bits, "0 without a recipe")
  leaves = jax.tree.leaves(params, is_leaf=is_weight_leaf)
  if any(is_weight_leaf(x) for x in leaves):
    raise ValueError("config.qat: QAT trains float params; the initial params hold "
                     "QArray / NMArray leaves (use a float checkpoint as init_from)")
  rules = weight_rules(qc, model_cfg.n_layers)
  try:
    if bits:
      mat_paths = matryoshka.matryoshka_plan(params, rules=rules)
      qm = QATModel(matryoshka=tuple(zip(bits, weights, strict=True)), mat_paths=mat_paths,
                    act_paths=mat_paths)
    elif qc.recipe:
      w = qat.qat_plan(params, qc.recipe, rules=rules)
      qm = QATModel(weights=w, act_paths=tuple(p for p, _ in w))
    else:
      paths, specs, _ = qtransform.plan(params, "int8", rules=rules)
      qm = QATModel(act_paths=tuple(p for p, s in zip(paths, specs, strict=True) if s))
  except ValueError as e:
    raise ValueError(f"config.qat (recipe={qc.recipe!r}, rules={qc.rules!r}): {e}") from None
  return dataclasses.replace(qm, act_bits=qc.act_bits)


def calibrate(qm: QATModel, model_cfg, params, data, n_batches: int) -> QATModel:
  """`qm` with activation ranges: the input absmax of the fake-quant-weight model (widest)."""
  if not qm.act_bits:
    return qm
  stream = data_lib.load_split(data, "train")
  batches = [b["tokens"] for b in data_lib.eval_batches(stream, data.batch_size, data.seq_len,
                                                        n_batches)]
  fq = qm.params_at(params, max(qm.widths) if qm.matryoshka else None)
  ranges = qat.act_ranges(model_cfg, fq, batches, qm.act_paths)
  return dataclasses.replace(qm, act_ranges=tuple(sorted(ranges.items())))


def export(qm: QATModel, qc, model_cfg, params) -> dict:
  """{name: deployable params}: "quantized" (PTQ of the QAT weights) or "matryoshka_int{r}"."""
  if qm.matryoshka:
    rules = weight_rules(qc, model_cfg.n_layers)
    return {f"matryoshka_int{b}": matryoshka.matryoshka_quantize(params, b, rules=rules)
            for b in qm.widths}
  if qm.weights:
    return {"quantized": qtransform.quantize(
        params, qc.recipe, rules=weight_rules(qc, model_cfg.n_layers))[0]}
  return {}


def train_qat(config, workdir: str) -> train_lib.TrainResult:
  """Trains with `config.qat` (resumable); exports the QArray model(s) next to the run."""
  qc = config.qat
  init_params, model_cfg = None, None
  if qc.init_from:
    init_params, model_cfg, _ = checkpoint_lib.load_params(qc.init_from)
  model_cfg = train_lib.validate_config(config, workdir, model_cfg)
  qm = build(qc, model_cfg, model.param_shapes(model_cfg) if init_params is None else init_params)
  if init_params is None:
    init_params = model.init(model_cfg, jax.random.key(config.train.seed))
  qm = calibrate(qm, model_cfg, init_params, config.data, qc.calib_batches)
  plain = not (qm.weights or qm.matryoshka or qm.act_bits)
  hooks = train_lib.Hooks() if plain else train_lib.Hooks(loss_fn=qm, eval_fn=qm.evaluate)
  result = train_lib.train_and_evaluate(config, workdir, init_params=init_params, hooks=hooks,
                                        model_cfg=model_cfg, meta={"qat": qc.to_dict()})
  act = qm.act_bits or None
  exported, ops = {}, {"float": cost.bit_ops(model_cfg, result.params)["total_bit_ops"]}
  for name, qparams in export(qm, qc, model_cfg, result.params).items():
    path = os.path.join(workdir, name)
    checkpoint_lib.save_params(path, qparams, model_cfg, step=config.train.steps,
                               meta={"qat": qc.to_dict()}, replace=True)
    exported[name] = path
    ops[name] = cost.bit_ops(model_cfg, qparams, act_bits=act)["total_bit_ops"]
  summary = dict(result.summary, qat=dict(
      config=qc.to_dict(), exported=exported, bit_ops_per_token=ops,
      act_ranges=dict(qm.act_ranges), n_fake_quant=len(qm.weights or qm.mat_paths)))
  with open(os.path.join(workdir, "summary.json"), "w") as f:
    json.dump(summary, f, indent=2)
  return train_lib.TrainResult(summary, result.params, model_cfg)


def finetune_config(source_workdir: str, *, recipe: str = "int4", steps: int = 200,
                    lr: float = 1e-3, warmup_steps: int = 10, **qat_kw
                    ) -> ml_collections.ConfigDict:
  """A QAT fine-tune of a float checkpoint: its data section, a short cosine schedule."""
  c = train_lib.default_config()
  c.data = eval_lib.data_config_for(source_workdir)
  c.qat = default_config()
  c.qat.update(recipe=recipe, init_from=source_workdir, **qat_kw)
  c.opt.update(lr=lr, warmup_steps=warmup_steps)
  c.train.update(steps=steps, eval_every=0)
  c.ckpt.update(every=max(steps // 2, 1), keep=2)
  c.lock()
  return c


def finetune(source_workdir: str, workdir: str, *, recipe: str = "int4", steps: int = 200,
             lr: float = 1e-3, test_batches: int = 16, **qat_kw) -> dict:
  """QAT fine-tunes `source_workdir` (resumable) and evaluates on the test split.

  qat_kw: other `qat` fields (act_bits, first_last_bits, matryoshka_bits, rules, ...);
  recipe="" and no matryoshka_bits is the float fine-tune baseline.
  Returns {"bpb": test bpb of the deployable model (Matryoshka: the narrowest width),
  "checkpoint": its folder, "fake_quant": test metrics of the QAT forward,
  "exported": {name: {"bpb", "checkpoint", "bit_ops_per_token"}}, "val_bpb", "seconds",
  "workdir"}.
  """
  if not isinstance(test_batches, int) or test_batches < 1:
    raise ValueError(f"test_batches={test_batches!r}; valid: an int >= 1")
  config = finetune_config(source_workdir, recipe=recipe, steps=steps, lr=lr, **qat_kw)
  t0 = time.perf_counter()
  result = train_qat(config, workdir)
  seconds = time.perf_counter() - t0
  s, data = result.summary["qat"], config.data
  test = lambda: data_lib.eval_batches(data_lib.load_split(data, "test"), data.batch_size,
                                       data.seq_len, test_batches)
  qm = build(config.qat, result.model_cfg, result.params)
  qm = dataclasses.replace(qm, act_ranges=tuple(sorted(s["act_ranges"].items())))
  fake = qm.evaluate(result.model_cfg, result.params, test())
  exported = {}
  for name, path in s["exported"].items():
    params, cfg, _ = checkpoint_lib.load_params(path)
    r = eval_lib.evaluate(cfg, params, test())
    exported[name] = dict(bpb=r["bpb"], checkpoint=path, bit_ops_per_token=s[
        "bit_ops_per_token"][name])
  if exported:
    name = min(exported, key=lambda n: int("".join(filter(str.isdigit, n)) or 99))
    head = exported[name]
    bpb, ckpt = (fake["bpb"] if qm.act_bits else head["bpb"]), head["checkpoint"]
  else:
    bpb, ckpt = fake["bpb"], os.path.abspath(workdir)
  return dict(bpb=bpb, checkpoint=ckpt, fake_quant=fake, exported=exported,
              val_bpb=result.summary.get("val_bpb"), seconds=seconds,
              bit_ops_per_token=s["bit_ops_per_token"], workdir=os.path.abspath(workdir),
              recipe=recipe, steps=steps, lr=lr, **qat_kw)


# The fine-tunes of `compare`: name -> (recipe, other qat fields).
COMPARE_RUNS = {
    "float_ft": ("", {}),
    "qat_int4": ("int4", {}),
    "matryoshka": ("", dict(matryoshka_bits="8,4,2")),
    "qat_int2": ("int2", {}),
    "minmax_int2": ("", dict(matryoshka_bits="2")),
    "qat_int4_a8": ("int4", dict(first_last_bits=8, act_bits=8)),
}
COMPARE_PTQ = ("int4", "int2", "int2:g32", "int2:asym")


def compare(source_workdir: str, runs_dir: str, output: str, *, steps: int = 150,
            lr: float = 1e-3, test_batches: int = 16, runs=tuple(COMPARE_RUNS)) -> dict:
  """The docs/qat.md table: PTQ of `source_workdir`, then each fine-tune of `runs`.

  Fine-tunes go to `runs_dir/qat_<name>` (resumable); `output` (JSON) is rewritten after
  every row, so an interrupted comparison keeps what it measured.
  """
  unknown = [r for r in runs if r not in COMPARE_RUNS]
  if unknown:
    raise ValueError(f"runs={unknown}; valid: {list(COMPARE_RUNS)}")
  params, cfg, _ = checkpoint_lib.load_params(source_workdir)
  data = eval_lib.data_config_for(source_workdir)
  test = lambda: data_lib.eval_batches(data_lib.load_split(data, "test"), data.batch_size,
                                       data.seq_len, test_batches)
  out = dict(source=os.path.abspath(source_workdir), steps=steps, lr=lr,
             test_batches=test_batches, rows={})

  def row(name, p, **extra):
    t0 = time.perf_counter()
    r = eval_lib.evaluate(cfg, p, test())
    out["rows"][name] = dict(bpb=r["bpb"], bit_ops_per_token=cost.bit_ops(
        cfg, p, act_bits=extra.pop("act_bits", None))["total_bit_ops"],
        eval_seconds=time.perf_counter() - t0, **extra)
    with open(output, "w") as f:
      json.dump(out, f, indent=2)

  row("float", params)
  for recipe in COMPARE_PTQ:
    row(f"ptq_{recipe}", qtransform.quantize(params, recipe)[0])
  for b in matryoshka.BITS:
    row(f"slice_int{b}", matryoshka.matryoshka_quantize(params, b))
  for name in runs:
    recipe, kw = COMPARE_RUNS[name]
    r = finetune(source_workdir, os.path.join(runs_dir, f"qat_{name}"), recipe=recipe,
                 steps=steps, lr=lr, test_batches=test_batches, **kw)
    base = dict(train_seconds=r["seconds"], workdir=r["workdir"], fake_quant_bpb=r[
        "fake_quant"]["bpb"])
    if not r["exported"]:
      out["rows"][name] = dict(base, bpb=r["bpb"], bit_ops_per_token=r["bit_ops_per_token"][
          "float"])
    for ename, e in r["exported"].items():
      label = name if len(r["exported"]) == 1 else f"{name}_{ename.split('_')[-1]}"
      out["rows"][label] = dict(base, bpb=r["bpb"] if kw.get("act_bits") else e["bpb"],
                                exported_bpb=e["bpb"], checkpoint=e["checkpoint"],
                                bit_ops_per_token=e["bit_ops_per_token"],
                                fake_quant_bpb=r["fake_quant"].get(
                                    f"bpb_{ename.split('_')[-1]}", r["fake_quant"]["bpb"]))
    with open(output, "w") as f:
      json.dump(out, f, indent=2)
  return out

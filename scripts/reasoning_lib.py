"""The "quantization hurts reasoning" protocol: accuracy by weight bits x task difficulty.

Liu et al. (2025) evaluate quantized reasoning models by accuracy per bit-width and
benchmark difficulty, with output length. Here the benchmark is `tasks_lib`'s
running sums (difficulty = number of terms, the scratchpad grows with it): a small
model is trained on a generated corpus (`WORKDIR/train`, resumes), every recipe in
`config.recipes` quantizes its params (`quant.quantize`; GPTQ / AWQ calibrate on
windows of the training corpus), and each quantized model greedily decodes the same
held-out problems (`config.task.eval_seed`, not the corpus seed) until a newline.
Per (recipe, difficulty): accuracy of the answer after ';', exact match of the whole
scratchpad, mean output length in bytes, the decode `Cost`, and the model's bytes.
One record per recipe in WORKDIR/results.jsonl (`sweep_lib.run_grid`: a rerun
evaluates only new recipes); decoded texts in WORKDIR/outputs/<recipe>.jsonl.
"""

from __future__ import annotations

import copy
import json
import os
import re
import shutil
import time

import jax
import ml_collections
import numpy as np

import decoding
import model
import quant
from model import transformer
from model.calibration import Calibration
from scripts import checkpoint_lib, cli_lib, data_lib, sweep_lib, tasks_lib, train_lib
from scripts.sweep_lib import plt

FLOAT = "float"
KEY_FIELDS = ("recipe",)
NAME = "quant_reasoning"
# The settings that change every record's numbers: a resumed run must match them.
RESUME_FIELDS = ("train_config", "task", "eval", "calib_seqs")


def default_config(smoke: bool = False) -> ml_collections.ConfigDict:
  """The protocol's config; `smoke`: the test preset, a few steps, 2 difficulties, 2 recipes."""
  c = ml_collections.ConfigDict()
  tc = train_lib.default_config("test" if smoke else "tiny")
  tc.data.update(corpus="files", path="", seq_len=64 if smoke else 128,
                 batch_size=4 if smoke else 16)
  tc.train.update(steps=4 if smoke else 500, eval_every=0, eval_batches=2 if smoke else 8,
                  log_every=2 if smoke else 50)
  tc.opt.update(lr=3e-3, warmup_steps=2 if smoke else 50, weight_decay=0.0)
  tc.ckpt.update(every=4 if smoke else 500, keep=1)
  c.train_config = tc  # data.path is set to WORKDIR/corpus by `run`
  c.task = ml_collections.ConfigDict(dict(
      train_seed=0, eval_seed=1,  # problems are functions of (seed, difficulty, index)
      n_train=400 if smoke else 60_000,  # corpus lines, difficulties in turn
      difficulties=(1, 3) if smoke else (1, 2, 3, 4, 5, 6, 7),
      per_doc=4 if smoke else 16))  # corpus lines per document
  c.eval = ml_collections.ConfigDict(dict(
      n_per_difficulty=4 if smoke else 64,
      max_new_tokens=0))  # 0: the longest target + 16
  c.recipes = (FLOAT, "int4") if smoke else (
      FLOAT, "int8", "w8a8", "fp8", "int4:g32", "int4:g32:gptq", "nf4:g32", "int4",
      "int2:g32")
  c.calib_seqs = 8 if smoke else 32  # GPTQ / AWQ windows of data.seq_len bytes
  return c


_int = cli_lib.check_int


def max_new_tokens(config) -> int:
  """The decode budget: config.eval.max_new_tokens, or the longest target + 16."""
  n = config.eval.max_new_tokens
  ds = tasks_lib.check_difficulties(config.task.difficulties, "config.task.difficulties")
  return n or tasks_lib.target_len(max(ds)) + 16


def _abstract_params(cfg: model.ModelConfig):
  return jax.eval_shape(transformer.abstract_init_fn(cfg), jax.random.key(0))


def validate(config) -> tuple[list[str], model.ModelConfig]:
  """Checks the config (recipes against the model's shapes too) without computing anything.

  Returns (canonical recipe names, float first, the ModelConfig).
  """
  t = config.task
  tasks_lib.check_difficulties(t.difficulties, "config.task.difficulties")
  for name in ("train_seed", "eval_seed"):
    _int(t[name], f"config.task.{name}", 0)
  if t.train_seed == t.eval_seed:
    raise ValueError(f"config.task.eval_seed={t.eval_seed} must differ from train_seed "
                     f"(held-out problems come from another seed)")
  _int(t.n_train, "config.task.n_train", 1)
  _int(t.per_doc, "config.task.per_doc", 1)
  _int(config.eval.n_per_difficulty, "config.eval.n_per_difficulty", 1)
  _int(config.eval.max_new_tokens, "config.eval.max_new_tokens (0: automatic)", 0)
  _int(config.calib_seqs, "config.calib_seqs", 1)
  cfg = train_lib.model_config(config.train_config.model)
  longest = 1 + 2 * max(t.difficulties) + max_new_tokens(config)
  if longest > cfg.max_seq_len:
    raise ValueError(f"config.eval.max_new_tokens={max_new_tokens(config)}: a prompt of "
                     f"difficulty {max(t.difficulties)} plus the budget is {longest} tokens, "
                     f"over the model's max_seq_len={cfg.max_seq_len}")
  if not config.recipes or isinstance(config.recipes, str):
    raise ValueError(f"config.recipes={config.recipes!r} must be a non-empty sequence of "
                     f"'{FLOAT}' and quant recipes (e.g. 'int8', 'int4:g32:gptq')")
  names, abstract = [], None
  for r in config.recipes:
    if r == FLOAT:
      names.append(FLOAT)
      continue
    try:
      spec = quant.parse_recipe(r)
      abstract = abstract if abstract is not None else _abstract_params(cfg)
      quant.abstract_quantize(abstract, spec)  # formats the kernels cannot take fail here
    except ValueError as e:
      raise ValueError(f"config.recipes: {r!r}: {e} (valid: '{FLOAT}' or a recipe of "
                       f"FORMAT in {sorted(quant.FORMATS)} or 'w8a8', see quant.recipes)"
                       ) from None
    names.append(spec.name)
  dupes = sorted({n for n in names if names.count(n) > 1})
  if dupes:
    raise ValueError(f"config.recipes={tuple(config.recipes)!r} repeats {dupes}")
  return sorted(names, key=lambda n: n != FLOAT), cfg


def score(problems, texts) -> dict:
  """Accuracy, exact match and mean output length (bytes of the first line) of outputs."""
  if len(problems) != len(texts) or not problems:
    raise ValueError(f"score: {len(problems)} problems and {len(texts)} texts; need equal, > 0")
  correct = [tasks_lib.is_correct(p, t) for p, t in zip(problems, texts, strict=True)]
  exact = [tasks_lib.is_exact(p, t) for p, t in zip(problems, texts, strict=True)]
  return dict(n=len(problems), accuracy=float(np.mean(correct)), exact=float(np.mean(exact)),
              mean_len=float(np.mean([tasks_lib.output_length(t) for t in texts])),
              target_len=float(np.mean([tasks_lib.output_length(p.target) for p in problems])))


def decode(params, cfg: model.ModelConfig, problems, n_new: int):
  """Greedy outputs of `problems` (one batch, stop at a newline or EOS): (texts, output)."""
  tok = model.ByteTokenizer()
  out = decoding.generate(params, [tasks_lib.prompt_tokens(p) for p in problems],
                          model.Decoder(cfg), max_new_tokens=n_new, eos_id=tok.eos_id,
                          stop_sequences=[tok.encode(tasks_lib.END)], pad_id=tok.pad_id)
  tokens, lengths = np.asarray(out.tokens), np.asarray(out.lengths)
  return [tok.decode(tokens[i, :lengths[i]]) for i in range(len(problems))], out


def eval_problems(config) -> dict[int, list[tasks_lib.Problem]]:
  """The held-out problems per difficulty (config.task.eval_seed)."""
  n = config.eval.n_per_difficulty
  return {d: tasks_lib.problems(config.task.eval_seed, d, n) for d in config.task.difficulties}


def _safe(recipe: str) -> str:
  return re.sub(r"[^A-Za-z0-9._-]", "_", recipe)


def _evaluator(config, params, cfg, workdir: str):
  data = config.train_config.data
  held_out = eval_problems(config)
  n_new = max_new_tokens(config)
  float_bits = np.dtype(cfg.param_dtype).itemsize * 8
  calib = []  # built on first use: only data-aware recipes read it

  def evaluate(point: dict) -> dict:
    t0 = time.perf_counter()
    recipe, qparams = point["recipe"], params
    bits, act_bits, qreport = float_bits, None, None
    if recipe != FLOAT:
      spec = quant.parse_recipe(recipe)
      if spec.method != "rtn" and not calib:
        calib.append(Calibration(cfg, data_lib.calibration_batches(
            data, config.calib_seqs, data.seq_len, seed=config.task.train_seed)))
      qparams, qreport = quant.quantize(params, recipe,
                                        calib=calib[0] if spec.method != "rtn" else None)
      bits, act_bits = spec.bits, spec.act_bits
    by_d, lines = [], []
    for d, probs in held_out.items():
      texts, out = decode(qparams, cfg, probs, n_new)
      c = out.cost
      reasons = np.asarray(out.finish_reason)
      by_d.append(dict(difficulty=d, **score(probs, texts),
                       truncated=float(np.mean(reasons == decoding.Finish.MAX_TOKENS)),
                       tokens=c.tokens, forward_passes=c.forward_passes, flops=c.flops,
                       bytes_moved=c.bytes_moved, wall_s=c.wall_time_s))
      lines += [dict(difficulty=d, prompt=p.prompt, output=t, answer=p.answer,
                     correct=tasks_lib.is_correct(p, t)) for p, t in zip(probs, texts,
                                                                         strict=True)]
    os.makedirs(os.path.join(workdir, "outputs"), exist_ok=True)
    with open(os.path.join(workdir, "outputs", _safe(recipe) + ".jsonl"), "w") as f:
      f.writelines(json.dumps(r) + "\n" for r in lines)
    return dict(bits=bits, act_bits=act_bits, model_bytes=model.tree_nbytes(qparams),
                mean_rel_fro_err=qreport["mean_rel_fro_err"] if qreport else 0.0,
                by_difficulty=by_d, seconds=time.perf_counter() - t0)

  return evaluate


def _settings(config) -> dict:
  return json.loads(json.dumps({
      "train_config": config.train_config.to_dict(), "task": config.task.to_dict(),
      "eval": config.eval.to_dict(), "calib_seqs": config.calib_seqs,
      "recipes": list(config.recipes)}))


def _check_resume(workdir: str, settings: dict) -> None:
  checkpoint_lib.check_resume(workdir, settings, RESUME_FIELDS, "config.recipes")


def _corpus(config, folder: str) -> None:
  """Writes the training corpus once (into a temporary folder, renamed when complete)."""
  if os.path.isdir(folder):
    return
  tmp = folder + ".tmp"
  shutil.rmtree(tmp, ignore_errors=True)
  t = config.task
  tasks_lib.write_corpus(tmp, t.train_seed, t.n_train, t.difficulties, per_doc=t.per_doc)
  os.replace(tmp, folder)


def train(config, workdir: str) -> tuple[dict, model.ModelConfig, bool]:
  """(float params, ModelConfig, whether any step ran) of the run in WORKDIR/train."""
  run_dir = os.path.join(workdir, "train")
  summary = os.path.join(run_dir, "summary.json")  # written once the last step is saved
  done = os.path.exists(summary) and checkpoint_lib.has_checkpoint(run_dir)
  if done:
    with open(summary) as f:
      done = json.load(f)["step"] == config.train_config.train.steps
  if not done:
    train_lib.train_and_evaluate(config.train_config, run_dir)
  params, cfg, _ = checkpoint_lib.load_params(run_dir)
  return params, cfg, not done


def run(config, workdir: str) -> dict:
  """Trains (or resumes), evaluates every recipe not yet in WORKDIR/results.jsonl, reports.

  Returns {"rows", "table", "files", "evaluated" (recipes decoded now), "trained"}.
  """
  recipes, _ = validate(config)
  workdir = checkpoint_lib.check_writable_dir(workdir, "--workdir")
  config = copy.deepcopy(config)
  with config.unlocked():
    config.train_config.data.path = os.path.join(workdir, "corpus")
  settings = _settings(config)
  _check_resume(workdir, settings)
  os.makedirs(workdir, exist_ok=True)
  _corpus(config, config.train_config.data.path)
  train_lib.validate_config(config.train_config, os.path.join(workdir, "train"))
  with open(os.path.join(workdir, "config.json"), "w") as f:
    json.dump(settings, f, indent=2)
  params, cfg, trained = train(config, workdir)
  calls = []
  evaluate = _evaluator(config, params, cfg, workdir)
  counted = lambda point: calls.append(point) or evaluate(point)
  records = sweep_lib.run_grid([dict(recipe=r) for r in recipes], counted,
                               os.path.join(workdir, "results.jsonl"), key_fields=KEY_FIELDS)
  rep = report(records, config, workdir)
  return dict(rows=rep["rows"], table=rep["table"], files=rep["files"], evaluated=len(calls),
              trained=trained)


def flatten_records(records) -> list[dict]:
  """One row per (recipe, difficulty), with the accuracy change vs float where float ran."""
  base = next((r for r in records if r["recipe"] == FLOAT), None)
  base_acc = {b["difficulty"]: b["accuracy"] for b in base["by_difficulty"]} if base else {}
  rows = []
  for r in records:
    for b in r["by_difficulty"]:
      d = b["difficulty"]
      rows.append(dict(recipe=r["recipe"], bits=r["bits"], act_bits=r["act_bits"],
                       model_bytes=r["model_bytes"], **b,
                       accuracy_delta=b["accuracy"] - base_acc[d] if d in base_acc else None))
  return rows


def _pivot(records, difficulties, field: str, fmt: str, extra=()) -> str:
  cols = ["recipe", *extra, *(f"d={d}" for d in difficulties), "mean"]
  table = []
  for r in records:
    vals = {b["difficulty"]: b[field] for b in r["by_difficulty"]}
    row = {"recipe": r["recipe"], "mean": float(np.mean(list(vals.values())))}
    row.update({f"d={d}": vals[d] for d in difficulties})
    row.update({k: r[k] for k in extra})
    table.append(row)
  formats = {c: fmt for c in cols if c.startswith("d=") or c == "mean"}
  return sweep_lib.markdown_table(table, cols, formats=formats)


def report(records, config, workdir: str) -> dict:
  """WORKDIR/quant_reasoning.{md,json,png}; returns {"rows", "table", "files"}."""
  ds = list(config.task.difficulties)
  rows = flatten_records(records)
  train_probs = tasks_lib.corpus_problems(config.task.train_seed, config.task.n_train, ds)
  overlap = {d: tasks_lib.overlap(p, train_probs) for d, p in eval_problems(config).items()}
  tc = config.train_config
  summary = [dict(recipe=r["recipe"], bits=r["bits"], model_bytes=r["model_bytes"],
                  accuracy=float(np.mean([b["accuracy"] for b in r["by_difficulty"]])),
                  tokens=sum(b["tokens"] for b in r["by_difficulty"]),
                  gflops=sum(b["flops"] for b in r["by_difficulty"]) / 1e9,
                  mb_moved=sum(b["bytes_moved"] for b in r["by_difficulty"]) / 1e6)
             for r in records]
  target = {"recipe": "(target)", "by_difficulty": [
      dict(difficulty=b["difficulty"], mean_len=b["target_len"])
      for b in records[0]["by_difficulty"]]}
  n = config.eval.n_per_difficulty
  md = "\n".join([
      "# Quantization and reasoning: accuracy by weight bits x task difficulty", "",
      f"Task: running sums of d digits with a scratchpad (`scripts/tasks_lib.py`), e.g. "
      f"`3+5+2=` -> `3,8,10;10`. Model: `{tc.model.preset}` preset trained "
      f"{tc.train.steps} steps (batch {tc.data.batch_size} x {tc.data.seq_len} bytes) on "
      f"{config.task.n_train} problems (seed {config.task.train_seed}); evaluated greedily on "
      f"{n} held-out problems per difficulty (seed {config.task.eval_seed}). Share of "
      "held-out prompts that also occur in the training corpus: "
      + ", ".join(f"d={d}: {v:.0%}" for d, v in overlap.items()) + f". With {n} problems "
      f"per cell an accuracy's standard error is up to {0.5 / np.sqrt(n):.3f}. Recipes "
      "quantize every kernel but the embedding / LM head (`quant.quantize`); bits are the "
      "weight bits (w8a8 also quantizes activations per token to int8).", "",
      "## Answer accuracy (the number after `;`)", "",
      _pivot(records, ds, "accuracy", ".3f", extra=("bits",)),
      "## Exact match (the whole scratchpad)", "", _pivot(records, ds, "exact", ".3f"),
      "## Mean output length (bytes of the first line)", "",
      _pivot([*records, target], ds, "mean_len", ".1f"),
      "## Size and decode cost (all difficulties)", "",
      "Tokens generated, and `decoding.Cost` estimates of FLOPs and bytes moved (weights as "
      "stored plus KV-cache reads), summed over the difficulties.", "",
      sweep_lib.markdown_table(summary, ("recipe", "bits", "model_bytes", "accuracy", "tokens",
                                         "gflops", "mb_moved"),
                               formats={"accuracy": ".3f", "gflops": ".2f",
                                        "mb_moved": ".1f"}), ""])
  files = {k: os.path.join(workdir, f"{NAME}.{k}") for k in ("md", "json", "png")}
  with open(files["md"], "w") as f:
    f.write(md)
  with open(files["json"], "w") as f:
    json.dump({"settings": _settings(config), "overlap": overlap, "summary": summary,
               "rows": rows}, f, indent=1)
  _plot(records, ds, files["png"], title=f"{tc.model.preset}, {tc.train.steps} steps, {n} "
                                         "problems per difficulty")
  return dict(rows=rows, table=md, files=list(files.values()))


def _plot(records, difficulties, path: str, title: str) -> str:
  fig, (ax_acc, ax_len) = plt.subplots(1, 2, figsize=(12, 4.5), dpi=120)
  colors = plt.get_cmap("tab10").colors
  for i, r in enumerate(records):
    b = sorted(r["by_difficulty"], key=lambda b: b["difficulty"])
    style = dict(color=colors[i % 10], marker="os^Dv"[i // 10 % 5], label=r["recipe"],
                 linestyle="-" if r["recipe"] == FLOAT else "--")
    ax_acc.plot([x["difficulty"] for x in b], [x["accuracy"] for x in b], **style)
    ax_len.plot([x["difficulty"] for x in b], [x["mean_len"] for x in b], **style)
  b = sorted(records[0]["by_difficulty"], key=lambda b: b["difficulty"])
  ax_len.plot([x["difficulty"] for x in b], [x["target_len"] for x in b], color="black",
              linestyle=":", label="target")
  ax_acc.set(xlabel="difficulty (terms)", ylabel="answer accuracy", ylim=(-0.03, 1.03),
             title="Accuracy")
  ax_len.set(xlabel="difficulty (terms)", ylabel="mean output bytes", title="Output length")
  for ax in (ax_acc, ax_len):
    ax.set_xticks(difficulties)
    ax.grid(True, alpha=0.3)
  ax_len.legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.01, 1.0))
  fig.suptitle(title)
  fig.tight_layout()
  fig.savefig(path)
  plt.close(fig)
  return path

"""Long-context retrieval: train a small model on passkey / key-value problems, then score it.

`run(config, workdir)` writes a corpus of `decoding.tasks.retrieval` problems
(WORKDIR/corpus, one file per problem: [BOS] + prompt + answer + newline, all
`document_len` tokens, so with `data.seq_len` equal to it every training row is one
whole problem), trains with `train_lib.train_and_evaluate` in WORKDIR/train
(checkpoints, resume, metrics.jsonl, progress) under `AnswerLoss` (the answer's
next-token loss, plus `task.prompt_loss_weight` x the prompt's), then greedily
decodes held-out problems (`task.eval_seed`) with `evaluate` and writes
WORKDIR/retrieval.json and WORKDIR/outputs.jsonl. Optional curriculum stages
(`task.curriculum`) train first on shorter problems, in WORKDIR/stage_<len>.

Measured on 2 shared CPU cores (2-layer d_model=128 model, batch 16, lr 3e-3, 20 warmup
steps): passkey at context 512 reaches 98.5% held-out accuracy after 300 steps (165 s of
training). At 1024, 300 steps from scratch reach only 8.5% (527 s), while
`task.curriculum=((512, 300),)` then 200 steps at 1024 reach 100% (165 s + 367 s).
What did not train in that budget (answer loss at chance after 250-400
steps): passkeys in random digit order (an induction copy over a variable distance),
also with a curriculum from short contexts (which learns position, not content), a
"#" marker before the key, repeated random filler sentences as copy practice, lr 1e-2,
8 heads, rope_theta 1e6; kv_retrieval (4-character keys) needs the same induction copy.

`evaluate(params, cfg, problems, step_fn=...)` and `bits_per_byte(params, cfg, texts,
step_fn=...)` take any `model.Decoder`-like step_fn (a sparse-attention or evicting
decoder), so a sweep can score attention policies on the same checkpoint.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import json
import math
import os
import shutil
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

import decoding
import model
from decoding.tasks import retrieval
from model import transformer
from scripts import checkpoint_lib, cli_lib, data_lib, train_lib

DEPTH_BINS = 5
# The settings a resumed run must match (the corpus and the trained model depend on them).
RESUME_FIELDS = ("train_config", "task")


def _round_up(n: int, m: int) -> int:
  return -(-n // m) * m


def default_config(task: str = "passkey", context_len: int = 512, *,
                   smoke: bool = False) -> ml_collections.ConfigDict:
  """A run's config: `train_config` (a `train_lib` config), `task`, `eval`.

  The model is the `tiny` preset cut to 2 layers (d_model 128, 4 heads / 2 kv) with
  max_seq_len = context_len + 64 rounded up to 64; `smoke`: a few steps, few problems.
  """
  retrieval.check_task(task)
  doc = retrieval.document_len(task, context_len)
  c = ml_collections.ConfigDict()
  tc = train_lib.default_config("tiny")
  tc.model.update(n_layers=2, max_seq_len=_round_up(context_len + 64, 64))
  tc.data.update(corpus="files", path="", seq_len=doc, batch_size=4 if smoke else 16)
  tc.train.update(steps=4 if smoke else 300, eval_every=0, eval_batches=2 if smoke else 4,
                  log_every=2 if smoke else 25)
  tc.opt.update(lr=3e-3, warmup_steps=2 if smoke else 20, weight_decay=0.0)
  tc.ckpt.update(every=4 if smoke else 100, keep=1)
  c.train_config = tc  # data.path is set to WORKDIR/corpus by `run`
  c.task = ml_collections.ConfigDict(dict(
      name=task, context_len=context_len,
      n_pairs=0,  # kv only: pairs per prompt; 0: as many as fit
      train_seed=0, eval_seed=1,
      n_train=64 if smoke else 8000,  # corpus problems per context length (one file each)
      # (context_len, steps) stages trained before the final one, each starting from the
      # previous one's params, e.g. ((128, 100), (256, 100)); () (default): none
      curriculum=(),
      prompt_loss_weight=0.1))  # loss = answer NLL + this x prompt NLL (per-token means)
  c.eval = ml_collections.ConfigDict(dict(
      n=8 if smoke else 200,  # held-out problems
      max_new_tokens=0,  # 0: the answer length + 2
      batch_size=8 if smoke else 50,
      bpb_texts=4 if smoke else 16))  # held-out documents for bits/byte
  return c


def _problem_kw(task) -> dict:
  return {"n_pairs": task.n_pairs or None} if task.name == "kv" else {}


def validate(config) -> model.ModelConfig:
  """Checks the config without computing anything; returns the ModelConfig."""
  t, e = config.task, config.eval
  retrieval.check_task(t.name)
  n = retrieval.check_context_len(t.context_len, "config.task.context_len")
  if t.name == "kv" and t.n_pairs:
    retrieval.kv_retrieval(t.train_seed, n, 0, t.n_pairs)  # raises on a bad n_pairs
  for name, lo in (("train_seed", 0), ("eval_seed", 0), ("n_train", 1), ("n_pairs", 0)):
    _int(t[name], f"config.task.{name}", lo)
  if t.train_seed == t.eval_seed:
    raise ValueError(f"config.task.eval_seed={t.eval_seed} must differ from train_seed "
                     "(held-out problems come from another seed)")
  if not (isinstance(t.prompt_loss_weight, (int, float)) and t.prompt_loss_weight >= 0):
    raise ValueError(f"config.task.prompt_loss_weight={t.prompt_loss_weight!r} must be >= 0")
  if isinstance(t.curriculum, (str, bytes)) or not all(
      isinstance(st, (tuple, list)) and len(st) == 2 for st in t.curriculum):
    raise ValueError(f"config.task.curriculum={t.curriculum!r} must be (context_len, steps) "
                     "pairs, e.g. ((128, 100), (256, 100)); () for none")
  for i, (c, k) in enumerate(t.curriculum):
    retrieval.check_context_len(c, f"config.task.curriculum[{i}] context_len")
    if c > n:
      raise ValueError(f"config.task.curriculum[{i}] context_len={c} exceeds "
                       f"config.task.context_len={n}")
    _int(k, f"config.task.curriculum[{i}] steps", 1)
  for name, lo in (("n", 1), ("max_new_tokens", 0), ("batch_size", 1), ("bpb_texts", 0)):
    _int(e[name], f"config.eval.{name}", lo)
  cfg = train_lib.model_config(config.train_config.model)
  doc = retrieval.document_len(t.name, n)
  if config.train_config.data.seq_len != doc:
    raise ValueError(f"config.train_config.data.seq_len={config.train_config.data.seq_len} "
                     f"must equal the document length {doc} (BOS + {n} prompt bytes + answer "
                     "+ newline), so that every training row is one whole problem")
  need = 1 + n + max_new_tokens(config) - 1
  if need > cfg.max_seq_len:
    raise ValueError(f"config.train_config.model.max_seq_len={cfg.max_seq_len} is below the "
                     f"{need} tokens a prompt of {n} bytes plus the decode budget needs")
  return cfg


_int = cli_lib.check_int


def max_new_tokens(config) -> int:
  """The decode budget: config.eval.max_new_tokens, or the answer length + 2."""
  return config.eval.max_new_tokens or retrieval.answer_len(config.task.name) + 2


def document(problem: retrieval.Problem) -> str:
  """A training document's text (BOS is added by the data pipeline): prompt + answer + "\\n"."""
  return problem.prompt + problem.target


def write_corpus(folder: str, task: str, seed: int, context_len: int, n: int, **kw) -> list[str]:
  """`n` problems of `task` under `seed`, one file each (a `data.corpus="files"` folder)."""
  os.makedirs(folder, exist_ok=True)
  paths = []
  for i, p in enumerate(retrieval.problems(task, seed, context_len, n, **kw)):
    path = os.path.join(folder, f"p{i:07d}.txt")
    with open(path, "w") as f:
      f.write(document(p))
    paths.append(path)
  return paths


@dataclasses.dataclass(frozen=True)
class AnswerLoss:
  """`Hooks.loss_fn`: mean answer NLL + prompt_weight x mean prompt NLL (value-hashable).

  A target is an answer byte (or its newline) when its position within the document
  exceeds `context_len` (position 0 is BOS, the prompt fills 1..context_len).
  """

  context_len: int
  prompt_weight: float = 0.0

  def __call__(self, model_cfg, params, batch):
    tokens_BL, pos_BL = batch["tokens"], batch["positions"]
    logits_BLV, _ = transformer.apply(model_cfg, params, tokens_BL, positions=pos_BL,
                                      segment_ids=batch["segment_ids"])
    nll_BT = optax.softmax_cross_entropy_with_integer_labels(logits_BLV[:, :-1],
                                                             tokens_BL[:, 1:])
    valid_BT = data_lib.target_mask(batch["segment_ids"])
    ans_BT = valid_BT & (pos_BL[:, 1:] > self.context_len)
    prm_BT = valid_BT & ~ans_BT
    mean = lambda m: jnp.sum(nll_BT * m) / jnp.maximum(jnp.sum(m), 1)
    answer, prompt = mean(ans_BT), mean(prm_BT)
    return answer + self.prompt_weight * prompt, {"answer_nll": answer,
                                                   "prompt_bpb": prompt / math.log(2)}


def eval_problems(config) -> list[retrieval.Problem]:
  t = config.task
  return retrieval.problems(t.name, t.eval_seed, t.context_len, config.eval.n, **_problem_kw(t))


def evaluate(params, cfg: model.ModelConfig, problems, *, step_fn=None,
             max_new_tokens: int | None = None, batch_size: int = 64) -> dict:
  """Greedy retrieval accuracy of `problems` decoded by `step_fn` (default `Decoder(cfg)`).

  Batches of `batch_size` (the last one padded with repeats, so one shape compiles);
  decoding stops at a newline or EOS. Returns {"n", "accuracy", "correct", "texts",
  "by_depth" (accuracy per fifth of the context the needle starts in; None where empty),
  "tokens", "flops", "bytes_moved", "seconds"}.
  """
  if not problems:
    raise ValueError("problems is empty; pass at least one retrieval.Problem")
  step_fn = model.Decoder(cfg) if step_fn is None else step_fn
  n_new = max_new_tokens or max(retrieval.answer_len(p.task) for p in problems) + 2
  batch_size = _int(batch_size, "batch_size", 1)
  tok = model.ByteTokenizer()
  t0 = time.perf_counter()
  texts, tokens, flops, moved = [], 0, 0.0, 0.0
  for i in range(0, len(problems), batch_size):
    chunk = list(problems[i:i + batch_size])
    real = len(chunk)
    chunk += [chunk[-1]] * (min(batch_size, len(problems)) - real)
    out = decoding.generate(params, [retrieval.prompt_tokens(p, tok) for p in chunk], step_fn,
                            max_new_tokens=n_new, eos_id=tok.eos_id,
                            stop_sequences=[tok.encode(retrieval.END)], pad_id=tok.pad_id)
    ids, lengths = np.asarray(out.tokens), np.asarray(out.lengths)
    texts += [tok.decode(ids[r, :lengths[r]]) for r in range(real)]
    tokens += int(lengths[:real].sum())
    flops += out.cost.flops * real / len(chunk)
    moved += out.cost.bytes_moved * real / len(chunk)
  correct = [retrieval.is_correct(p, t) for p, t in zip(problems, texts, strict=True)]
  bins = [min(int(p.depth * DEPTH_BINS), DEPTH_BINS - 1) for p in problems]
  by_depth = [float(np.mean([c for c, b in zip(correct, bins, strict=True) if b == k]))
              if k in bins else None for k in range(DEPTH_BINS)]
  return dict(n=len(problems), accuracy=float(np.mean(correct)), correct=correct, texts=texts,
              by_depth=by_depth, tokens=tokens, flops=flops, bytes_moved=moved,
              seconds=time.perf_counter() - t0)


@functools.partial(jax.jit, static_argnums=0, donate_argnums=3)
def _nll_chunk(step_fn, params, tokens_BC, cache, targets_BC):
  logits_BCV, cache = step_fn(params, tokens_BC, cache)
  nll_BC = optax.softmax_cross_entropy_with_integer_labels(
      logits_BCV.astype(jnp.float32), jnp.maximum(targets_BC, 0))
  mask_BC = targets_BC >= 0
  return jnp.sum(nll_BC * mask_BC), jnp.sum(mask_BC), cache


def bits_per_byte(params, cfg: model.ModelConfig, texts, *, step_fn=None,
                  chunk: int | None = None, batch_size: int = 8) -> dict:
  """Bits per byte of `texts` ([BOS] + UTF-8 bytes each) through `step_fn`'s cached forward.

  Each batch is fed into a fresh `step_fn.init_cache` in pieces of `chunk` tokens
  (None: the whole text in one prefill; 1: token by token, as decoding sees it), so a
  sparse-attention or evicting step_fn is scored as it would decode. Returns
  {"bpb", "nll" (nats per byte), "bytes", "seconds"}.
  """
  if isinstance(texts, str) or not texts:
    raise ValueError("texts must be a non-empty list of strings")
  step_fn = model.Decoder(cfg) if step_fn is None else step_fn
  batch_size = _int(batch_size, "batch_size", 1)
  tok = model.ByteTokenizer()
  t0 = time.perf_counter()
  total, count = 0.0, 0.0
  for i in range(0, len(texts), batch_size):
    rows = [tok.encode(t, add_bos=True) for t in texts[i:i + batch_size]]
    rows += [[tok.bos_id]] * (batch_size - len(rows))  # no targets: only keeps the shape
    width = max(len(r) for r in rows)
    if width > step_fn.max_seq_len:
      raise ValueError(f"texts[{i}:{i + batch_size}]: {width - 1} bytes + BOS exceed the "
                       f"model's max_seq_len={step_fn.max_seq_len}")
    ids = np.full((batch_size, width), tok.pad_id, np.int32)
    targets = np.full((batch_size, width), -1, np.int32)
    for r, row in enumerate(rows):
      ids[r, :len(row)] = row
      targets[r, :len(row) - 1] = row[1:]
    c = width if chunk is None else _int(chunk, "chunk", 1)
    cache = step_fn.init_cache(batch_size, width)
    for s in range(0, width, c):
      nll, n, cache = _nll_chunk(step_fn, params, jnp.asarray(ids[:, s:s + c]), cache,
                                 jnp.asarray(targets[:, s:s + c]))
      total, count = total + float(nll), count + float(n)
  nats = total / max(count, 1.0)
  return dict(bpb=nats / math.log(2), nll=nats, bytes=int(count),
              seconds=time.perf_counter() - t0)


def _settings(config) -> dict:
  return json.loads(json.dumps({"train_config": config.train_config.to_dict(),
                                "task": config.task.to_dict(), "eval": config.eval.to_dict()}))


def _check_resume(workdir: str, settings: dict) -> None:
  checkpoint_lib.check_resume(workdir, settings, RESUME_FIELDS, "config.eval")


def _corpus(config, folder: str, context_len: int) -> None:
  """Writes a training corpus once (into a temporary folder, renamed when complete)."""
  if os.path.isdir(folder):
    return
  tmp = folder + ".tmp"
  shutil.rmtree(tmp, ignore_errors=True)
  t = config.task
  kw = _problem_kw(t) if context_len == t.context_len else {}
  write_corpus(tmp, t.name, t.train_seed, context_len, t.n_train, **kw)
  os.replace(tmp, folder)


def stage_config(config, context_len: int, steps: int, corpus: str):
  """The train_config of a curriculum stage: `steps` steps on `context_len` problems."""
  tc = copy.deepcopy(config.train_config)
  with tc.unlocked():
    tc.data.update(path=corpus, seq_len=retrieval.document_len(config.task.name, context_len))
    tc.train.steps = steps
    tc.ckpt.every = min(tc.ckpt.every, steps)
    tc.opt.warmup_steps = min(tc.opt.warmup_steps, steps // 2)
  return tc


def _stages(config, workdir: str) -> list[tuple[int, int, str, str]]:
  """(context_len, steps, corpus folder, run folder) per stage, the final one last."""
  t = config.task
  out = [(int(n), int(k), os.path.join(workdir, f"corpus_{n}"), os.path.join(workdir, f"stage_{n}"))
         for n, k in t.curriculum]
  return out + [(t.context_len, config.train_config.train.steps, config.train_config.data.path,
                 os.path.join(workdir, "train"))]


def _done(run_dir: str, steps: int) -> bool:
  path = os.path.join(run_dir, "summary.json")
  if not (os.path.exists(path) and checkpoint_lib.has_checkpoint(run_dir)):
    return False
  with open(path) as f:
    return json.load(f)["step"] == steps


def train(config, workdir: str) -> tuple[dict, model.ModelConfig, dict]:
  """(params, ModelConfig, {"trained", "train_seconds", "summary"}) of WORKDIR/train.

  Curriculum stages (`task.curriculum`: (context_len, steps) pairs) train first, each in
  WORKDIR/stage_<context_len> on its own corpus and starting from the previous stage's
  params; the final stage (task.context_len, train.steps) trains in WORKDIR/train. Every
  stage resumes; a finished one is skipped.
  """
  t0, trained = time.perf_counter(), False
  stages = _stages(config, workdir)
  for i, (n, steps, corpus, run_dir) in enumerate(stages):
    if _done(run_dir, steps):
      continue
    init = None
    if i and not checkpoint_lib.has_checkpoint(run_dir):
      init = checkpoint_lib.load_params(stages[i - 1][3])[0]
    _corpus(config, corpus, n)
    hooks = train_lib.Hooks(loss_fn=AnswerLoss(n, float(config.task.prompt_loss_weight)))
    train_lib.train_and_evaluate(stage_config(config, n, steps, corpus), run_dir, hooks=hooks,
                                 init_params=init)
    trained = True
  seconds = time.perf_counter() - t0
  run_dir = os.path.join(workdir, "train")
  with open(os.path.join(run_dir, "summary.json")) as f:
    summary = json.load(f)
  params, cfg, _ = checkpoint_lib.load_params(run_dir)
  return params, cfg, dict(trained=trained, train_seconds=seconds, summary=summary)


def run(config, workdir: str) -> dict:
  """Writes the corpus, trains (or resumes), evaluates; returns WORKDIR/retrieval.json's dict."""
  validate(config)
  workdir = checkpoint_lib.check_writable_dir(workdir, "--workdir")
  config = copy.deepcopy(config)
  with config.unlocked():
    config.train_config.data.path = os.path.join(workdir, "corpus")
  settings = _settings(config)
  _check_resume(workdir, settings)
  os.makedirs(workdir, exist_ok=True)
  _corpus(config, config.train_config.data.path, config.task.context_len)
  train_lib.validate_config(config.train_config, os.path.join(workdir, "train"))
  with open(os.path.join(workdir, "config.json"), "w") as f:
    json.dump(settings, f, indent=2)
  params, cfg, info = train(config, workdir)
  probs = eval_problems(config)
  res = evaluate(params, cfg, probs, max_new_tokens=max_new_tokens(config),
                 batch_size=config.eval.batch_size)
  bpb = None
  if config.eval.bpb_texts:
    bpb = bits_per_byte(params, cfg, [document(p) for p in probs[:config.eval.bpb_texts]],
                        batch_size=min(8, config.eval.bpb_texts))["bpb"]
  t, tc = config.task, config.train_config
  out = dict(task=t.name, context_len=t.context_len, n_pairs=probs[0].n_pairs,
             steps=tc.train.steps, batch_size=tc.data.batch_size, trained=info["trained"],
             train_seconds=info["train_seconds"], val_bpb=info["summary"].get("val_bpb"),
             accuracy=res["accuracy"], n=res["n"], by_depth=res["by_depth"],
             eval_seconds=res["seconds"], heldout_bpb=bpb, params=info["summary"]["params"],
             workdir=workdir)
  with open(os.path.join(workdir, "outputs.jsonl"), "w") as f:
    f.writelines(json.dumps(dict(index=p.index, depth=p.depth, answer=p.answer, output=x,
                                 correct=c)) + "\n"
                 for p, x, c in zip(probs, res["texts"], res["correct"], strict=True))
  with open(os.path.join(workdir, "retrieval.json"), "w") as f:
    json.dump(out, f, indent=2)
  return out


def format_result(r: dict) -> str:
  """One line: task, accuracy, training time, where the run is."""
  depth = " ".join("-" if a is None else f"{a:.2f}" for a in r["by_depth"])
  return (f"{r['task']} context {r['context_len']}: accuracy {r['accuracy']:.3f} on {r['n']} "
          f"held-out problems (by depth fifth: {depth}), {r['steps']} steps x batch "
          f"{r['batch_size']}" + (f", trained in {r['train_seconds']:.0f}s" if r["trained"]
                                  else " (already trained)")
          + f"; outputs in {r['workdir']}")

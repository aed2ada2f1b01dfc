"""A small sparq policy per search task, trained to be partially competent at the default.

Test-time search (best-of-n, beam, particle methods in `decoding.search`) only matters
where a policy sometimes solves a problem: `run(config, workdir)` trains one so that
pass@1 (one sample per problem at temperature 1.0) at the task's default difficulty
lands in the 20-70% regime.

`run` writes a corpus of `decoding.tasks` problems (WORKDIR/corpus: `write_corpus`,
documents of `task.per_doc` lines, each line prompt + reference solution, the
difficulties of `task.difficulties` in turn), trains the `tiny` preset on it with
`train_lib.train_and_evaluate` in WORKDIR/train (checkpoints, resume, metrics.jsonl),
then scores `eval.n` held-out problems (`task.eval_seed`) at `eval.difficulty` with
`evaluate`: pass@1 at `eval.temperature` and greedy accuracy (also at each of
`eval.also`, in policy.json's "also"). It writes
WORKDIR/policy.json (returned) and WORKDIR/outputs.jsonl (per problem: prompt,
first sample, greedy output). A rerun of a finished run does not train again.

The loss (`task.loss="solution"`, `SolutionLoss`) is the next-token NLL of solution
bytes only: a byte counts when the last prompt-ending byte ("=" / ":", `prompt_end`)
before it comes after the last END, so packed rows that start mid-line are handled;
the prompts (uniformly random operands) are conditioned on, not modelled. With
`task.loss="all"` it is `train_lib.nll_loss` on every byte, as `tasks_lib` /
`reasoning_lib`; on arithmetic both gave the same pass@1 at 1200 steps (0.235 vs 0.23).
policy.json's val_bpb is every byte's (prompts included). Competence is tuned by the
number of steps (undertraining) and the training difficulty mix (`TUNED`).

Load a trained policy for search:
  params, cfg, _ = checkpoint_lib.load_params("runs/policy/arithmetic/train")
  policy = core.Policy(params, model.Decoder(cfg), ARITHMETIC, temperature=1.0)
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import os
import shutil
import time
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

import decoding
import model
from decoding.sampling import Sampler
from decoding.search import core
from decoding.tasks import base
from decoding.tasks.arithmetic import ARITHMETIC
from decoding.tasks.countdown import COUNTDOWN
from model import transformer
from scripts import checkpoint_lib, cli_lib, data_lib, train_lib

TASKS: dict[str, base.Task] = {"arithmetic": ARITHMETIC, "countdown": COUNTDOWN}
# The settings a resumed run must match (the corpus and the trained model depend on them).
RESUME_FIELDS = ("train_config", "task")
# Per task: (training steps, training difficulty mix), the measured settings (see
# scripts/configs/train/policy.py for the numbers they give), and the difficulties
# scored besides the default (`eval.also`).
TUNED = {
    "arithmetic": (2000, ((1, 1), (1, 2), (1, 3), (2, 1), (2, 2), (2, 3), (2, 4))),
    "countdown": (2000, ((3, 25), (4, 25))),
}
ALSO = {"arithmetic": ((2, 2), (2, 4)), "countdown": ((3, 25),)}
VIA = ("generate", "policy")
LOSSES = ("solution", "all")


def get_task(name: str) -> base.Task:
  """The task registered as `name`, or a ValueError listing the valid names."""
  if not isinstance(name, str) or name not in TASKS:
    raise ValueError(f"task={name!r} is not a policy task; valid: {sorted(TASKS)}")
  return TASKS[name]


def prompt_end(task: base.Task) -> str:
  """The byte that ends every prompt of `task` (and occurs nowhere else in a prompt).

  Arithmetic prompts end with "=", countdown prompts with ":"; a ValueError if a
  sample of the task's prompts does not agree on one such byte.
  """
  prompts = [task.problem(0, i, d).prompt for i in range(8)
             for d in {task.default_difficulty, tuple(lo for lo, _ in task.ranges)}]
  end = prompts[0][-1]
  if any(p[-1] != end or end in p[:-1] or base.END in p for p in prompts):
    raise ValueError(f"task {task.name!r}: prompts do not all end with one byte that occurs "
                     "nowhere else in them; use config.task.loss='all'")
  return end


@dataclasses.dataclass(frozen=True)
class SolutionLoss:
  """`Hooks.loss_fn`: the mean next-token NLL of solution bytes only (value-hashable).

  A packed row holds many lines (prompt, solution, END); a target byte is a solution
  byte (END included) iff the last `prompt_end` byte at or before its context position
  comes after the last END / document start there. A row starting mid-line counts
  nothing until its first marker. Metrics: "solution_nll", and "bpb" of every byte.
  """

  prompt_end: int  # the token id ending every prompt

  def __call__(self, model_cfg, params, batch):
    tokens_BL, seg_BL = batch["tokens"], batch["segment_ids"]
    logits_BLV, _ = transformer.apply(model_cfg, params, tokens_BL, positions=batch["positions"],
                                      segment_ids=seg_BL)
    nll_BT = optax.softmax_cross_entropy_with_integer_labels(logits_BLV[:, :-1],
                                                             tokens_BL[:, 1:])
    valid_BT = data_lib.target_mask(seg_BL)
    idx_BL = jnp.broadcast_to(jnp.arange(tokens_BL.shape[1]), tokens_BL.shape)
    start_BL = jnp.concatenate([jnp.ones_like(seg_BL[:, :1], bool),
                                seg_BL[:, 1:] != seg_BL[:, :-1]], axis=1)
    last = lambda m: jax.lax.cummax(jnp.where(m, idx_BL, -1), axis=1)
    opened_BL = last(tokens_BL == self.prompt_end) > last((tokens_BL == ord(base.END)) | start_BL)
    sol_BT = valid_BT & opened_BL[:, :-1]
    mean = lambda m: jnp.sum(nll_BT * m) / jnp.maximum(jnp.sum(m), 1)
    loss = mean(sol_BT)
    return loss, {"solution_nll": loss, "bpb": mean(valid_BT) / math.log(2)}


def hooks(config) -> train_lib.Hooks:
  """The training hooks of `config.task.loss`: "solution" (`SolutionLoss`) or "all"
  (`train_lib.nll_loss` on every byte)."""
  if config.task.loss == "all":
    return train_lib.Hooks()
  return train_lib.Hooks(loss_fn=SolutionLoss(ord(prompt_end(get_task(config.task.name)))))


def default_config(task: str = "arithmetic", smoke: bool = False) -> ml_collections.ConfigDict:
  """A run's config: `train_config` (a `train_lib` config), `task`, `eval`.

  The model is the `tiny` preset (4 layers, d_model 128); rows of 128 bytes, batch 16,
  lr 3e-3. `smoke`: a few steps on a small corpus, a few eval problems.
  """
  t = get_task(task)
  steps, mix = TUNED[task]
  c = ml_collections.ConfigDict()
  tc = train_lib.default_config("tiny")
  tc.data.update(corpus="files", path="", seq_len=128, batch_size=4 if smoke else 16)
  tc.train.update(steps=4 if smoke else steps, eval_every=0, eval_batches=2 if smoke else 8,
                  log_every=2 if smoke else 50)
  tc.opt.update(lr=3e-3, warmup_steps=2 if smoke else 50, weight_decay=0.0)
  tc.ckpt.update(every=4 if smoke else 200, keep=1)
  c.train_config = tc  # data.path is set to WORKDIR/corpus by `run`
  c.task = ml_collections.ConfigDict(dict(
      name=task, train_seed=0, eval_seed=1,  # problems are functions of (seed, index, difficulty)
      n_train=400 if smoke else 40_000,  # corpus lines, difficulties in turn
      difficulties=tuple(tuple(d) for d in mix),  # the training mix
      per_doc=4 if smoke else 16,  # corpus lines per document (file)
      loss="solution"))  # "solution": NLL of solution bytes only; "all": of every byte
  c.eval = ml_collections.ConfigDict(dict(
      difficulty=tuple(t.default_difficulty),
      also=() if smoke else ALSO[task],  # more difficulties to score (policy.json "also")
      n=8 if smoke else 200,  # held-out problems
      samples=1,  # independent samples per problem (pass@1 is their mean correctness)
      temperature=1.0, key=0,
      batch_size=8 if smoke else 100))  # rows (problems x samples) per generate call
  return c


_int = cli_lib.check_int


def validate(config) -> model.ModelConfig:
  """Checks the config without computing anything; returns the ModelConfig."""
  t, e = config.task, config.eval
  task = get_task(t.name)
  ds = t.difficulties
  if isinstance(ds, (str, bytes)) or not isinstance(ds, Sequence) or not ds:
    raise ValueError(f"config.task.difficulties={ds!r} must be a non-empty sequence of "
                     f"{task.name} difficulties ({', '.join(task.knobs)})")
  for d in ds:
    task.check_difficulty(d)
  task.check_difficulty(e.difficulty)
  if isinstance(e.also, (str, bytes)) or not isinstance(e.also, Sequence):
    raise ValueError(f"config.eval.also={e.also!r} must be a sequence of difficulties")
  for d in e.also:
    task.check_difficulty(d)
  if t.loss not in LOSSES:
    raise ValueError(f"config.task.loss={t.loss!r} must be one of {LOSSES}")
  if t.loss == "solution":
    prompt_end(task)
  for name, lo in (("train_seed", 0), ("eval_seed", 0), ("n_train", 1), ("per_doc", 1)):
    _int(t[name], f"config.task.{name}", lo)
  if t.train_seed == t.eval_seed:
    raise ValueError(f"config.task.eval_seed={t.eval_seed} must differ from train_seed "
                     "(held-out problems come from another seed)")
  for name, lo in (("n", 1), ("samples", 1), ("key", 0), ("batch_size", 1)):
    _int(e[name], f"config.eval.{name}", lo)
  if not (isinstance(e.temperature, (int, float)) and 0 <= e.temperature < float("inf")):
    raise ValueError(f"config.eval.temperature={e.temperature!r} must be a finite float >= 0 "
                     "(0: greedy)")
  cfg = train_lib.model_config(config.train_config.model)
  need = 1 + len(task.problem(t.eval_seed, 0, e.difficulty).prompt) + 2 * task.max_target_len(
      e.difficulty)
  if need > cfg.max_seq_len:
    raise ValueError(f"config.train_config.model.max_seq_len={cfg.max_seq_len} is below the "
                     f"~{need} tokens a prompt plus the decode budget needs")
  return cfg


def corpus_lines(task: base.Task, seed: int, n: int, difficulties: Sequence) -> list[str]:
  """`n` training lines (prompt + target), difficulties in turn as `Task.corpus_text`."""
  ds = [task.check_difficulty(d) for d in difficulties]
  if not ds:
    raise ValueError("difficulties is empty; give at least one")
  _int(n, "n", 1)
  return [(p.prompt + p.target) for p in (
      task.problem(seed, i // len(ds), ds[i % len(ds)]) for i in range(n))]


def write_corpus(folder: str, task: base.Task | str, seed: int, n: int, difficulties: Sequence,
                 per_doc: int = 16) -> list[str]:
  """`corpus_lines` as files of `per_doc` lines in `folder` (a `data.corpus="files"` path).

  Each file is one document ([BOS] + its lines), so training sees problems both right
  after BOS (as `Task.prompt_tokens` asks them) and after a newline. Returns the paths.
  """
  task = get_task(task) if isinstance(task, str) else task
  per_doc = _int(per_doc, "per_doc", 1)
  lines = corpus_lines(task, seed, n, difficulties)
  return data_lib.write_documents(folder, lines, per_doc)


def eval_problems(config) -> list[base.Problem]:
  t, e = config.task, config.eval
  return get_task(t.name).problems(t.eval_seed, e.n, e.difficulty)


def row_key(key, problem_index: int, sample: int) -> jax.Array:
  """The key of sample `sample` of problem `problem_index`: what
  `Policy.bind(p)(root(samples), fold(key, problem_index))` gives that row."""
  return core.fold(core.fold(key, problem_index), sample)


def evaluate(params, cfg: model.ModelConfig, task: base.Task, problems: Sequence[base.Problem],
             *, temperature: float = 1.0, key=0, samples: int = 1, batch_size: int = 100,
             via: str = "generate", max_len: int | None = None) -> dict:
  """pass@1 of `problems`: the mean correctness of `samples` samples per problem.

  Sample j of problem i uses `row_key(key, i, j)`; temperature 0 is greedy (then the
  samples agree). A sample ends at END ('\\n') or after `max_len` tokens (default twice
  the task's longest reference, as `core.Policy`), then counts as wrong. via="generate":
  one `decoding.generate` call per `batch_size` rows (the last batch padded with
  repeats, so one shape compiles); via="policy": `core.Policy(...).bind(p)` and
  `propose(core.root(samples), fold(key, i), until="end")` per problem (the search
  methods' proposer; slower). Returns {"pass_at_1", "n", "samples", "correct" (per
  problem: the fraction of its samples correct), "texts" (per problem, its samples),
  "tokens", "seconds"}.
  """
  if not problems:
    raise ValueError("problems is empty; pass at least one Problem")
  if via not in VIA:
    raise ValueError(f"via={via!r} must be one of {VIA}")
  samples, batch_size = _int(samples, "samples", 1), _int(batch_size, "batch_size", 1)
  decoder = model.Decoder(cfg)
  t0 = time.perf_counter()
  limit = lambda p: max_len or 2 * task.max_target_len(p.difficulty)
  texts: list[list[str]] = []
  if via == "policy":
    pol = core.Policy(params, decoder, task, temperature=temperature, max_len=max_len)
    for i, p in enumerate(problems):
      out, _ = pol.bind(p)(core.root(samples), core.fold(key, i), until="end")
      texts.append([s.text for s in out])
  else:
    tok = model.ByteTokenizer()
    rows = [(i, j) for i in range(len(problems)) for j in range(samples)]
    flat = []
    width = min(batch_size, len(rows))
    m = max(limit(p) for p in problems)
    for s in range(0, len(rows), width):
      chunk = rows[s:s + width]
      real = len(chunk)
      chunk += [chunk[-1]] * (width - real)
      keys = jnp.stack([row_key(key, i, j) for i, j in chunk])
      sampler = Sampler.create(width, temperature=temperature) if temperature > 0 else None
      out = decoding.generate(params, [task.prompt_tokens(problems[i]) for i, _ in chunk],
                              decoder, sampler=sampler, max_new_tokens=m, key=keys,
                              eos_id=ord(base.END), pad_id=tok.pad_id)
      ids, lengths = np.asarray(out.tokens), np.asarray(out.lengths)
      for r in range(real):
        p = problems[chunk[r][0]]
        flat.append(tok.decode(ids[r, :min(int(lengths[r]), limit(p))]))
    texts = [flat[i * samples:(i + 1) * samples] for i in range(len(problems))]
  correct = [float(np.mean([task.is_correct(p, x) for x in xs]))
             for p, xs in zip(problems, texts, strict=True)]
  tokens = sum(len(x.encode("utf-8")) for xs in texts for x in xs)
  return dict(pass_at_1=float(np.mean(correct)), n=len(problems), samples=samples,
              correct=correct, texts=texts, tokens=tokens, seconds=time.perf_counter() - t0)


def _settings(config) -> dict:
  return json.loads(json.dumps({"train_config": config.train_config.to_dict(),
                                "task": config.task.to_dict(), "eval": config.eval.to_dict()}))


def _corpus(config) -> None:
  """Writes the training corpus once (into a temporary folder, renamed when complete)."""
  folder = config.train_config.data.path
  if os.path.isdir(folder):
    return
  tmp = folder + ".tmp"
  shutil.rmtree(tmp, ignore_errors=True)
  t = config.task
  write_corpus(tmp, t.name, t.train_seed, t.n_train, t.difficulties, t.per_doc)
  os.replace(tmp, folder)


def _done(run_dir: str, steps: int) -> bool:
  path = os.path.join(run_dir, "summary.json")
  if not (os.path.exists(path) and checkpoint_lib.has_checkpoint(run_dir)):
    return False
  with open(path) as f:
    return json.load(f)["step"] == steps


def train(config, workdir: str) -> tuple[dict, model.ModelConfig, dict]:
  """(params, ModelConfig, {"trained", "train_seconds", "summary"}) of WORKDIR/train.

  Resumes an interrupted run; a finished one is loaded, not trained again (then
  train_seconds is the earlier run's, from WORKDIR/train/train_seconds.json).
  """
  run_dir = os.path.join(workdir, "train")
  timing = os.path.join(run_dir, "train_seconds.json")
  steps = config.train_config.train.steps
  trained = not _done(run_dir, steps)
  if trained:
    t0 = time.perf_counter()
    before = 0.0
    if os.path.exists(timing):  # an interrupted run's earlier time
      with open(timing) as f:
        before = json.load(f)["seconds"]
    train_lib.train_and_evaluate(config.train_config, run_dir, hooks=hooks(config))
    with open(timing, "w") as f:
      json.dump({"seconds": before + time.perf_counter() - t0}, f)
  seconds = None
  if os.path.exists(timing):
    with open(timing) as f:
      seconds = json.load(f)["seconds"]
  with open(os.path.join(run_dir, "summary.json")) as f:
    summary = json.load(f)
  params, cfg, _ = checkpoint_lib.load_params(run_dir)
  return params, cfg, dict(trained=trained, train_seconds=seconds, summary=summary)


def run(config, workdir: str) -> dict:
  """Writes the corpus, trains (or resumes), evaluates; returns WORKDIR/policy.json's dict."""
  validate(config)
  workdir = checkpoint_lib.check_writable_dir(workdir, "--workdir")
  config = copy.deepcopy(config)
  with config.unlocked():
    config.train_config.data.path = os.path.join(workdir, "corpus")
  settings = _settings(config)
  checkpoint_lib.check_resume(workdir, settings, RESUME_FIELDS, "config.eval")
  os.makedirs(workdir, exist_ok=True)
  _corpus(config)
  train_lib.validate_config(config.train_config, os.path.join(workdir, "train"))
  with open(os.path.join(workdir, "config.json"), "w") as f:
    json.dump(settings, f, indent=2)
  params, cfg, info = train(config, workdir)
  t, e = config.task, config.eval
  task = get_task(t.name)
  probs = eval_problems(config)
  sampled = evaluate(params, cfg, task, probs, temperature=e.temperature, key=e.key,
                     samples=e.samples, batch_size=e.batch_size)
  greedy = evaluate(params, cfg, task, probs, temperature=0.0, batch_size=e.batch_size)
  also = []
  for d in e.also:
    ps = task.problems(t.eval_seed, e.n, d)
    also.append(dict(difficulty=list(task.check_difficulty(d)), pass_at_1=evaluate(
        params, cfg, task, ps, temperature=e.temperature, key=e.key, samples=e.samples,
        batch_size=e.batch_size)["pass_at_1"], greedy_accuracy=evaluate(
            params, cfg, task, ps, temperature=0.0, batch_size=e.batch_size)["pass_at_1"]))
  tc = config.train_config
  out = dict(task=t.name, difficulty=list(task.check_difficulty(e.difficulty)),
             pass_at_1=sampled["pass_at_1"], greedy_accuracy=greedy["pass_at_1"],
             temperature=e.temperature, samples=e.samples, n=sampled["n"],
             steps=tc.train.steps, batch_size=tc.data.batch_size, trained=info["trained"],
             train_seconds=info["train_seconds"],
             eval_seconds=sampled["seconds"] + greedy["seconds"],
             also=also, val_bpb=info["summary"].get("val_bpb"),
             params=info["summary"]["params"],
             checkpoint=os.path.join(workdir, "train"), workdir=workdir)
  with open(os.path.join(workdir, "outputs.jsonl"), "w") as f:
    f.writelines(json.dumps(dict(prompt=p.prompt, answer=p.answer, samples=xs, correct=c,
                                 greedy=g[0], greedy_correct=gc)) + "\n"
                 for p, xs, c, g, gc in zip(probs, sampled["texts"], sampled["correct"],
                                            greedy["texts"], greedy["correct"], strict=True))
  with open(os.path.join(workdir, "policy.json"), "w") as f:
    json.dump(out, f, indent=2)
  return out


def format_result(r: dict) -> str:
  """One line: task, pass@1, greedy accuracy, training, where the checkpoint is."""
  d = ",".join(str(x) for x in r["difficulty"])
  trained = (f"trained in {r['train_seconds']:.0f}s" if r["trained"] and r["train_seconds"]
             else "already trained")
  return (f"{r['task']} ({d}): pass@1 {r['pass_at_1']:.3f} at temperature {r['temperature']} "
          f"({r['samples']} sample(s) x {r['n']} held-out problems), greedy accuracy "
          f"{r['greedy_accuracy']:.3f}"
          + "".join(f"; ({','.join(map(str, a['difficulty']))}): pass@1 {a['pass_at_1']:.3f} "
                    f"greedy {a['greedy_accuracy']:.3f}" for a in r.get("also", ()))
          + f"; {r['steps']} steps x batch {r['batch_size']}, {trained}; "
          f"checkpoint {r['checkpoint']}")

"""Test-time search at equal cost: methods x budgets on a task split, with a trained policy.

`run(config, workdir)`:
1. trains (or reuses) the task's policy with `policy_lib` in WORKDIR/policy, or loads
   `config.policy_dir`;
2. builds the reward model from `config.reward`: "oracle", "noisy:fp=..:fn=..[:sharpness=
   ..:bias=..]" or "learned" (a value head on the policy's hidden states, fitted on
   oracle-labelled policy samples of `config.learned.seed` problems, WORKDIR/value_head.npz);
3. draws `config.coverage_n` samples per problem (repeated sampling) for pass@k, the
   coverage-law fit and the vote curves;
4. runs every method spec of `config.methods` ("name[:opt=value...]") at every budget
   of `config.budgets` (tree methods up to `config.tree_max_budget`) over the same
   `config.split` problems, each problem with the same key for every method, so
   sampling methods see identical draws; one record per (method, budget) in
   WORKDIR/results.jsonl (`sweep_lib.run_grid`: a rerun evaluates only new points);
5. fits a compute-optimal allocation on `config.compute_optimal.fit_*` problems
   (difficulty from probe samples, per-bin best candidate) and evaluates it;
6. writes WORKDIR/search.{json,md} and PNG curves of accuracy vs generated tokens,
   forward passes and reward calls, plus the coverage plot, and the claims' verdicts.
"""

from __future__ import annotations

import json
import os
import time

import jax
import ml_collections
import numpy as np

import decoding.search as search
import model
from decoding.search import compute_optimal_lib as co
from decoding.search import core, passk, reward
from decoding.tasks import base
from scripts import checkpoint_lib, cli_lib, policy_lib, sweep_lib

KEY_FIELDS = ("method", "budget")
REWARDS = ("oracle", "noisy", "learned")


def default_config(task: str = "arithmetic", smoke: bool = False) -> ml_collections.ConfigDict:
  """The sweep's config; `smoke`: a test-sized run (a few problems, budgets 1-4)."""
  c = ml_collections.ConfigDict()
  c.policy = policy_lib.default_config(task, smoke)
  c.policy_dir = ""  # an existing policy_lib workdir to reuse instead of WORKDIR/policy
  c.split = ml_collections.ConfigDict(dict(seed=2, n=6 if smoke else 64, difficulty=()))
  c.temperature = 1.0
  c.reward = "noisy:fp=0.2:fn=0.2"
  c.learned = ml_collections.ConfigDict(dict(seed=4, n=8 if smoke else 160, samples=4 if smoke
                                             else 8, steps=100 if smoke else 600))
  c.methods = ("majority_vote", "rpc", "weighted_vote", "best_of_n", "best_of_n:aggregate=min",
               "weighted_best_of_n", "beam_search", "dvts", "particle_filtering") if smoke else (
      "majority_vote", "rpc", "weighted_vote", "best_of_n", "best_of_n:aggregate=min",
      "best_of_n:aggregate=prod", "weighted_best_of_n", "first_finish",
      "first_finish:m=3", "beam_search", "dvts", "lookahead", "particle_filtering",
      "particle_filtering:resampling=systematic", "particle_filtering:anneal=0.5", "astar")
  c.budgets = (1, 2, 4) if smoke else (1, 2, 4, 8, 16, 32, 64)
  c.tree_max_budget = 4 if smoke else 16  # step-level methods stop here (they cost most)
  c.coverage_n = 8 if smoke else 64
  c.compute_optimal = ml_collections.ConfigDict(dict(
      budgets=(4,) if smoke else (8, 16), fit_seed=3, fit_n=6 if smoke else 64, probe=2,
      bins=2 if smoke else 3,
      candidates=("majority_vote", "best_of_n", "beam_search") if smoke else (
          "majority_vote", "best_of_n", "weighted_vote", "beam_search", "particle_filtering")))
  c.key = 0
  return c


def parse_value(text: str):
  for cast in (int, float):
    try:
      return cast(text)
    except ValueError:
      pass
  return {"none": None, "true": True, "false": False}.get(text.lower(), text)


def parse_spec(spec: str, kind: str = "method") -> tuple[str, dict]:
  """"name:opt=value:..." -> (name, {opt: value}); values are int, float, bool or str."""
  if not isinstance(spec, str) or not spec:
    raise ValueError(f"{kind} spec {spec!r} must be a non-empty string 'name[:opt=value...]'")
  name, *opts = spec.split(":")
  kw = {}
  for opt in opts:
    k, eq, v = opt.partition("=")
    if not eq or not k:
      raise ValueError(f"{kind} spec {spec!r}: option {opt!r} must be opt=value")
    kw[k] = parse_value(v)
  return name, kw


def check_method(spec: str) -> tuple[str, dict]:
  name, kw = parse_spec(spec)
  if name not in search.METHODS:
    raise ValueError(f"unknown method {name!r} in {spec!r}; valid: {', '.join(search.METHODS)}")
  return name, kw


def validate(config) -> None:
  """Checks the config before any compute."""
  policy_lib.validate(config.policy)
  task = policy_lib.get_task(config.policy.task.name)
  task.check_difficulty(tuple(config.split.difficulty) or None)
  for spec in config.methods:
    check_method(spec)
  for name in config.compute_optimal.candidates:
    check_method(name)
  kind, _ = parse_spec(config.reward, "reward")
  if kind not in REWARDS:
    raise ValueError(f"unknown reward {config.reward!r}; valid kinds: {', '.join(REWARDS)}")
  for i, n in enumerate(config.budgets):
    cli_lib.check_int(n, f"config.budgets[{i}]", 1)
  cli_lib.check_int(config.split.n, "config.split.n", 1)
  cli_lib.check_int(config.coverage_n, "config.coverage_n", 1)
  if config.temperature < 0:
    raise ValueError(f"config.temperature={config.temperature} must be >= 0")


def load_policy(config, workdir: str) -> tuple[dict, model.ModelConfig, dict]:
  """(params, cfg, policy.json) from config.policy_dir, else trained in WORKDIR/policy."""
  if config.policy_dir:
    path = os.path.join(config.policy_dir, "policy.json")
    if not os.path.exists(path):
      raise ValueError(f"config.policy_dir={config.policy_dir!r} has no policy.json; train it "
                       "with python -m scripts.train_policy")
    with open(path) as f:
      info = json.load(f)
  else:
    info = policy_lib.run(config.policy, os.path.join(workdir, "policy"))
  params, cfg, _ = checkpoint_lib.load_params(info["checkpoint"])
  return params, cfg, info


def learned_head(config, workdir: str, policy: core.Policy, task: base.Task) -> dict:
  """The value head in WORKDIR/value_head.npz, fitted first if missing: `learned.samples`
  policy samples of `learned.n` problems (seed `learned.seed`), oracle step labels."""
  path = os.path.join(workdir, "value_head.npz")
  if os.path.exists(path):
    return reward.load_head(path)[0]
  lc = config.learned
  rows, pos, labels = [], [], []
  for i, p in enumerate(task.problems(lc.seed, lc.n, tuple(config.split.difficulty) or None)):
    samples, _ = policy.bind(p)(core.root(lc.samples), core.fold(config.key + 7, i), until="end")
    r, ps, ls = reward.labelled_steps(task, p, samples)
    rows += r
    pos += ps
    labels += ls
  cfg = policy.decoder.cfg
  x = reward.step_features(cfg, policy.params, rows, pos)
  y = np.concatenate([np.asarray(v) for v in labels])
  head, _ = reward.fit_value_head(x, y, steps=lc.steps, key=jax.random.key(config.key))
  acc = float(np.mean((np.asarray(reward.value_head_apply(head, x)) > 0) == (y > 0)))
  reward.save_head(path, head, {"train_steps": int(len(y)), "positive": float(y.mean()),
                                "train_accuracy": acc})
  return head


def make_reward(config, workdir: str, policy: core.Policy, task: base.Task):
  kind, kw = parse_spec(config.reward, "reward")
  if kind == "oracle":
    return reward.OraclePRM(task, **kw)
  if kind == "noisy":
    return reward.NoisyPRM(task, **kw)
  head = learned_head(config, workdir, policy, task)
  return reward.LearnedPRM(policy.decoder.cfg, policy.params, head, task)


COST_FIELDS = ("tokens", "forward_passes", "forward_tokens", "reward_calls", "flops",
               "wall_time_s")


def _summary(rows) -> dict:
  """Accuracy, per-problem correctness and the mean of every cost field over `rows`."""
  return dict(accuracy=float(np.mean([r["correct"] for r in rows])),
              correct=[bool(r["correct"]) for r in rows],
              **{f: float(np.mean([r[f] for r in rows])) for f in COST_FIELDS})


def _solved(task, problem, r: core.SearchResult) -> bool:
  return r.sample is not None and r.answer is not None and task.is_correct(problem, r.text)


def evaluate(method: str, budget: int, problems, policy, rm, task, key: int) -> dict:
  """One (method spec, budget) over `problems`: accuracy and the mean cost per problem."""
  name, kw = check_method(method)
  fn = search.METHODS[name]
  rows = []
  for i, p in enumerate(problems):
    r = fn(policy.bind(p), rm.bind(p), core.Budget(budget), key=core.fold(key, i), **kw)
    rows.append(dict(correct=_solved(task, p, r), **r.cost.to_dict()))
  return _summary(rows)


def coverage(problems, policy, task, n: int, key: int, ks) -> dict:
  """Repeated sampling: pass@k per k (unbiased, from n samples), the coverage-law fit, and
  majority-vote accuracy of the first k samples."""
  counts, votes, tokens = [], {k: [] for k in ks}, []
  for i, p in enumerate(problems):
    samples, cost = policy.bind(p)(core.root(n), core.fold(key, i), until="end")
    ok = [task.is_correct(p, s.text) for s in samples]
    answers = [task.extract_answer(s.text) for s in samples]
    counts.append(sum(ok))
    tokens.append(cost.tokens / n)
    for k in ks:  # the voted answer's first sample, judged by the task's verifier
      a, _ = search.vote(answers[:k])
      votes[k].append(a is not None and ok[answers.index(a)])
  cov = passk.coverage(counts, n, ks)
  try:
    fit = passk.fit_coverage_law(ks, cov)
    fit_d = dict(a=fit.a, b=fit.b, r2=fit.r2, predicted=fit.predict(ks).tolist())
  except ValueError as e:
    fit_d = dict(error=str(e))
  return dict(n=n, ks=list(ks), pass_at_k=cov.tolist(), fit=fit_d,
              majority_first_k=[float(np.mean(votes[k])) for k in ks],
              tokens_per_sample=float(np.mean(tokens)), correct_counts=counts)


def _points(config) -> list[dict]:
  pts = []
  for spec in config.methods:
    name, _ = check_method(spec)
    cap = config.tree_max_budget if name in search.STEP_METHODS else max(config.budgets)
    for n in config.budgets:
      if n <= cap and search.valid_budget(name, n, parse_spec(spec)[1]):
        pts.append(dict(method=spec, budget=int(n)))
  return pts


def fit_and_run_compute_optimal(config, policy, rm, task, problems, key) -> list[dict]:
  """Per budget: fit the allocation on the fit split, then evaluate it on `problems`."""
  cc = config.compute_optimal
  fit_probs = task.problems(cc.fit_seed, cc.fit_n, tuple(config.split.difficulty) or None)
  out = []
  for n in cc.budgets:
    diffs = []
    for i, p in enumerate(fit_probs):
      meter = core.Meter(core.Budget(n))
      d, _ = co.estimate_difficulty(policy.bind(p), rm.bind(p), meter, cc.probe,
                                    core.fold(key + 1, i))
      diffs.append(d)
    rest = n - cc.probe
    correct = {}
    for spec in cc.candidates:
      name, kw = check_method(spec)
      if search.valid_budget(name, rest, kw):
        correct[spec] = evaluate(spec, rest, fit_probs, policy, rm, task, key + 1)["correct"]
    alloc = co.fit_allocation(diffs, correct, bins=cc.bins)
    methods = {spec: _bound(spec) for spec in correct}
    rows = []
    for i, p in enumerate(problems):
      r = co.compute_optimal(policy.bind(p), rm.bind(p), core.Budget(n), allocation=alloc,
                             methods=methods, probe=cc.probe, key=core.fold(key, i))
      rows.append(dict(correct=_solved(task, p, r), method=r.info.get("method"),
                       **r.cost.to_dict()))
    out.append(dict(method="compute_optimal", budget=int(n), allocation=alloc.to_dict(),
                    chosen={m: sum(r["method"] == m for r in rows) for m in correct},
                    **_summary(rows)))
  return out


def _bound(spec: str):
  name, kw = check_method(spec)
  fn = search.METHODS[name]
  return lambda propose, score, budget, **k: fn(propose, score, budget, **{**kw, **k})


def _acc(rows, method, budget):
  return next((r["accuracy"] for r in rows if r["method"] == method and r["budget"] == budget),
              None)


def _tok(rows, method, budget):
  return next((r["tokens"] for r in rows if r["method"] == method and r["budget"] == budget),
              None)


def _verdict(holds, informative: bool) -> bool | None:
  """True / False, or None (inconclusive) when the numbers cannot decide (all zero)."""
  return bool(holds) if informative else None


def _fmt(v) -> str:
  return "-" if v is None else f"{v:.3f}"


def claims(rows, cov) -> list[dict]:
  """The seeds' claims, each with the numbers that decide it and a verdict."""
  out = []
  ks, pk, mv = cov["ks"], cov["pass_at_k"], cov["majority_first_k"]
  fit = cov["fit"]
  lo = ks.index(max(k for k in ks if k <= max(ks) // 4)) if max(ks) >= 4 else 0
  gain_cov, gain_mv = pk[-1] - pk[lo], mv[-1] - mv[lo]
  out.append(dict(claim="coverage grows log-linearly with samples while majority vote plateaus",
                  evidence=f"pass@k {pk[lo]:.3f} -> {pk[-1]:.3f} (k={ks[lo]} -> {ks[-1]}), "
                  f"majority {mv[lo]:.3f} -> {mv[-1]:.3f}; law fit r2="
                  f"{fit.get('r2', float('nan')):.3f}",
                  holds=_verdict(gain_cov > 2 * max(gain_mv, 0) and fit.get("r2", 0) > 0.9,
                                 0 < pk[-1] < 1)))
  budgets = sorted({r["budget"] for r in rows})
  bon_max = max((b for b in budgets if _acc(rows, "best_of_n", b) is not None), default=None)
  pf = {b: _acc(rows, "particle_filtering", b) for b in budgets}
  pf = {b: a for b, a in pf.items() if a is not None}
  if pf and bon_max:
    target = _acc(rows, "best_of_n", bon_max)
    reach = [b for b, a in sorted(pf.items()) if a >= target]
    eq = [(b, pf[b], _acc(rows, "best_of_n", b), _acc(rows, "beam_search", b)) for b in pf]
    wins = [pa >= (ba or 0) and pa >= (bs or 0) for _, pa, ba, bs in eq]
    out.append(dict(claim="particle filtering beats best-of-N and beam search at equal budget "
                    f"(target: best-of-{bon_max} accuracy with <= 16 particles)",
                    evidence="; ".join(f"n={b}: PF {pa:.3f} BoN {_fmt(ba)} beam {_fmt(bs)}"
                                       for b, pa, ba, bs in eq)
                    + f"; best-of-{bon_max} {target:.3f}, PF reaches it at n="
                    f"{reach[0] if reach else 'never'}",
                    holds=_verdict(all(wins) and reach and reach[0] <= 16, target > 0)))
  pairs = [(b, _acc(rows, "rpc", b), _acc(rows, "majority_vote", 2 * b)) for b in budgets]
  pairs = [(b, r, m) for b, r, m in pairs if r is not None and m is not None]
  if pairs:
    out.append(dict(claim="RPC matches majority vote with about half the samples",
                    evidence="; ".join(f"RPC@{b} {r:.3f} vs majority@{2 * b} {m:.3f}"
                                       for b, r, m in pairs),
                    holds=_verdict(np.mean([r >= m - 0.02 for _, r, m in pairs]) >= 0.5,
                                   any(m > 0 for _, _, m in pairs))))
  ff = [(b, _acc(rows, "first_finish:m=3", b), _tok(rows, "first_finish:m=3", b),
         _acc(rows, "majority_vote", b), _tok(rows, "majority_vote", b)) for b in budgets]
  ff = [x for x in ff if x[1] is not None and x[3] is not None and x[0] >= 4]
  if ff:
    out.append(dict(claim="first-finish (short-3@k) saves tokens at equal accuracy",
                    evidence="; ".join(f"k={b}: short-3 {a:.3f} with {t:.0f} tokens vs majority "
                                       f"{ma:.3f} with {mt:.0f}" for b, a, t, ma, mt in ff),
                    holds=_verdict(all(t < mt and a >= ma - 0.03 for _, a, t, ma, mt in ff),
                                   any(ma > 0 for *_, ma, _ in ff))))
  copt = [r for r in rows if r["method"] == "compute_optimal"]
  if copt:
    ev = [(r["budget"], r["accuracy"], _acc(rows, "best_of_n", r["budget"])) for r in copt]
    out.append(dict(claim="compute-optimal allocation beats uniform best-of-N at equal compute",
                    evidence="; ".join(f"n={b}: compute-optimal {a:.3f} vs best-of-N "
                                       f"{bo if bo is None else round(bo, 3)}" for b, a, bo in ev),
                    holds=_verdict(all(bo is not None and a > bo for _, a, bo in ev),
                                   any(a > 0 or (bo or 0) > 0 for _, a, bo in ev))))
  return out


def run(config, workdir: str) -> dict:
  validate(config)
  workdir = checkpoint_lib.check_writable_dir(workdir, "--workdir")
  os.makedirs(workdir, exist_ok=True)
  t0 = time.perf_counter()
  params, cfg, info = load_policy(config, workdir)
  task = policy_lib.get_task(config.policy.task.name)
  policy = core.Policy(params, model.Decoder(cfg), task, temperature=config.temperature)
  rm = make_reward(config, workdir, policy, task)
  difficulty = tuple(config.split.difficulty) or None
  problems = task.problems(config.split.seed, config.split.n, difficulty)
  ks = [k for k in config.budgets if k <= config.coverage_n]
  cov_path = os.path.join(workdir, "coverage.json")
  if os.path.exists(cov_path):
    with open(cov_path) as f:
      cov = json.load(f)
  else:
    cov = coverage(problems, policy, task, config.coverage_n, config.key, ks)
    with open(cov_path, "w") as f:
      json.dump(cov, f)
  rows = sweep_lib.run_grid(
      _points(config), lambda pt: evaluate(pt["method"], pt["budget"], problems, policy, rm,
                                           task, config.key),
      os.path.join(workdir, "results.jsonl"), key_fields=KEY_FIELDS)
  co_path = os.path.join(workdir, "compute_optimal.json")
  if config.compute_optimal.budgets:
    if os.path.exists(co_path):
      with open(co_path) as f:
        copt = json.load(f)
    else:
      copt = fit_and_run_compute_optimal(config, policy, rm, task, problems, config.key)
      with open(co_path, "w") as f:
        json.dump(copt, f)
    rows = rows + copt
  verdicts = claims(rows, cov)
  files = write_report(rows, cov, verdicts, config, info, workdir)
  return dict(rows=rows, coverage=cov, claims=verdicts, files=files, policy=info,
              seconds=time.perf_counter() - t0, table=table(rows))


def table(rows) -> str:
  return sweep_lib.markdown_table(
      [dict(r, budget=r["budget"]) for r in rows],
      ["method", "budget", "accuracy", "tokens", "forward_passes", "reward_calls", "flops"],
      formats={"accuracy": ".3f", "tokens": ".0f", "forward_passes": ".1f",
               "reward_calls": ".1f", "flops": ".3g"})


def write_report(rows, cov, verdicts, config, info, workdir: str) -> list[str]:
  files = []
  for x, label in (("tokens", "generated tokens per problem"),
                   ("forward_passes", "policy forward passes per problem"),
                   ("reward_calls", "reward-model calls per problem")):
    pts = [dict(r, x=max(r[x], 1e-9)) for r in rows]  # log axis: 0 reward calls -> 1e-9
    files.append(sweep_lib.plot(
        pts, x="x", y="accuracy", series="method", path=os.path.join(workdir, f"search_{x}.png"),
        xlabel=label + " (log)", ylabel="accuracy", xscale="log",
        title=f"{config.policy.task.name}: accuracy vs {x} ({config.reward})"))
  ks = cov["ks"]
  crow = [dict(series="pass@k (coverage)", k=k, y=v)
          for k, v in zip(ks, cov["pass_at_k"], strict=True)]
  crow += [dict(series="majority vote of k", k=k, y=v)
           for k, v in zip(ks, cov["majority_first_k"], strict=True)]
  if "predicted" in cov["fit"]:
    crow += [dict(series=f"law exp({cov['fit']['a']:.2f} k^{cov['fit']['b']:.2f})", k=k, y=v)
             for k, v in zip(ks, cov["fit"]["predicted"], strict=True)]
  files.append(sweep_lib.plot(crow, x="k", y="y", series="series", xscale="log2",
                              path=os.path.join(workdir, "search_coverage.png"),
                              xlabel="samples k", ylabel="fraction of problems",
                              title="repeated sampling: coverage vs majority vote"))
  report = dict(task=config.policy.task.name, reward=config.reward, policy=info,
                split=config.split.to_dict(), temperature=config.temperature, coverage=cov,
                rows=rows, claims=verdicts)
  with open(os.path.join(workdir, "search.json"), "w") as f:
    json.dump(report, f, indent=1)
  lines = [f"# Search on {config.policy.task.name} ({config.reward})", "",
           table(rows), "", "| claim | evidence | holds |", "|---|---|---|"]
  lines += [f"| {c['claim']} | {c['evidence']} | {_word(c['holds'])} |" for c in verdicts]
  with open(os.path.join(workdir, "search.md"), "w") as f:
    f.write("\n".join(lines) + "\n")
  return files + [os.path.join(workdir, "search.json"), os.path.join(workdir, "search.md")]


def _word(holds) -> str:
  return {True: "yes", False: "no", None: "inconclusive"}[holds]


def format_result(r: dict) -> str:
  claims_txt = "\n".join(f"- {c['claim']}: {_word(c['holds'])} "
                         f"({c['evidence']})" for c in r["claims"])
  return r["table"] + "\n" + claims_txt + "\nwrote " + ", ".join(r["files"])





def search_from_flags(f: dict) -> str:
  """`scripts.search`: one method at one budget over a split, printed as a table (+ JSON)."""
  policy_dir = f["policy"]
  path = os.path.join(policy_dir, "policy.json")
  if not os.path.exists(path):
    raise ValueError(f"--policy={policy_dir!r} has no policy.json; train one with "
                     "python -m scripts.train_policy --config=scripts/configs/train/policy.py"
                     ":arithmetic --workdir=DIR")
  with open(path) as fh:
    info = json.load(fh)
  task = policy_lib.get_task(info["task"])
  name, _ = check_method(f["method"])
  budget = cli_lib.check_int(f["budget"], "--budget", 1)
  if not search.valid_budget(name, budget, parse_spec(f["method"])[1]):
    raise ValueError(f"--budget={budget} does not fit --method={f['method']!r} (beam methods "
                     "need beam_width to divide the budget; first_finish needs m <= budget)")
  n = cli_lib.check_int(f["n"], "--n", 1)
  difficulty = tuple(int(x) for x in f["difficulty"].split(",")) if f["difficulty"] else None
  task.check_difficulty(difficulty)
  kind, _ = parse_spec(f["reward"], "reward")
  if kind not in ("oracle", "noisy"):
    raise ValueError(f"--reward={f['reward']!r}; valid: oracle, noisy:fp=..:fn=.. (a learned "
                     "head is fitted by the sweep, scripts/sweeps/search.py)")
  params, cfg, _ = checkpoint_lib.load_params(info["checkpoint"])
  policy = core.Policy(params, model.Decoder(cfg), task, temperature=f["temperature"])
  c = ml_collections.ConfigDict(dict(reward=f["reward"]))
  rm = make_reward(c, "", policy, task)
  problems = task.problems(f["seed"], n, difficulty)
  m = evaluate(f["method"], budget, problems, policy, rm, task, f["seed"])
  row = dict(method=f["method"], budget=budget, **m)
  if f["output"]:
    with open(f["output"], "w") as fh:
      json.dump(row, fh, indent=1)
  return table([row])

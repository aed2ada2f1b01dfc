"""The main job: train -> prune -> quantize -> evaluate -> decode -> speculate, one report."""

from __future__ import annotations

import copy
import functools
import json
import os
import time

import jax
import ml_collections
import numpy as np

import decoding
import model
import quant
import sparsity
from decoding import speculative
from model.calibration import Calibration
from scripts import (
  attention_eval_lib,
  checkpoint_lib,
  data_lib,
  eval_lib,
  policy_lib,
  prune_lib,
  qat_lib,
  quantize_lib,
  search_lib,
  speculative_lib,
  train_lib,
)


def _eval(cfg, params, config) -> dict:
  e = config.eval
  return eval_lib.evaluate(cfg, params, config.data, split=e.split,
                           max_batches=e.max_batches or None)


def _greedy_decode(cfg, params, config) -> dict:
  """Greedy continuation of the prompt with the KV cache; tok/s from a second (warm) call."""
  tok = model.ByteTokenizer()
  prompt = tok.encode(config.decode.prompt, add_bos=True)
  step_fn = _step_fn(cfg)
  run = lambda: decoding.generate(
      params, [prompt], step_fn, max_new_tokens=config.decode.max_new_tokens, eos_id=tok.eos_id)
  run()  # compile
  outs = [run() for _ in range(3)]  # best of 3: the machine may be shared
  out = min(outs, key=lambda o: o.cost.wall_time_s)
  n = int(out.lengths[0])
  return {"text": tok.decode(np.asarray(out.tokens[0, :n])), "tokens": n,
          "tokens_per_s": n / out.cost.wall_time_s, "cost": out.cost.to_dict()}


def _step_fn(cfg):
  return model.Decoder(cfg)


def _sample(cfg, params, config) -> dict:
  tok = model.ByteTokenizer()
  d = config.decode
  n = d.num_samples
  prompt = tok.encode(d.prompt, add_bos=True)
  sampler = decoding.Sampler.create(n, temperature=d.temperature, top_p=d.top_p)
  run = lambda: decoding.generate(
      params, [prompt] * n, _step_fn(cfg), sampler=sampler, max_new_tokens=d.max_new_tokens,
      eos_id=tok.eos_id,
      key=jax.random.key(d.seed))
  run()
  out = run()
  texts = [tok.decode(np.asarray(out.tokens[i, : int(out.lengths[i])])) for i in range(n)]
  return {"texts": texts, "tokens": int(out.lengths.sum()),
          "tokens_per_s": float(out.lengths.sum()) / out.cost.wall_time_s,
          "cost": out.cost.to_dict()}


def _speculative(cfg, params, config, workdir: str) -> dict:
  """Trains the draft (resumable, `workdir/draft`), then greedy vs speculative decoding.

  Prompts are held-out test-split snippets, decoded one at a time (batch 1, the
  latency setting speculative decoding is for); each method is compiled first, and
  the best of 3 timings is kept. Greedy speculative output must equal greedy.
  """
  sp = config.speculative
  draft_config = _derived(config, model=sp.draft_model.to_dict(),
                          train=dict(steps=sp.draft_steps, eval_every=0),
                          ckpt=dict(every=sp.draft_steps))
  draft = train_lib.train_and_evaluate(draft_config, os.path.join(workdir, "draft"))
  d = config.decode
  stream = data_lib.load_split(config.data, "test")
  length = len(model.ByteTokenizer().encode(d.prompt, add_bos=True))
  starts = np.linspace(0, len(stream) - length - 1, sp.num_prompts).astype(int)
  prompts = [stream.tokens[i: i + length].astype(int).tolist() for i in starts]

  def greedy(p):
    return decoding.generate(params, [p], _step_fn(cfg), max_new_tokens=d.max_new_tokens)

  def spec(p):
    return speculative.speculative_decode(
        cfg, params, draft.model_cfg, draft.params, [p], max_new_tokens=d.max_new_tokens,
        gamma=sp.gamma, schedule=sp.schedule)

  times, outs = {}, {}
  for name, fn in (("greedy", greedy), ("speculative", spec)):
    fn(prompts[0])  # compile
    best = []
    for p in prompts:
      runs = [fn(p) for _ in range(3)]
      best.append(min(runs, key=lambda o: o.cost.wall_time_s))
    times[name] = sum(o.cost.wall_time_s for o in best)
    outs[name] = best
  tokens = sum(int(o.lengths[0]) for o in outs["greedy"])
  same = all(np.array_equal(np.asarray(g.tokens[0, : int(g.lengths[0])]),
                            np.asarray(s.tokens[0, : int(s.lengths[0])]))
             for g, s in zip(outs["greedy"], outs["speculative"], strict=True))
  stats = [o.stats for o in outs["speculative"]]
  tested = sum(st.tested for st in stats)
  alpha = sum(st.accepted for st in stats) / max(tested, 1)
  calls = sum(st.target_calls for st in stats)
  mean_gamma = float(np.mean([st.mean_gamma for st in stats]))
  # What one call costs (ms, batch 1): whether a draft can pay at this target's size.
  calls_ms = {"target_step": speculative_lib.forward_ms(cfg, params, 1),
              "target_verify": speculative_lib.forward_ms(cfg, params, sp.gamma + 1),
              "draft_step": speculative_lib.forward_ms(draft.model_cfg, draft.params, 1)}
  return {"draft_params": draft.summary["params"], "draft_val_bpb": draft.summary["val_bpb"],
          "calls_ms": calls_ms, "target_params": model.count_params(params),
          "gamma": sp.gamma, "schedule": sp.schedule, "prompts": len(prompts),
          "tokens": tokens, "greedy_tokens_per_s": tokens / times["greedy"],
          "speculative_tokens_per_s": tokens / times["speculative"],
          "speedup": times["greedy"] / times["speculative"], "alpha": alpha,
          "mean_gamma": mean_gamma, "tokens_per_target_call": tokens / max(calls, 1),
          "expected_tokens_per_call": speculative.expected_tokens_per_call(alpha, mean_gamma),
          "equals_greedy": bool(same)}


def _sparse_attention(cfg, params, config) -> dict:
  """The float model with a block selector vs dense attention: bits/byte of long test
  windows (one cached forward each, both sides) and greedy decode tok/s after a long
  prompt (best of 3 after a compile)."""
  a = config.attention
  select = sparsity.parse_selector(a.select)
  stream = data_lib.load_split(config.data, config.eval.split)
  windows = attention_eval_lib.document_windows(stream, a.windows, a.seq_len)
  decoders = {"dense": model.Decoder(cfg), "sparse": model.Decoder(cfg, attn_select=select)}
  out = {"select": a.select, "windows": a.windows, "seq_len": a.seq_len,
         "prompt_len": a.prompt_len, "new_tokens": a.new_tokens}
  prompt = windows[:1, :a.prompt_len]
  for name, dec in decoders.items():
    out[f"{name}_bpb"] = attention_eval_lib.cached_bpb(dec, params, windows)
    run = lambda dec=dec: decoding.generate(params, prompt, dec, max_new_tokens=a.new_tokens)
    run()  # compile
    best = min((run() for _ in range(3)), key=lambda o: o.cost.wall_time_s)
    out[f"{name}_tokens_per_s"] = int(best.lengths[0]) / best.cost.wall_time_s
    out[f"{name}_tokens"] = np.asarray(best.tokens[0]).tolist()
  # KV blocks one decode step reads: the selector's budget over the context's blocks.
  blocks = -(-(a.prompt_len + a.new_tokens // 2) // select.block)
  budget = getattr(select, "k", getattr(select, "max_blocks", blocks)) + select.sinks + select.local
  out["kv_read_fraction"] = min(1.0, budget / blocks)
  same = np.asarray(out["dense_tokens"]) == np.asarray(out["sparse_tokens"])
  out["same_prefix_tokens"] = int(np.argmin(same)) if not same.all() else len(same)
  return out


def _search(config, workdir: str) -> dict:
  """A policy for the search task (policy_lib, in workdir/policy), then every method of
  config.search at one budget on the same held-out problems (search_lib.evaluate)."""
  sc = config.search
  pc = policy_lib.default_config(sc.task)
  pc.train_config.train.steps = sc.policy_steps
  pc.task.n_train = sc.corpus_lines
  pc.train_config.ckpt.every = min(pc.train_config.ckpt.every, sc.policy_steps)
  pc.eval.n = max(sc.problems, 16)
  info = policy_lib.run(pc, os.path.join(workdir, "policy"))
  params, cfg, _ = checkpoint_lib.load_params(info["checkpoint"])
  task = policy_lib.get_task(sc.task)
  policy = decoding.search.Policy(params, model.Decoder(cfg), task, temperature=1.0)
  c = ml_collections.ConfigDict(dict(reward=sc.reward))
  rm = search_lib.make_reward(c, workdir, policy, task)
  problems = task.problems(2, sc.problems)  # the sweep's split (seed 2)
  rows = {}
  # The baseline: one sample per problem (a vote over one answer is that answer).
  for label, method, n in (("one sample", "majority_vote", 1),
                           *((m, m, sc.budget) for m in sc.methods)):
    r = search_lib.evaluate(method, n, problems, policy, rm, task, 0)
    rows[label] = {
        k: r[k] for k in ("accuracy", "tokens", "forward_passes", "reward_calls", "flops",
                          "wall_time_s")}
  return {"task": sc.task, "budget": sc.budget, "problems": sc.problems, "reward": sc.reward,
          "policy_pass_at_1": info["pass_at_1"], "policy_greedy": info["greedy_accuracy"],
          "policy_params": info["params"], "methods": rows}


def _derived(config, **sections):
  """A copy of `config` with fields of some sections replaced (a stage's own training run)."""
  out = copy.deepcopy(config)
  with out.unlocked():
    for name, fields in sections.items():
      out[name].update(fields)
  return out


def _prune_stage(cfg, float_params, config, workdir: str):
  """Every recipe of config.prune (+ masked fine-tunes, + the structured shrink).

  Returns (the first recipe's final params, {variant: (cfg, params)}, report section).
  """
  pc = config.prune
  calib = None
  if any(prune_lib.needs_calibration(r) for r in (*pc.recipes, pc.structured) if r):
    batches = data_lib.calibration_batches(config.data, pc.calib_seqs, config.data.seq_len,
                                           seed=config.train.seed)
    calib = Calibration(cfg, batches)
  variants, section, first = {}, {}, None
  for i, recipe in enumerate(pc.recipes):
    t0 = time.perf_counter()
    pruned, masks, rep = sparsity.prune_with_masks(float_params, recipe, calib=calib, cfg=cfg,
                                                   key=jax.random.key(config.train.seed))
    secs = time.perf_counter() - t0
    variants[f"pruned {recipe}"] = (cfg, pruned)
    out_dir = os.path.join(workdir, "pruned" if i == 0 else f"pruned_{_slug(recipe)}")
    if recipe in pc.finetune and pc.finetune_steps:
      n = pc.finetune_steps
      ft = _derived(config, train=dict(steps=n, eval_every=0), ckpt=dict(every=n),
                    opt=dict(lr=pc.finetune_lr, warmup_steps=min(20, n)))
      hooks = train_lib.Hooks(wrap_optimizer=functools.partial(sparsity.masked, masks=masks))
      pruned = train_lib.train_and_evaluate(ft, out_dir, init_params=pruned, hooks=hooks).params
      variants[f"pruned {recipe} + {n}-step masked fine-tune"] = (cfg, pruned)
    else:
      checkpoint_lib.save_params(out_dir, pruned, cfg, meta={"recipe": recipe}, replace=True)
    with open(os.path.join(out_dir, "prune_report.json"), "w") as f:
      json.dump(rep, f, indent=2)
    section[recipe] = {"sparsity": sparsity.mask_sparsity(masks), "seconds": secs,
                       "totals": rep["totals"]}
    first = pruned if first is None else first
  if pc.structured:
    small_cfg, small, rep = sparsity.shrink_recipe(float_params, pc.structured, cfg=cfg,
                                                   calib=calib)
    variants[f"shrunk {pc.structured} ({small_cfg.ffn_dim} ffn, {small_cfg.n_heads} heads)"] = (
        small_cfg, small)
    checkpoint_lib.save_params(os.path.join(workdir, "shrunk"), small, small_cfg,
                               meta={"recipe": pc.structured}, replace=True)
    section[pc.structured] = rep
  return first, variants, section


def _quant_methods(cfg, float_params, config, workdir: str, variants: dict) -> dict:
  """The data-aware PTQ rows (GPTQ, AWQ, W8A8 + SmoothQuant ...) and the QAT fine-tune row."""
  qc, section = config.quant, {}
  calib = None
  if any(quantize_lib.needs_calibration(r) for r in qc.methods):
    batches = data_lib.calibration_batches(config.data, config.prune.calib_seqs,
                                           config.data.seq_len, seed=config.train.seed)
    calib = Calibration(cfg, batches)
  for recipe in qc.methods:
    t = time.perf_counter()
    params, rep = quant.quantize(float_params, recipe, calib=calib)
    variants[recipe] = (cfg, params)
    section[recipe] = {"seconds": time.perf_counter() - t, "bytes_after": rep["bytes_after"]}
  if qc.qat_steps:
    t = time.perf_counter()
    res = qat_lib.finetune(os.path.join(workdir, "float"), os.path.join(workdir, "qat"),
                           recipe=qc.qat_recipe, steps=qc.qat_steps, lr=qc.qat_lr)
    params, qcfg, _ = checkpoint_lib.load_params(res["checkpoint"])
    variants[f"QAT {qc.qat_recipe} ({qc.qat_steps}-step fine-tune, exported)"] = (qcfg, params)
    section["qat"] = {"seconds": time.perf_counter() - t, **{k: v for k, v in res.items()
                                                            if isinstance(v, (int, float, str))}}
  return section


def _slug(recipe: str) -> str:
  return "".join(c if c.isalnum() else "_" for c in recipe)


def run(config, workdir: str) -> dict:
  """Runs every stage (training resumes from `workdir/float`); returns the report dict."""
  train_lib.validate_config(config, os.path.join(workdir, "float"))
  for recipe in (*config.prune.recipes, *config.prune.finetune, config.prune.structured):
    if recipe:
      sparsity.parse_recipe(recipe)
  if not config.prune.recipes:
    raise ValueError("config.prune.recipes must name at least one recipe")
  unknown = [r for r in config.prune.finetune if r not in config.prune.recipes]
  if unknown:
    raise ValueError(f"config.prune.finetune names {unknown}, not in config.prune.recipes")
  for recipe in (config.quant.recipe, *config.quant.methods):
    quant.parse_recipe(recipe)
  if config.attention.select:
    sparsity.parse_selector(config.attention.select)
    a = config.attention
    if not 1 <= a.prompt_len < a.seq_len or a.windows < 1 or a.new_tokens < 1:
      raise ValueError(f"config.attention: need windows >= 1, 1 <= prompt_len < seq_len, "
                       f"new_tokens >= 1; got windows={a.windows}, prompt_len={a.prompt_len}, "
                       f"seq_len={a.seq_len}, new_tokens={a.new_tokens}")
  t0 = time.perf_counter()
  rows, report = {}, {"workdir": os.path.abspath(workdir)}

  for m in config.search.methods if config.search.policy_steps else ():
    search_lib.check_method(m)
  n_stages = 5 + bool(config.speculative.draft_steps) + bool(config.search.policy_steps)
  print(f"== 1/{n_stages} train (float)", flush=True)
  res = train_lib.train_and_evaluate(config, os.path.join(workdir, "float"))
  cfg, float_params = res.model_cfg, res.params
  report["train"] = res.summary

  print(f"== 2/{n_stages} prune ({', '.join(config.prune.recipes)})", flush=True)
  pruned, variants, report["prune"] = _prune_stage(cfg, float_params, config, workdir)
  variants = {"float": (cfg, float_params), **variants}

  print(f"== 3/{n_stages} quantize ({config.quant.recipe})", flush=True)
  quant_dir = os.path.join(workdir, "quantized")
  qparams, q_report = quant.quantize(float_params, config.quant.recipe)
  qpruned, _ = quant.quantize(pruned, config.quant.recipe)
  variants[config.quant.recipe] = (cfg, qparams)
  variants[f"pruned {config.prune.recipes[0]} + {config.quant.recipe}"] = (cfg, qpruned)
  report["quant"] = _quant_methods(cfg, float_params, config, workdir, variants)
  checkpoint_lib.save_params(quant_dir, qparams, cfg, meta={"recipe": config.quant.recipe},
                             replace=True)
  with open(os.path.join(quant_dir, "quant_report.json"), "w") as f:
    json.dump(q_report, f, indent=2)

  print(f"== 4/{n_stages} evaluate ({config.eval.split} split) and greedy-decode each variant",
        flush=True)
  for name, (vcfg, params) in variants.items():
    ev = _eval(vcfg, params, config)
    dec = _greedy_decode(vcfg, params, config)
    # Counted on the logical (dequantized / decompressed) weights, not on stored codes.
    nonzero = sparsity.sparsity_report(params)["totals"]["nonzeros"]
    rows[name] = {"bpb": ev["bpb"], "param_bytes": model.tree_nbytes(params),
                  "nonzeros": nonzero, "decode_tokens_per_s": dec["tokens_per_s"],
                  "continuation": dec["text"]}
  report["variants"] = rows

  print(f"== 5/{n_stages} sample" + (f" and sparse attention ({config.attention.select})"
                                      if config.attention.select else ""), flush=True)
  report["sample"] = _sample(cfg, float_params, config)
  if config.attention.select:
    report["attention"] = _sparse_attention(cfg, float_params, config)
  if config.speculative.draft_steps:
    print(f"== 6/{n_stages} speculative decoding (draft: {config.speculative.draft_steps} "
          "steps)", flush=True)
    report["speculative"] = _speculative(cfg, float_params, config, workdir)
  if config.search.policy_steps:
    print(f"== {n_stages}/{n_stages} test-time search ({config.search.task} policy, "
          f"{config.search.policy_steps} steps; {len(config.search.methods)} methods at "
          f"budget {config.search.budget})", flush=True)
    report["search"] = _search(config, workdir)
  report["unigram_entropy_bits"] = res.summary["unigram_entropy_bits"]
  report["wall_time_s"] = time.perf_counter() - t0
  with open(os.path.join(workdir, "report.json"), "w") as f:
    json.dump(report, f, indent=2)
  return report


def format_report(report: dict, config) -> str:
  """The main job's closing table plus paths."""
  tr = report["train"]
  lines = [
      "",
      f"model: {tr['params']:,} params, {tr['step']} steps, " + (
          f"{tr['tokens_per_s'] / 1e3:.1f}k train tokens/s" if tr["tokens_per_s"]
          else "resumed with no steps left to run"),
      f"unigram byte entropy of the corpus: {report['unigram_entropy_bits']:.3f} bits; "
      f"float validation bits/byte: {tr['val_bpb']:.3f}",
      "",
      f"| variant | {config.eval.split} bits/byte | param bytes | non-zero weights "
      "| greedy decode tok/s |",
      "|---|---:|---:|---:|---:|",
  ]
  for name, r in report["variants"].items():
    lines.append(f"| {name} | {r['bpb']:.3f} | {r['param_bytes']:,} | "
                 f"{r['nonzeros']:,} | {r['decode_tokens_per_s']:.0f} |")
  s = report["sample"]
  first = next(iter(report["variants"].values()))
  lines += [
      "",
      f"sampling (T={config.decode.temperature}, top_p={config.decode.top_p}, "
      f"{config.decode.num_samples} rows): {s['tokens_per_s']:.0f} tok/s",
  ]
  if "attention" in report:
    at = report["attention"]
    lines += [
        f"sparse attention ({at['select']}: ~{at['kv_read_fraction']:.0%} of the KV blocks "
        f"per decode step): {config.eval.split} bits/byte {at['sparse_bpb']:.3f} vs dense "
        f"{at['dense_bpb']:.3f} on {at['windows']} windows of {at['seq_len']} (cached forward); "
        f"greedy decode after a {at['prompt_len']}-token prompt {at['sparse_tokens_per_s']:.0f} "
        f"vs {at['dense_tokens_per_s']:.0f} tok/s (at this length attention is a small part of "
        f"a step; long-context speed: docs/bench_attention.md); the first "
        f"{at['same_prefix_tokens']} generated tokens equal dense's",
    ]
  if "speculative" in report:
    sp = report["speculative"]
    lines += [
        f"speculative decoding (float target, {sp['draft_params']:,}-param draft at "
        f"{sp['draft_val_bpb']:.3f} val bits/byte, gamma {sp['gamma']} {sp['schedule']}, "
        f"batch 1, {sp['prompts']} test prompts): {sp['speculative_tokens_per_s']:.0f} tok/s "
        f"vs greedy {sp['greedy_tokens_per_s']:.0f} tok/s = {sp['speedup']:.2f}x; "
        f"alpha {sp['alpha']:.2f}, {sp['tokens_per_target_call']:.2f} tokens per target call "
        f"(closed form {sp['expected_tokens_per_call']:.2f}); output == greedy: "
        f"{sp['equals_greedy']}",
    ]
    c = sp.get("calls_ms")
    if c and sp["speedup"] < 1:
      lines.append(
          f"  -> no speedup at this scale: the {sp['target_params']:,}-param target is "
          f"per-op-overhead bound (a step {c['target_step']:.3f} ms, a {sp['gamma'] + 1}-token "
          f"verify {c['target_verify']:.3f} ms, a draft step {c['draft_step']:.3f} ms), so "
          f"drafting {sp['gamma']} tokens costs about what it saves; on a bandwidth-bound "
          "12.7M target speculative decoding is 1.7-2.6x greedy (docs/bench_speculative.md)")
  if "search" in report:
    se = report["search"]
    lines += [
        "",
        f"test-time search on {se['task']} ({se['problems']} held-out problems, a "
        f"{se['policy_params']:,}-param policy with pass@1 {se['policy_pass_at_1']:.2f}, "
        f"greedy {se['policy_greedy']:.2f}; reward {se['reward']}), budget {se['budget']} "
        "samples each (per problem):",
        "",
        "| method | accuracy | generated tokens | forward passes | reward calls | GFLOPs |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for name, r in se["methods"].items():
      lines.append(f"| {name} | {r['accuracy']:.3f} | {r['tokens']:.0f} | "
                   f"{r['forward_passes']:.0f} | {r['reward_calls']:.1f} | "
                   f"{r['flops'] / 1e9:.2f} |")
  lines += [
      "",
      "greedy continuation (float):",
      config.decode.prompt + first["continuation"],
      "",
      f"report:      {os.path.join(report['workdir'], 'report.json')}",
      f"checkpoints: {report['workdir']}/{{float,pruned*,shrunk,quantized,draft,policy/train}}"
      "/checkpoints",
      f"metrics:     {report['workdir']}/float/metrics.jsonl (TensorBoard: .../float/tb)",
      f"total wall time: {report['wall_time_s'] / 60:.1f} min",
  ]
  return "\n".join(lines)

r"""Speculative decoding vs plain greedy, batch 1, trained byte-level models.

python -m scripts.bench.speculative --target_workdir=runs/spec_target \
    --draft_workdir=runs/spec_draft --exit_workdir=runs/spec_exit

Models: scripts/configs/train/draft.py (:target and :draft, trained by scripts/train.py)
and the exit head of scripts/train_early_exit.py. Prompts are windows of the
target's validation split. Every method runs each prompt greedily (batch 1),
interleaved with the baseline (`decoding.generate`) so machine load hits both
alike; the best of --repeats is kept. Speculative outputs are checked token for
token against the baseline. Also times single forward calls (target at T = 1
and T = gamma + 1, draft at T = 1) to show where the time goes. Writes JSON and
a markdown table to --out (.json / .md).
"""

from __future__ import annotations

import functools
import json
import os

import numpy as np
from absl import flags

import decoding
import model
from decoding import early_exit, speculative
from scripts import checkpoint_lib, cli_lib, data_lib, eval_lib, speculative_lib
from scripts.bench import bench_lib

_TARGET = flags.DEFINE_string("target_workdir", None, "Trained target checkpoint workdir.")
_DRAFT = flags.DEFINE_string("draft_workdir", None, "Trained draft checkpoint workdir.")
_EXIT = flags.DEFINE_string("exit_workdir", None, "Target + exit head (optional).")
_PROMPTS = flags.DEFINE_integer("prompts", 4, "Prompts (validation windows).")
_PROMPT_LEN = flags.DEFINE_integer("prompt_len", 128, "Prompt length in bytes.")
_NEW = flags.DEFINE_integer("max_new_tokens", 128, "Tokens generated per prompt.")
_GAMMAS = flags.DEFINE_list("gammas", ["3", "5", "7"], "Fixed draft lengths to time.")
_REPEATS = flags.DEFINE_integer("repeats", 3, "Timed repeats (best kept).")
_OUT = flags.DEFINE_string("out", "docs/bench_speculative", "Output path without extension.")
flags.mark_flags_as_required(["target_workdir", "draft_workdir"])
FLAG_NAMES = ("target_workdir", "draft_workdir", "exit_workdir", "prompts", "prompt_len",
              "max_new_tokens", "gammas", "repeats", "out")


def _prompts(workdir: str, n: int, length: int) -> list[list[int]]:
  stream = data_lib.load_split(eval_lib.data_config_for(workdir), "val")
  starts = np.linspace(0, len(stream) - length - 1, n).astype(int)
  return [stream.tokens[s : s + length].astype(int).tolist() for s in starts]


def run(target_workdir, draft_workdir, exit_workdir, *, n_prompts, prompt_len, max_new, gammas,
        repeats, log=print) -> dict:
  """Times every method on every prompt; returns the results dict (also what --out gets)."""
  tp, tcfg, _ = checkpoint_lib.load_params(target_workdir)
  dp, dcfg, _ = checkpoint_lib.load_params(draft_workdir)
  speculative.check_compatible(tcfg, dcfg)
  prompts = _prompts(target_workdir, n_prompts, prompt_len)
  t_step = model.Decoder(tcfg)
  methods = {"greedy": lambda p: decoding.generate(tp, [p], t_step, max_new_tokens=max_new)}
  spec = functools.partial(speculative.speculative_decode, tcfg, tp, dcfg, dp,
                           max_new_tokens=max_new)
  for g in gammas:
    methods[f"draft, gamma={g}"] = functools.partial(lambda p, g: spec([p], gamma=g), g=g)
  g_max = max(gammas)
  methods[f"draft, adaptive (gamma_max={g_max})"] = lambda p: spec(
      [p], gamma=2, gamma_max=g_max, schedule="heuristic")
  exit_layer, exit_meta = None, None
  if exit_workdir:
    ep = early_exit.from_legacy(checkpoint_lib.load_params(exit_workdir)[0])
    exit_meta = checkpoint_lib.load_meta(exit_workdir)
    exit_layer = int(exit_meta["exit_layer"])
    for g in gammas:
      methods[f"self-spec (exit {exit_layer}), gamma={g}"] = functools.partial(
          lambda p, g: early_exit.self_speculative_decode(tcfg, ep, exit_layer, [p],
                                                          max_new_tokens=max_new, gamma=g), g=g)
  best, outs = bench_lib.interleaved(methods, prompts, repeats, log=log)
  rows = []
  base_s = sum(best["greedy"])
  ref = [np.asarray(outs["greedy", i].tokens[0]).tolist() for i in range(len(prompts))]
  tokens = sum(int(outs["greedy", i].lengths[0]) for i in range(len(prompts)))
  for name in methods:
    secs = sum(best[name])
    row = {"method": name, "seconds": secs, "tokens_per_s": tokens / secs,
           "speedup": base_s / secs}
    if name != "greedy":
      st = [outs[name, i].stats for i in range(len(prompts))]
      row["exact_match"] = all(np.asarray(outs[name, i].tokens[0]).tolist() == ref[i]
                               for i in range(len(prompts)))
      calls = sum(s.target_calls for s in st)
      row.update(
          target_calls=calls, draft_calls=sum(s.draft_calls for s in st),
          tokens_per_call=tokens / calls,
          alpha=sum(s.accepted for s in st) / max(sum(s.tested for s in st), 1),
          mean_gamma=sum(s.mean_gamma * s.target_calls for s in st) / calls)
      row["expected_tokens_per_call"] = speculative.expected_tokens_per_call(
          row["alpha"], row["mean_gamma"])
    rows.append(row)
  fwd_ms = speculative_lib.forward_ms
  forward = {"target T=1": fwd_ms(tcfg, tp, 1), "draft T=1": fwd_ms(dcfg, dp, 1)}
  for g in gammas:
    forward[f"target T={g + 1}"] = fwd_ms(tcfg, tp, g + 1)
  if exit_layer:
    forward[f"exit draft (layers < {exit_layer}) T=1"] = fwd_ms(tcfg, ep, 1, exit_layer)
  if exit_workdir:
    # Heads trained by the one trainer keep val metrics in summary.json; older runs in meta.
    m = {**_summary(exit_workdir), **exit_meta}
    exit_meta = {"exit_layer": m["exit_layer"], "steps": m.get("steps", m["step"]),
                 "val_kl": m.get("val_kl"), "val_agree": m.get("val_agree")}
  return {**bench_lib.machine_info(), "prompts": len(prompts),
          "prompt_len": prompt_len, "max_new_tokens": max_new, "greedy_tokens": tokens,
          "target": _model_info(target_workdir, tcfg, tp),
          "draft": _model_info(draft_workdir, dcfg, dp), "exit": exit_meta,
          "rows": rows, "forward_ms": forward,
          "sample": bytes(t for t in ref[0] if t < 256).decode("utf-8", "replace")}


def _summary(workdir: str) -> dict:
  path = os.path.join(workdir, "summary.json")
  if not os.path.exists(path):
    return {}
  with open(path) as f:
    return json.load(f)


def _model_info(workdir: str, cfg, params) -> dict:
  summary = _summary(workdir)
  return {"workdir": workdir, "params": model.tree_size(params),
          "model_config": cfg.to_dict(), "train_steps": summary.get("step"),
          "val_bpb": summary.get("val_bpb")}


def markdown(res: dict, command: str) -> str:
  """The results as a markdown page (table + where the time goes)."""
  t, d = res["target"], res["draft"]
  desc = lambda m: (f"{m['params'] / 1e6:.2f}M params (d={m['model_config']['d_model']}, "
                    f"{m['model_config']['n_layers']} layers), val {m['val_bpb'] or 0:.2f} "
                    f"bits/byte after {m['train_steps']} steps")
  lines = [
      "# Speculative decoding vs greedy (batch 1)", "",
      f"Machine: {res['machine']}, jax {res['jax']}. Command: `{command}`", "",
      f"Target: {desc(t)}. Draft: {desc(d)}. {res['prompts']} prompts of "
      f"{res['prompt_len']} bytes from the validation split, {res['max_new_tokens']} new "
      "tokens each, greedy; best of the repeats, methods interleaved.", "",
      "Models: `python -m scripts.train --config=scripts/configs/train/draft.py:draft "
      "--workdir=runs/spec_draft`, the same with `:target` (`runs/spec_target`), and "
      "`python -m scripts.train_early_exit --target_workdir=runs/spec_target --exit_layer=1 "
      "--steps=80 --batch_size=4 --workdir=runs/spec_exit`.", "",
      "| method | tok/s | speedup | alpha | mean gamma | tokens / target call | "
      "(1-a^(g+1))/(1-a) | target calls | draft calls | == greedy |",
      "|---|---|---|---|---|---|---|---|---|---|"]
  for r in res["rows"]:
    if r["method"] == "greedy":
      lines.append(f"| greedy (decoding.generate) | {r['tokens_per_s']:.1f} | 1.00 | | | 1 | | "
                   f"{res['greedy_tokens']} | | |")
      continue
    lines.append(
        f"| {r['method']} | {r['tokens_per_s']:.1f} | {r['speedup']:.2f} | {r['alpha']:.3f} | "
        f"{r['mean_gamma']:.2f} | {r['tokens_per_call']:.2f} | "
        f"{r['expected_tokens_per_call']:.2f} | {r['target_calls']} | {r['draft_calls']} | "
        f"{'yes' if r['exact_match'] else 'NO'} |")
  lines += ["", "Where the time goes: one cached forward at batch 1 (ms, jitted loop):", "",
            "| call | ms |", "|---|---|"]
  lines += [f"| {k} | {v:.3f} |" for k, v in res["forward_ms"].items()]
  lines += ["", "Greedy sample (prompt 0):", "", "```", res["sample"], "```", ""]
  return "\n".join(lines)


def main():
  gammas = bench_lib.int_list("gammas", _GAMMAS.value)
  for name, flag in (("prompts", _PROMPTS), ("prompt_len", _PROMPT_LEN),
                     ("max_new_tokens", _NEW), ("repeats", _REPEATS)):
    if flag.value < 1:
      raise ValueError(f"--{name}={flag.value} must be >= 1")
  res = run(_TARGET.value, _DRAFT.value, _EXIT.value, n_prompts=_PROMPTS.value,
            prompt_len=_PROMPT_LEN.value, max_new=_NEW.value, gammas=gammas,
            repeats=_REPEATS.value)
  command = bench_lib.command_line("scripts.bench.speculative", FLAG_NAMES)
  res["command"] = command
  bench_lib.write_results(_OUT.value, res, markdown(res, command))


if __name__ == "__main__":
  cli_lib.run(main)

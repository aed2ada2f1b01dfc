r"""Decode throughput, sparq vs Hugging Face transformers, on identical weights and config.

  python -m scripts.bench.decode                       # full grid (~10 min on 2 cores)
  python -m scripts.bench.decode --batch=1,8 --prompt_len=128   # a subset

For each (prompt length, batch): random prompts, greedy decoding of exactly
--new_tokens tokens (no EOS). sparq runs `decoding.generate` (one jitted
while_loop; compile excluded by a warm-up call on the same shapes); transformers
runs `LlamaForCausalLM.generate` (PyTorch CPU, KV cache, greedy) on the weights
sparq exported with `model.convert.export_hf`. Both are timed in the same process,
alternating. tokens/s = batch * new_tokens / wall time (prefill included);
"decode tok/s" excludes the prefill: batch * (new - 1) / (t(new) - t(1)).
Writes docs/bench_decode.json and docs/bench_decode.md.
"""

import os
import tempfile

import jax
import jax.numpy as jnp
import numpy as np
from absl import flags

import decoding
import model
from model import convert
from scripts import cli_lib
from scripts.bench import bench_lib

_BATCH = flags.DEFINE_list("batch", ["1", "8", "32"], "Batch sizes.")
_PROMPT = flags.DEFINE_list("prompt_len", ["128", "1024"], "Prompt lengths.")
_NEW = flags.DEFINE_integer("new_tokens", 128, "Tokens generated per row.")
_PRESET = flags.DEFINE_string("preset", "bench-25m", "Model preset (random weights).")
_DTYPE = flags.DEFINE_string("dtype", "float32", "Param and compute dtype of both models.")
_HF = flags.DEFINE_bool("hf", True, "Also time transformers generate.")
_HF_THREADS = flags.DEFINE_list(
    "hf_threads", ["1", "2"],
    "torch thread counts to try; HF's best is reported (2 threads collapse on a busy machine).")
_REPEATS = flags.DEFINE_integer("repeats", 1, "Timed runs per point (the best is kept).")
_SPLIT = flags.DEFINE_bool("split_prefill", True, "Also time 1-token runs (decode-only rate).")
_LAYOUT = flags.DEFINE_enum(
    "layout", "auto", ("auto",) + model.ops.PROJECTION_LAYOUTS,
    "sparq's q/k/v and gate/up kernels: separate, fused (`model.fuse_projections`) or auto "
    "(`model.ops.pick_projection_layout`: separate on XLA:CPU, where independent small dots "
    "run concurrently, docs/bench_decode_dots.md; fused elsewhere).")
_OTHER = flags.DEFINE_bool("compare_layouts", False,
                           "Also time sparq with the other layout (fused / separate kernels).")
_OUT = flags.DEFINE_string("output_dir", "docs", "Where bench_decode.{json,md} go.")
FLAG_NAMES = ("batch", "prompt_len", "new_tokens", "preset", "dtype", "hf", "hf_threads",
              "repeats", "split_prefill", "layout", "compare_layouts", "output_dir")


def _sparq_runner(cfg, params, layout: str):
  """decoding.generate; the warm-up compiles both shapes timed later (new and 1 tokens).
  layout: "fused" builds fused q/k/v and gate/up kernels once here (`model.decode_params`)."""
  cfg, params = model.decode_params(cfg, params, rows=1, layout=layout)
  step_fn = model.Decoder(cfg)

  def run(prompts, new):
    out = decoding.generate(params, prompts, step_fn, max_new_tokens=new)
    return np.asarray(out.tokens)

  def warm_up(prompts, new):
    run(prompts, new)  # compiles (the cache size depends on `new`, so no shortcut)
    run(prompts, 1)
    return {}

  return run, warm_up


def _hf_runner(hf_model, thread_counts):
  """transformers generate; each point first picks the fastest torch thread count."""
  import torch

  threads = [thread_counts[0]]

  def run(prompts, new):
    torch.set_num_threads(threads[0])
    ids = torch.as_tensor(prompts, dtype=torch.long)
    with torch.inference_mode():
      out = hf_model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new,
                              min_new_tokens=new, do_sample=False, num_beams=1,
                              pad_token_id=0, eos_token_id=None)
    return out[:, ids.shape[1]:].numpy()

  def warm_up(prompts, new):
    probe = {}
    for n in thread_counts:  # a short probe: 128-token prompts, 8 new tokens
      threads[0] = n
      probe[n], _ = bench_lib.timed(lambda: run(prompts[:, -128:], min(new, 8)))
    threads[0] = min(probe, key=probe.get)
    return {"threads": threads[0]}

  return run, warm_up


def _point(runners, prompts, new, repeats, split):
  """Times every runner on `prompts` after its warm-up; returns {name: stats}."""
  res, tokens = {}, {}
  b = prompts.shape[0]
  for name, (run, warm_up) in runners.items():
    extra = warm_up(prompts, new)
    t_full, tokens[name] = bench_lib.best_of(lambda: run(prompts, new), repeats)
    r = {"wall_s": t_full, "tok_s": b * new / t_full, **extra}
    if split:
      t_one, _ = bench_lib.best_of(lambda: run(prompts, 1), repeats)
      r.update(prefill_s=t_one, decode_tok_s=b * (new - 1) / max(t_full - t_one, 1e-9))
    res[name] = r
  if "hf" in tokens:
    res["greedy_agreement"] = float((tokens["sparq"] == tokens["hf"]).mean())
  return res


def _hf_model(cfg, params, folder):
  import torch
  from transformers import LlamaForCausalLM

  convert.export_hf(cfg, params, folder, architecture="LlamaForCausalLM")
  hf = LlamaForCausalLM.from_pretrained(folder, torch_dtype=getattr(torch, cfg.param_dtype))
  hf.eval()
  # Same weights: logits agree on a short input.
  x = np.arange(16)[None] % cfg.vocab_size
  with torch.inference_mode():
    ref = hf(torch.as_tensor(x)).logits.float().numpy()
  ours = np.asarray(model.apply(cfg, params, jnp.asarray(x))[0])
  return hf, float(np.abs(ref - ours).max())


def _table(results, meta, command: str) -> str:
  bound = meta["weight_bytes"] / meta["stream_bytes_per_s"]
  lines = [f"# Decode throughput: sparq vs transformers ({meta['machine']})", "",
           f"Model: preset `{meta['preset']}` ({meta['params'] / 1e6:.1f}M params, "
           f"{meta['dtype']}), random weights, greedy, {meta['new_tokens']} new tokens per row. "
           f"jax {meta['jax']}, torch {meta.get('torch', '-')}, transformers "
           f"{meta.get('transformers', '-')}. Load average at start / end: "
           f"{meta['load_avg_1m']:.2f} / {meta['load_avg_1m_end']:.2f}.", "",
           f"Streaming bandwidth measured in this run: {meta['stream_bytes_per_s'] / 1e9:.1f} "
           f"GB/s (a jitted sum over {meta['stream_probe_bytes'] >> 20} MiB); the weights are "
           f"{meta['weight_bytes'] / 1e6:.1f} MB, so one decode step cannot take less than "
           f"{bound * 1e3:.2f} ms (the weight-streaming bound). sparq decodes with "
           f"{'fused' if meta['fused'] else 'separate'} q/k/v and gate/up kernels.", "",
           "| prompt | batch | sparq tok/s | HF tok/s | speedup | sparq decode tok/s | "
           "HF decode tok/s | decode speedup | sparq step / bound | HF threads | "
           "greedy agreement |",
           "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
  for r in results:
    s, h = r["sparq"], r.get("hf", {})
    f = lambda d, k: f"{d[k]:.1f}" if k in d else "-"
    ratio = lambda k: f"{s[k] / h[k]:.2f}x" if k in s and k in h else "-"
    agree = f"{r['greedy_agreement']:.3f}" if "greedy_agreement" in r else "-"
    step = f"{s['step_vs_bound']:.2f}" if "step_vs_bound" in s else "-"
    lines.append(f"| {r['prompt_len']} | {r['batch']} | {f(s, 'tok_s')} | {f(h, 'tok_s')} | "
                 f"{ratio('tok_s')} | {f(s, 'decode_tok_s')} | {f(h, 'decode_tok_s')} | "
                 f"{ratio('decode_tok_s')} | {step} | {h.get('threads', '-')} | {agree} |")
    other = "sparq-unfused" if meta["fused"] else "sparq-fused"
    u = r.get(other)
    if u:
      tag = f"({other[6:]})"
      ustep = f"{u['step_vs_bound']:.2f}" if "step_vs_bound" in u else "-"
      lines.append(f"| {r['prompt_len']} | {r['batch']} | {f(u, 'tok_s')} {tag} | | | "
                   f"{f(u, 'decode_tok_s')} {tag} | | | {ustep} | | |")
  lines += ["", "tok/s = batch x new tokens / wall time, prefill included; decode tok/s = "
            "batch x (new - 1) / (t(new) - t(1)). HF: the best of torch thread counts "
            f"{meta.get('hf_threads', '-')}. Step / bound: one batch-1 decode step "
            "(1 / decode tok/s) over the weight-streaming bound. Greedy agreement: fraction of "
            f"identical generated tokens. Command: `{command}`."]
  return "\n".join(lines) + "\n"


def main():
  batches = bench_lib.int_list("batch", _BATCH.value)
  lens = bench_lib.int_list("prompt_len", _PROMPT.value)
  if _NEW.value < 2 or _REPEATS.value < 1:
    raise ValueError(f"--new_tokens={_NEW.value} must be >= 2, --repeats={_REPEATS.value} >= 1")
  cfg = model.get_preset(_PRESET.value, param_dtype=_DTYPE.value, dtype=_DTYPE.value)
  if max(lens) + _NEW.value > cfg.max_seq_len:
    raise ValueError(f"--prompt_len={max(lens)} + --new_tokens={_NEW.value} exceeds "
                     f"max_seq_len={cfg.max_seq_len}")
  params = model.init(cfg, jax.random.key(0))
  meta = dict(**bench_lib.machine_info(), preset=_PRESET.value, dtype=_DTYPE.value,
              params=model.count_params(params), new_tokens=_NEW.value,
              weight_bytes=model.tree_nbytes(params))
  meta["stream_bytes_per_s"], meta["stream_probe_bytes"] = bench_lib.stream_bandwidth()
  print(f"streaming bandwidth: {meta['stream_bytes_per_s'] / 1e9:.1f} GB/s")
  layout = _LAYOUT.value
  if layout == "auto":  # the pick does not depend on the row count today
    layout = model.ops.pick_projection_layout(min(batches))
  meta.update(layout=layout, layout_flag=_LAYOUT.value, fused=layout == "fused")
  runners = {"sparq": _sparq_runner(cfg, params, layout)}
  if _OTHER.value:
    other = "sparq-unfused" if layout == "fused" else "sparq-fused"
    runners[other] = _sparq_runner(cfg, params, "separate" if layout == "fused" else "fused")
  if _HF.value:
    import torch
    import transformers

    meta.update(torch=torch.__version__, transformers=transformers.__version__,
                hf_threads=[int(n) for n in _HF_THREADS.value])
    with tempfile.TemporaryDirectory() as folder:
      hf, diff = _hf_model(cfg, params, folder)
    meta["hf_logits_max_abs_diff"] = diff
    print(f"HF parity: max |logits diff| = {diff:.2e}")
    runners["hf"] = _hf_runner(hf, [int(n) for n in _HF_THREADS.value])
  results = []
  rng = np.random.RandomState(0)
  for p in lens:
    for b in batches:
      prompts = rng.randint(0, cfg.vocab_size, (b, p)).astype(np.int32)
      r = dict(prompt_len=p, batch=b, **_point(runners, prompts, _NEW.value, _REPEATS.value,
                                               _SPLIT.value))
      bound = meta["weight_bytes"] / meta["stream_bytes_per_s"]
      for name in ("sparq", "sparq-unfused", "sparq-fused"):
        if b == 1 and "decode_tok_s" in r.get(name, {}):
          r[name]["step_vs_bound"] = 1 / r[name]["decode_tok_s"] / bound
      results.append(r)
      hf_tok = r.get("hf", {}).get("tok_s", float("nan"))
      print(f"prompt {p:5d} batch {b:3d}: sparq {r['sparq']['tok_s']:8.1f} tok/s  "
            f"hf {hf_tok:8.1f} tok/s  ({r['sparq']['tok_s'] / hf_tok:.2f}x)", flush=True)
  bench_lib.finish("scripts.bench.decode", FLAG_NAMES, os.path.join(_OUT.value, "bench_decode"),
                   meta, lambda cmd: (dict(meta=meta, results=results),
                                      _table(results, meta, cmd)))


if __name__ == "__main__":
  cli_lib.run(main)

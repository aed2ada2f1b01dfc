"""Pruned-attention evaluation on real models: bits/byte of long windows through a
`model.Decoder` (dense, a block selector, or a KV-eviction policy), layouts' recall of the
true attention on the model's own queries and keys, and the retrieval sweeps of
`scripts/attention_eval.py`.

Every measurement runs a cached forward (`step_fn(params, tokens, cache)`), the path
selectors and eviction policies act on, for the dense baseline too, so rows differ only
in the attention they compute.
"""

from __future__ import annotations

import dataclasses
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax

import model
from decoding.tasks import retrieval
from scripts import checkpoint_lib, data_lib, metrics_lib, retrieval_lib, sweep_lib
from sparsity import attention as sparse_attention
from sparsity import eviction


def document_windows(stream: data_lib.TokenStream, n: int, seq_len: int) -> np.ndarray:
  """[n, seq_len] tokens: the first seq_len tokens of the first n documents at least that
  long (a window never crosses a document boundary), or a ValueError saying how many
  exist."""
  starts = np.flatnonzero(stream.doc_start)
  ends = np.append(starts[1:], len(stream))
  long = starts[(ends - starts) >= seq_len]
  if len(long) < n:
    raise ValueError(f"the split has {len(long)} documents of >= {seq_len} tokens; asked for "
                     f"n={n} windows (lower n or seq_len)")
  return np.stack([np.asarray(stream.tokens[s:s + seq_len], np.int32) for s in long[:n]])


def _forward(step_fn):
  return jax.jit(lambda params, tokens, cache: step_fn(params, tokens, cache)[0])


def cached_nll(step_fn, params, tokens_BT: np.ndarray, *, batch: int = 4) -> tuple[float, int]:
  """(sum of next-token NLL in nats, targets) of each row as one cached forward from an empty
  cache; rows go `batch` at a time (the last batch is padded and its padding dropped)."""
  tokens_BT = np.asarray(tokens_BT, np.int32)
  n, t = tokens_BT.shape
  if batch < 1:
    raise ValueError(f"batch={batch} must be >= 1")
  fwd = _forward(step_fn)
  total, count = 0.0, 0
  for i in range(0, n, batch):
    rows = tokens_BT[i:i + batch]
    real = len(rows)
    rows = np.concatenate([rows, np.repeat(rows[-1:], batch - real, axis=0)])
    logits = fwd(params, jnp.asarray(rows), step_fn.init_cache(batch, t))
    nll = optax.softmax_cross_entropy_with_integer_labels(logits[:real, :-1],
                                                          jnp.asarray(rows[:real, 1:]))
    total += float(jnp.sum(nll))
    count += real * (t - 1)
  return total, count


def cached_bpb(step_fn, params, tokens_BT: np.ndarray, *, batch: int = 4) -> float:
  """Bits per byte (byte tokenizer: one target per byte) of `cached_nll`."""
  nll, count = cached_nll(step_fn, params, tokens_BT, batch=batch)
  return nll / max(count, 1) / np.log(2)


# --- The retrieval sweep of scripts/attention_eval.py.

_PROBES: dict[str, list] = {}  # Probe name -> host records (jax.debug.callback)


@dataclasses.dataclass(frozen=True)
class Probe:
  """A block selector that also records, per layer, the layout's density (active kv blocks
  over the blocks holding any visible key) and its recall of the true attention
  (`sparsity.attention_recall`, and `topk_recall` of the true top `k` blocks) on the
  model's own queries and keys. Records go to `records(name)`."""

  inner: object
  name: str
  k: int = 4

  def __call__(self, q_BTHD, k_BKSD, mask, layer):
    layout = self.inner(q_BTHD, k_BKSD, mask, layer)
    if layout is None:
      return None
    b, t = q_BTHD.shape[:2]
    s = k_BKSD.shape[2]
    k_BSKD = jnp.swapaxes(k_BKSD, 1, 2)
    record(self.name, layer, layout, q_BTHD, k_BSKD, mask.materialize(b, t, s), mask,
           self.k)
    return layout


def record(name, layer, layout, q_BTHD, k_BSKD, vis_BTS, mask, k):
  """Sends (layer, density, attention recall, top-k recall) of a layout to `_PROBES[name]`."""
  t, s = vis_BTS.shape[1:]
  bq, bk = layout.block_q, layout.block_kv
  qb, sb = -(-t // bq), -(-s // bk)
  vis = jnp.pad(vis_BTS, ((0, 0), (0, qb * bq - t), (0, sb * bk - s)))
  visible = jnp.any(vis.reshape(-1, qb, bq, sb, bk), axis=(2, 4))[:, None]  # [B, 1, Qb, Sb]
  active = layout.block_mask(sb) & visible
  density = jnp.sum(active) / jnp.maximum(jnp.sum(jnp.broadcast_to(visible, active.shape)), 1)
  rec = jnp.mean(sparse_attention.attention_recall(q_BTHD, k_BSKD, mask, layout))
  top = jnp.mean(sparse_attention.topk_recall(q_BTHD, k_BSKD, mask, layout, k=k))
  jax.debug.callback(lambda *xs: _PROBES.setdefault(name, []).append(
      tuple(float(x) for x in xs)), layer, density, rec, top)


def records(name: str) -> dict:
  """Mean density / recall / top-k recall over everything `name` recorded (then cleared)."""
  rows = _PROBES.pop(name, [])
  if not rows:
    return {}
  arr = np.asarray(rows)
  return dict(density=float(arr[:, 1].mean()), recall=float(arr[:, 2].mean()),
              topk_recall=float(arr[:, 3].mean()), reads=len(rows))


@dataclasses.dataclass(frozen=True)
class Window:
  """A static selector for the probe pass: sliding window + sinks as a block layout
  (`sparsity.window_layout`), for prefill from an empty cache (queries at 0..T-1)."""

  window: int
  sinks: int
  block: int

  def __call__(self, q_BTHD, k_BKSD, mask, layer):
    t, s = q_BTHD.shape[1], k_BKSD.shape[2]
    return sparse_attention.window_layout(t, s, self.window, block_q=self.block,
                                          block_kv=self.block, sinks=self.sinks)


def _done_rows(path: str) -> dict[str, dict]:
  if not os.path.exists(path):
    return {}
  with open(path) as f:
    rows = [json.loads(ln) for ln in f if ln.strip()]
  return {r["id"]: r for r in rows}


def validate(config) -> None:
  """Parses every policy and selector of the sweep config before any compute."""
  for spec in config.selectors:
    sparse_attention.parse_selector(spec)
  for name in config.eviction.policies:
    for budget in config.eviction.budgets:
      eviction.parse_policy(f"{name}:budget={budget}")
  if config.n_problems < 1 or config.probe_problems < 1:
    raise ValueError(f"config.n_problems={config.n_problems} and config.probe_problems="
                     f"{config.probe_problems} must be >= 1")
  retrieval_lib.validate(config.retrieval)


def run(config, workdir: str, log=print) -> dict:
  """Trains (or resumes) the retrieval model, then scores every policy on held-out problems.

  Rows (one per selector spec, one per eviction policy x budget, plus dense) land in
  WORKDIR/rows.jsonl as they finish, so a rerun skips them. Each row: retrieval accuracy,
  held-out bits/byte (selectors: one cached prefill; eviction: token by token, as decoding
  sees it), and for selectors the probe pass's density and recall on the trained
  model's own attention; eviction rows' density is budget / context. Writes
  WORKDIR/attention_eval.json, docs-ready PNGs and a markdown table.
  """
  validate(config)
  base = retrieval_lib.run(config.retrieval, os.path.join(workdir, "model"))
  log(retrieval_lib.format_result(base))
  params, cfg, _ = checkpoint_lib.load_params(os.path.join(workdir, "model", "train"))
  problems = retrieval_lib.eval_problems(config.retrieval)[:config.n_problems]
  texts = [retrieval_lib.document(p) for p in problems[:config.bpb_texts]]
  context = config.retrieval.task.context_len
  path = os.path.join(workdir, "rows.jsonl")
  done = _done_rows(path)
  kw = dict(max_new_tokens=retrieval_lib.max_new_tokens(config.retrieval),
            batch_size=config.batch_size)
  todo = [("dense", "dense", "dense", None)]
  todo += [(spec, spec.split(":")[0], "selector", spec) for spec in config.selectors]
  todo += [(f"{name}:budget={b}", name, "eviction", f"{name}:budget={b}")
           for name in config.eviction.policies for b in config.eviction.budgets]
  progress = metrics_lib.Progress(len(todo), len(done))
  for i, (row_id, family, kind, spec) in enumerate(todo):
    if row_id in done:
      continue
    if kind == "selector":
      step_fn = model.Decoder(cfg, attn_select=sparse_attention.parse_selector(spec))
    elif kind == "eviction":
      step_fn = model.Decoder(cfg, evict=eviction.parse_policy(spec))
    else:
      step_fn = model.Decoder(cfg)
    res = retrieval_lib.evaluate(params, cfg, problems, step_fn=step_fn, **kw)
    row = dict(id=row_id, family=family, kind=kind, accuracy=res["accuracy"],
               by_depth=res["by_depth"], n=res["n"], bytes_moved=res["bytes_moved"])
    chunk = 1 if kind == "eviction" else None  # eviction acts only between forward calls
    row["bpb"] = retrieval_lib.bits_per_byte(params, cfg, texts, step_fn=step_fn, chunk=chunk,
                                             batch_size=min(8, len(texts)))["bpb"]
    if kind == "selector":
      sel = sparse_attention.parse_selector(spec)
      probe = Probe(sel, row_id, k=getattr(sel, "k", config.topk_recall_k))
      _probe_pass(params, cfg, probe, problems[:config.probe_problems])
      row.update(records(row_id))
    elif kind == "eviction":
      row["density"] = min(1.0, eviction.parse_policy(spec).budget / context)
    else:
      row["density"] = 1.0
    with open(path, "a") as f:
      f.write(json.dumps(row) + "\n")
    done[row_id] = row
    progress.update(i + 1, f"{row_id}: accuracy {row['accuracy']:.3f}")
  # The static window + sinks layout, probe pass only (a reference point for recall).
  w = config.window
  win_id = f"window:{w.window}+sinks:{w.sinks}"
  _probe_pass(params, cfg, Probe(Window(w.window, w.sinks, w.block), win_id,
                                 k=config.topk_recall_k), problems[:config.probe_problems])
  static = dict(id=win_id, **records(win_id))
  rows = [done[t[0]] for t in todo]
  return _report(config, workdir, base, rows, static)


def _probe_pass(params, cfg, probe, problems):
  """One cached prefill of each prompt through `probe` (its records: the prompt's layouts)."""
  tok = model.ByteTokenizer()
  dec = model.Decoder(cfg, attn_select=probe)
  for p in problems:
    ids = jnp.asarray([retrieval.prompt_tokens(p, tok)], jnp.int32)
    jax.block_until_ready(dec(params, ids, dec.init_cache(1, ids.shape[1])))


def _report(config, workdir, base, rows, static) -> dict:
  out_dir = config.output_dir or workdir
  os.makedirs(out_dir, exist_ok=True)
  dense = rows[0]
  ev = [r | {"budget": int(r["id"].split("=")[-1])} for r in rows if r["kind"] == "eviction"]
  sel = [r for r in rows if r["kind"] == "selector"]
  files = []
  ctx = config.retrieval.task.context_len
  refs = {f"dense ({dense['accuracy']:.2f})": dense["accuracy"]}
  if ev:
    files.append(sweep_lib.plot(
        ev, x="budget", y="accuracy", series="family", path=os.path.join(
            out_dir, "attention_eval_budget.png"), xlabel="KV budget (slots per kv head)",
        ylabel="retrieval accuracy", title=f"{base['task']} retrieval at context {ctx}: "
        "accuracy vs KV budget", references=refs, xscale="log2"))
  if sel:
    files.append(sweep_lib.plot(
        sel, x="density", y="accuracy", series="family", path=os.path.join(
            out_dir, "attention_eval_density.png"),
        xlabel="attention density (active / visible kv blocks, prefill)",
        ylabel="retrieval accuracy", title=f"{base['task']} retrieval at context {ctx}: "
        "accuracy vs density", references=refs))
    files.append(sweep_lib.plot(
        sel, x="density", y="recall", series="family", path=os.path.join(
            out_dir, "attention_eval_recall.png"),
        xlabel="attention density (active / visible kv blocks, prefill)",
        ylabel="recall of the true attention mass", title="recall vs density",
        references={f"{static['id']} ({static.get('recall', 0):.2f})":
                    static.get("recall", 0.0)}))
  cols = ["id", "accuracy", "bpb", "density", "recall", "topk_recall"]
  table = sweep_lib.markdown_table(rows + [static], cols, formats=dict(
      accuracy=".3f", bpb=".3f", density=".2f", recall=".3f", topk_recall=".3f"))
  result = dict(model=base, rows=rows, static=static, files=files, table=table,
                config=json.loads(config.to_json()))
  with open(os.path.join(out_dir, "attention_eval.json"), "w") as f:
    json.dump(result, f, indent=2)
  with open(os.path.join(out_dir, "attention_eval.md"), "w") as f:
    f.write(f"# Pruned attention on {base['task']} retrieval (context {ctx})\n\n"
            f"{retrieval_lib.format_result(base)}\n\n{table}")
  files += [os.path.join(out_dir, "attention_eval.json"),
            os.path.join(out_dir, "attention_eval.md")]
  result["files"] = files
  return result

"""Resumable sweeps: a grid of settings -> one JSONL record per point -> markdown table + PNG.

  rows = run_grid(points, evaluate, "out/results.jsonl", key_fields=("prune", "quant"))
  print(markdown_table(rows, ["prune", "quant", "bpb"], formats={"bpb": ".3f"}))
  plot(rows, x="sparsity", y="bpb", series="method", path="out/bpb.png", ...)

A point is a JSON-able dict; its key (the values of `key_fields`) names it in the
results file. Each finished point is appended as one line and fsynced, so killing
a sweep loses at most the point in progress, and rerunning it evaluates only the
points whose key is not in the file yet.
"""

from __future__ import annotations

import functools
import json
import math
import os
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import matplotlib

matplotlib.use("Agg")  # headless: sweeps run on servers without a display
import matplotlib.pyplot as plt  # noqa: E402

XSCALES = ("linear", "log", "log2")
_MARKERS = ("o", "s", "^", "D", "v", "P")
_LINES = ("-", "--", ":", "-.")
_stderr = functools.partial(print, file=sys.stderr, flush=True)


def _key(record: Mapping, key_fields: Sequence[str]) -> str:
  # JSON text, so that 0.5 and "0.5" are different keys and lists are hashable.
  return json.dumps([record[f] for f in key_fields], sort_keys=True)


def _check_grid(points, key_fields) -> list[str]:
  if not isinstance(points, (list, tuple)) or not points:
    raise ValueError(f"points={points!r} must be a non-empty list of dicts")
  if isinstance(key_fields, str) or not key_fields:
    raise ValueError(f"key_fields={key_fields!r} must be a non-empty sequence of field names")
  keys, seen = [], {}
  for i, p in enumerate(points):
    if not isinstance(p, Mapping):
      raise ValueError(f"points[{i}]={p!r} must be a dict of settings")
    missing = [f for f in key_fields if f not in p]
    if missing:
      raise ValueError(f"key_fields={list(key_fields)!r}: {missing} not in points[{i}] "
                       f"(its fields: {sorted(p)})")
    try:
      k = _key(p, key_fields)
      json.dumps(p)
    except TypeError as e:
      raise ValueError(f"points[{i}]={p!r} is not JSON-able: {e}") from None
    if k in seen:
      raise ValueError(f"points[{seen[k]}] and points[{i}] have the same key {k} "
                       f"(key_fields={list(key_fields)!r}); keys must be unique")
    seen[k] = i
    keys.append(k)
  return keys


def read_results(path: str) -> list[dict]:
  """Records of a JSONL results file; drops (rewriting the file) a truncated last line."""
  if not os.path.exists(path):
    return []
  with open(path) as f:
    text = f.read()
  lines = text.split("\n")
  records, clean = [], text.endswith("\n") or not text
  for i, line in enumerate(lines):
    if not line.strip():
      continue
    try:
      records.append(json.loads(line))
    except json.JSONDecodeError:
      if any(rest.strip() for rest in lines[i + 1:]):
        raise ValueError(f"results_path={path!r}: line {i + 1} is not JSON and is not the last "
                         "line (only a killed write's last line is repaired)") from None
      clean = False
  if not clean:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
      f.writelines(json.dumps(r) + "\n" for r in records)
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, path)
  return records


def _append(f, record: dict) -> dict:
  line = json.dumps(record)
  f.write(line + "\n")
  f.flush()
  os.fsync(f.fileno())
  return json.loads(line)  # as a rerun would read it back (tuples as lists)


def run_grid(points: Sequence[dict], evaluate: Callable[[dict], Mapping[str, Any]],
             results_path: str, *, key_fields: Sequence[str],
             log: Callable[[str], object] = _stderr) -> list[dict]:
  """Evaluates the points not yet in `results_path`; returns the grid's records in grid order.

  A record is `{**point, **metrics}` as stored in the file (old and new alike).

  Args:
    evaluate: point -> JSON-able metrics; its fields must not change the point's key.
    results_path: a JSONL file, created if missing; records of other grids are kept.
    key_fields: the point fields that identify a point (its other fields are not compared).
    log: receives one progress line (done / total, seconds per point, ETA) per point.
  """
  keys = _check_grid(points, key_fields)
  stored = {}
  for j, r in enumerate(read_results(results_path)):
    missing = [f for f in key_fields if f not in r]
    if missing:
      raise ValueError(f"results_path={results_path!r}: record {j + 1} lacks key fields "
                       f"{missing} (key_fields={list(key_fields)!r}); is it another sweep's?")
    stored.setdefault(_key(r, key_fields), r)
  todo = [i for i, k in enumerate(keys) if k not in stored]
  total, done = len(points), len(points) - len(todo)
  log(f"sweep: {total} points, {done} already in {results_path}, {len(todo)} to evaluate")
  os.makedirs(os.path.dirname(os.path.abspath(results_path)), exist_ok=True)
  t0 = time.perf_counter()
  with open(results_path, "a") as f:
    for n, i in enumerate(todo, start=1):
      point = dict(points[i])
      metrics = evaluate(point)
      if not isinstance(metrics, Mapping):
        raise ValueError(f"evaluate({point!r}) returned {metrics!r}; expected a dict of metrics")
      record = {**point, **metrics}
      if _key(record, key_fields) != keys[i]:
        raise ValueError(f"evaluate({point!r}) returned metrics that overwrite key fields "
                         f"{list(key_fields)!r}")
      try:
        stored[keys[i]] = _append(f, record)
      except TypeError as e:
        raise ValueError(f"evaluate({point!r}) returned metrics that are not JSON-able: "
                         f"{e}") from None
      per_point = (time.perf_counter() - t0) / n
      log(f"[{done + n}/{total}] {per_point:.1f} s/point, ETA {per_point * (len(todo) - n):.0f} s"
          f" | {json.loads(keys[i])}")
  return [stored[k] for k in keys]


def _cell(value, fmt) -> str:
  if value is None:
    return ""
  if callable(fmt):
    text = fmt(value)
  elif fmt is not None:
    text = format(value, fmt)
  elif isinstance(value, float):
    text = format(value, ".4g")
  else:
    text = str(value)
  return text.replace("|", "\\|")


def markdown_table(rows: Sequence[Mapping], columns: Sequence[str], *,
                   formats: Mapping[str, str | Callable[[Any], str]] | None = None,
                   headers: Mapping[str, str] | None = None) -> str:
  """A GitHub markdown table of `columns` of `rows` (a missing value is an empty cell).

  `formats` maps a column to a format spec (".3f") or a callable; floats default to ".4g".
  `headers` maps a column to its header text (default: the column name).
  """
  if isinstance(columns, str) or not columns:
    raise ValueError(f"columns={columns!r} must be a non-empty sequence of field names")
  formats, headers = dict(formats or {}), dict(headers or {})
  for name, m in (("formats", formats), ("headers", headers)):
    extra = sorted(set(m) - set(columns))
    if extra:
      raise ValueError(f"{name} names {extra}, which are not in columns={list(columns)!r}")
  head = [headers.get(c, c) for c in columns]
  lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in columns) + "|"]
  for r in rows:
    lines.append("| " + " | ".join(_cell(r.get(c), formats.get(c)) for c in columns) + " |")
  return "\n".join(lines) + "\n"


def plot(rows: Sequence[Mapping], *, x: str, y: str, series: str | None, path: str,
         xlabel: str, ylabel: str, title: str, style: str | None = None,
         references: Mapping[str, float] | None = None, xscale: str = "linear") -> str:
  """A line plot of `y` against `x`, one line per value of `series`, saved as a PNG at `path`.

  Args:
    series: the field whose values split rows into lines (in order of first appearance);
      None draws one line.
    style: a field constant within each series whose values pick marker and line style,
      so that many lines stay tellable apart (e.g. series = recipe, style = method).
    references: label -> y value, drawn as black horizontal lines (e.g. a baseline).
    xscale: one of `XSCALES`; "log2" puts ticks at the x values.
  """
  if not rows:
    raise ValueError("rows=[] holds nothing to plot")
  if xscale not in XSCALES:
    raise ValueError(f"xscale={xscale!r}; valid: {XSCALES}")
  for i, r in enumerate(rows):
    for name, field in (("x", x), ("y", y), ("series", series), ("style", style)):
      if field is not None and field not in r:
        raise ValueError(f"{name}={field!r} is not a field of rows[{i}] (fields: {sorted(r)})")
    for name, field in (("x", x), ("y", y)):
      if not isinstance(r[field], (int, float)) or isinstance(r[field], bool):
        raise ValueError(f"{name}={field!r}: rows[{i}][{field!r}]={r[field]!r} is not a number")
  groups: dict[Any, list[Mapping]] = {}
  for r in rows:
    groups.setdefault(r[series] if series is not None else y, []).append(r)
  styles = list(dict.fromkeys(r[style] for r in rows)) if style is not None else [None]
  colors = plt.get_cmap("tab10" if len(groups) <= 10 else "tab20").colors
  n_entries = len(groups) + len(references or {})
  fig, ax = plt.subplots(figsize=(7 + 2.5 * (n_entries > 6), 4.5), dpi=120)
  for i, (name, group) in enumerate(groups.items()):
    group = sorted(group, key=lambda r: r[x])
    j = styles.index(group[0][style]) if style is not None else 0
    ax.plot([r[x] for r in group], [r[y] for r in group], color=colors[i % len(colors)],
            marker=_MARKERS[j % len(_MARKERS)], linestyle=_LINES[j % len(_LINES)],
            label=str(name))
  for label, value in (references or {}).items():
    if not math.isfinite(value):
      raise ValueError(f"references[{label!r}]={value!r} must be a finite number")
    ax.axhline(value, color="black", linestyle=(0, (5, 5)), linewidth=1, label=label)
  if xscale == "log2":
    ax.set_xscale("log", base=2)
    ticks = sorted({r[x] for r in rows})
    ax.set_xticks(ticks, [format(t, "g") for t in ticks])
  elif xscale == "log":
    ax.set_xscale("log")
  ax.set(xlabel=xlabel, ylabel=ylabel, title=title)
  ax.grid(True, alpha=0.3)
  if n_entries > 6:  # beside the axes, where it hides no line
    ax.legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.01, 1.0))
  else:
    ax.legend(fontsize="small")
  fig.tight_layout()
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  fig.savefig(path)
  plt.close(fig)
  return path

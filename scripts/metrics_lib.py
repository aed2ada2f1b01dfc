"""Metric sinks for training: JSONL, TensorBoard, and a progress line with rate and ETA."""

from __future__ import annotations

import json
import math
import os
import sys
import time

from tensorboardX import SummaryWriter


class MetricWriter:
  """Writes `{"step", "split", **scalars}` records to `metrics.jsonl` and TensorBoard."""

  def __init__(self, workdir: str, resume_step: int = 0):
    self.path = os.path.join(workdir, "metrics.jsonl")
    _truncate_after(self.path, resume_step)
    self._file = open(self.path, "a")
    self._tb = SummaryWriter(os.path.join(workdir, "tb"))

  def write(self, step: int, split: str, scalars: dict[str, float]) -> None:
    record = {"step": int(step), "split": split}
    record.update({k: float(v) for k, v in scalars.items()})
    self._file.write(json.dumps(record) + "\n")
    self._file.flush()
    for k, v in scalars.items():
      self._tb.add_scalar(f"{split}/{k}", float(v), int(step))

  def close(self) -> None:
    self._file.close()
    self._tb.close()


def _records(path: str) -> list[tuple[bytes, dict]]:
  """(line, record) of every record of a JSONL log, in order.

  The log is append-only, so a kill mid-write can leave a torn last line: it is dropped with
  a one-line warning naming the file (resume rewrites the log without it). A malformed line
  before the last is real damage: ValueError naming the file and line number.
  """
  with open(path, "rb") as f:  # bytes: a torn multi-byte character is just a bad line
    lines = [(n, ln) for n, ln in enumerate(f, 1) if ln.strip()]
  out = []
  for i, (n, ln) in enumerate(lines):
    try:
      record = json.loads(ln)
      if not isinstance(record, dict) or not isinstance(record.get("step"), int):
        raise ValueError("not a {\"step\": int, ...} record")
    except ValueError as e:
      reason = (f"{e.msg} at column {e.colno}" if isinstance(e, json.JSONDecodeError)
                else str(e))
      if i == len(lines) - 1:
        print(f"warning: {path}: dropping the torn last line {n} ({reason}; an interrupted "
              "write)", file=sys.stderr, flush=True)
        break
      raise ValueError(f"{path} line {n} is malformed ({reason}); only a torn last line is "
                       "recoverable") from None
    out.append((ln if ln.endswith(b"\n") else ln + b"\n", record))
  return out


def _truncate_after(path: str, step: int) -> None:
  """Drops records past `step` left by an interrupted run, so a resumed log reads cleanly."""
  if not os.path.exists(path):
    return
  lines = [ln for ln, r in _records(path) if r["step"] <= step]
  with open(path + ".tmp", "wb") as f:  # atomic: a kill here leaves the old log whole
    f.writelines(lines)
  os.replace(path + ".tmp", path)


def read_metrics(workdir: str, split: str | None = None) -> list[dict]:
  """The records of `metrics.jsonl`, optionally of one split (a torn last line dropped)."""
  records = [r for _, r in _records(os.path.join(workdir, "metrics.jsonl"))]
  return [r for r in records if split is None or r.get("split") == split]


def _hms(seconds: float) -> str:
  if not math.isfinite(seconds):
    return "?"
  s = int(seconds)
  if s >= 3600:
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"
  return f"{s // 60}:{s % 60:02d}"


class Progress:
  """A one-line progress report (bar, step rate, tokens/s, elapsed, ETA) on stderr."""

  def __init__(self, total: int, initial: int = 0, stream=None, width: int = 20):
    self.total, self.initial, self.width = total, initial, width
    self.stream = stream or sys.stderr
    self.t0 = time.perf_counter()

  def update(self, step: int, text: str = "") -> str:
    elapsed = time.perf_counter() - self.t0
    done = step - self.initial
    rate = done / elapsed if elapsed > 0 and done > 0 else float("nan")
    eta = (self.total - step) / rate if rate > 0 else float("nan")
    frac = step / max(self.total, 1)
    bar = "#" * int(frac * self.width) + "-" * (self.width - int(frac * self.width))
    line = (f"[{bar}] {step}/{self.total} {frac:4.0%} | {rate:.2f} step/s | "
            f"{_hms(elapsed)} elapsed, ETA {_hms(eta)} | {text}")
    self.stream.write(line + "\n")
    self.stream.flush()
    return line

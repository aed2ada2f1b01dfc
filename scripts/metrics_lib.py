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


def _truncate_after(path: str, step: int) -> None:
  """Drops records past `step` left by an interrupted run, so a resumed log reads cleanly."""
  if not os.path.exists(path):
    return
  with open(path) as f:
    lines = [ln for ln in f if ln.strip() and json.loads(ln)["step"] <= step]
  with open(path, "w") as f:
    f.writelines(lines)


def read_metrics(workdir: str, split: str | None = None) -> list[dict]:
  """The records of `metrics.jsonl`, optionally of one split."""
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    records = [json.loads(ln) for ln in f if ln.strip()]
  return [r for r in records if split is None or r["split"] == split]


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

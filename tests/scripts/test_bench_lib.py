"""bench_lib: timing order and minima under a fake clock, the writer, machine info, commands."""

import json
import os

import pytest
from absl import flags

from scripts.bench import bench_lib


class FakeClock:
  """A perf_counter that only moves when a timed function says how long it took."""

  def __init__(self):
    self.now = 0.0

  def __call__(self):
    return self.now

  def spend(self, seconds):
    self.now += seconds


@pytest.fixture
def clock(monkeypatch):
  c = FakeClock()
  monkeypatch.setattr(bench_lib.time, "perf_counter", c)
  return c


def test_timed_waits_for_the_result(clock):
  class Pending:  # stands in for an asynchronously dispatched jax array
    def block_until_ready(self):
      clock.spend(0.5)
      return self

  def fn():
    clock.spend(0.25)
    return Pending()

  seconds, out = bench_lib.timed(fn)
  assert seconds == pytest.approx(0.75)
  assert isinstance(out, Pending)


def test_best_of_is_the_minimum_and_returns_the_last_result(clock):
  durations = iter([0.03, 0.01, 0.02])
  calls = []

  def fn():
    clock.spend(next(durations))
    calls.append(len(calls))
    return len(calls)

  best, out = bench_lib.best_of(fn, 3)
  assert best == pytest.approx(0.01)
  assert out == 3 and calls == [0, 1, 2]
  times, _ = bench_lib.repeat_times(lambda: clock.spend(0.004), 2)
  assert times == pytest.approx([0.004, 0.004])
  with pytest.raises(ValueError, match="repeats=0"):
    bench_lib.best_of(fn, 0)


def test_interleaved_takes_turns_and_keeps_the_minimum(clock):
  # durations[(method, input)] per repeat: each pair's best is in a different repeat.
  durations = {("a", 10): [3.0, 1.0], ("a", 20): [2.0, 5.0],
               ("b", 10): [0.5, 4.0], ("b", 20): [6.0, 7.0]}
  calls = []

  def method(name):
    def run(x):
      clock.spend(durations[name, x][sum(c == (name, x) for c in calls)])
      calls.append((name, x))
      return f"{name}{x}#{len(calls)}"
    return run

  logs = []
  best, outs = bench_lib.interleaved({"a": method("a"), "b": method("b")}, [10, 20], 2,
                                     warm_up=False, log=logs.append)
  assert calls == [("a", 10), ("b", 10), ("a", 20), ("b", 20)] * 2
  assert best == {"a": [1.0, 2.0], "b": [0.5, 6.0]}
  assert outs == {("a", 0): "a10#5", ("b", 0): "b10#6", ("a", 1): "a20#7", ("b", 1): "b20#8"}
  assert logs == ["repeat 1/2: a 5.00s", "repeat 2/2: a 3.00s"]


def test_interleaved_warm_up_runs_each_method_once_untimed(clock):
  calls = []

  def method(name):
    def run(x):
      calls.append((name, x))
      clock.spend(100.0 if len(calls) <= 2 else 1.0)  # the two warm-up calls are slow
    return run

  logs = []
  best, _ = bench_lib.interleaved({"a": method("a"), "b": method("b")}, [1, 2], 1,
                                  log=logs.append)
  assert calls[:2] == [("a", 1), ("b", 1)]
  assert calls[2:] == [("a", 1), ("b", 1), ("a", 2), ("b", 2)]
  assert best == {"a": [1.0, 1.0], "b": [1.0, 1.0]}
  assert logs[:2] == ["compiling a", "compiling b"]


def test_write_results_writes_json_and_markdown(tmp_path):
  out = str(tmp_path / "new" / "folder" / "bench_x")
  result = {"machine": "m", "rows": [{"a": 1.5, "ok": True, "none": None}]}
  logs = []
  paths = bench_lib.write_results(out, result, "# Title\n\n| a |\n", log=logs.append)
  assert paths == (out + ".json", out + ".md")
  with open(out + ".json") as f:
    assert json.load(f) == result
  with open(out + ".md") as f:
    assert f.read() == "# Title\n\n| a |\n"
  assert logs[0] == "# Title\n\n| a |"
  assert out + ".md" in logs[-1]


def test_write_results_without_markdown_writes_only_json(tmp_path):
  out = str(tmp_path / "only")
  assert bench_lib.write_results(out, {"x": 1}, None, log=lambda s: None) == (out + ".json",)
  assert os.listdir(tmp_path) == ["only.json"]


def test_machine_info_describes_this_machine():
  info = bench_lib.machine_info()
  assert set(info) == {"machine", "backend", "jax", "python", "cpu_count", "load_avg_1m"}
  assert info["cpu_count"] == os.cpu_count()
  assert isinstance(info["load_avg_1m"], float)
  json.dumps(info)  # stored in every results file
  if info["backend"] == "cpu":
    assert info["machine"].startswith(f"{os.cpu_count()}-core CPU container (")
    assert info["machine"].endswith("), no accelerator")


def test_command_line_spells_the_flags():
  fv = flags.FlagValues()
  flags.DEFINE_list("xs", ["1"], "", flag_values=fv)
  flags.DEFINE_bool("hf", True, "", flag_values=fv)
  flags.DEFINE_string("workdir", None, "", flag_values=fv)
  flags.DEFINE_string("out", "docs/x", "", flag_values=fv)
  fv(["prog", "--xs=3,5", "--nohf", "--out=/tmp/a b"])
  cmd = bench_lib.command_line("scripts.bench.x", ("xs", "hf", "workdir", "out"), fv)
  assert cmd == "python -m scripts.bench.x --xs=3,5 --hf=false --out='/tmp/a b'"


def test_int_list_parses_or_names_the_flag():
  assert bench_lib.int_list("m", ["1", "16"]) == [1, 16]
  for bad in (["0"], ["x"], []):
    with pytest.raises(ValueError, match="--m=.* must be a list of integers >= 1"):
      bench_lib.int_list("m", bad)


def test_stream_bandwidth_reads_the_probe_once_per_timing():
  rate, nbytes = bench_lib.stream_bandwidth(nbytes=4 << 20, repeats=2)
  assert nbytes == 4 << 20
  assert 1e6 < rate < 1e13  # bytes/s: a real measurement, not a constant

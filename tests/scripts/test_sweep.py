"""Sweeps: resume == uninterrupted, clear argument errors, table + PNG, the compress sweep."""

import json
import os
import subprocess
import sys

import jax
import pytest

import model
from scripts import checkpoint_lib, compress_sweep_lib, sweep_lib
from scripts.configs.sweeps import compress as compress_config

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
GRID = [dict(a=a, b=b, note="x") for a in (1, 2, 3) for b in (0.5, 1.5)]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _metrics(point):
  return {"score": point["a"] * 10 + point["b"], "tag": [point["a"], "t"]}


class Counter:
  """An evaluate() that counts its calls and can fail on the n-th (a simulated kill)."""

  def __init__(self, fail_on=None):
    self.calls, self.fail_on = [], fail_on

  def __call__(self, point):
    self.calls.append(point)
    if len(self.calls) == self.fail_on:
      raise KeyboardInterrupt("killed")
    return _metrics(point)


def _lines(path):
  with open(path) as f:
    return [json.loads(line) for line in f.read().splitlines()]


@pytest.fixture
def uninterrupted(tmp_path):
  return sweep_lib.run_grid(GRID, _metrics, str(tmp_path / "ref.jsonl"), key_fields=("a", "b"),
                            log=lambda s: None)


def test_resume_after_a_failed_point_evaluates_only_the_missing(tmp_path, uninterrupted):
  path = str(tmp_path / "r.jsonl")
  with pytest.raises(KeyboardInterrupt):
    sweep_lib.run_grid(GRID, Counter(fail_on=3), path, key_fields=("a", "b"), log=lambda s: None)
  assert len(_lines(path)) == 2
  again = Counter()
  rows = sweep_lib.run_grid(GRID, again, path, key_fields=("a", "b"), log=lambda s: None)
  assert again.calls == GRID[2:]
  assert rows == uninterrupted and _lines(path) == uninterrupted


def test_resume_drops_a_truncated_last_line(tmp_path, uninterrupted):
  path = str(tmp_path / "r.jsonl")
  sweep_lib.run_grid(GRID, _metrics, path, key_fields=("a", "b"), log=lambda s: None)
  with open(path) as f:
    text = f.read()
  with open(path, "w") as f:
    f.write(text[:-7])  # a kill in the middle of writing the last record
  again = Counter()
  rows = sweep_lib.run_grid(GRID, again, path, key_fields=("a", "b"), log=lambda s: None)
  assert again.calls == GRID[-1:]
  assert rows == uninterrupted and _lines(path) == uninterrupted
  assert not os.path.exists(path + ".tmp")


def test_complete_file_evaluates_nothing_and_keeps_other_records(tmp_path, uninterrupted):
  path = str(tmp_path / "r.jsonl")
  with open(path, "w") as f:
    f.write(json.dumps(dict(a=9, b=9.0, score=0)) + "\n")  # another grid's point
  sweep_lib.run_grid(GRID, _metrics, path, key_fields=("a", "b"), log=lambda s: None)
  log = []
  again = Counter()
  rows = sweep_lib.run_grid(GRID[::-1], again, path, key_fields=("a", "b"), log=log.append)
  assert again.calls == [] and rows == uninterrupted[::-1]
  assert len(_lines(path)) == len(GRID) + 1
  assert "6 already in" in log[0] and "0 to evaluate" in log[0]


def test_progress_lines_show_count_rate_and_eta(tmp_path):
  log = []
  sweep_lib.run_grid(GRID[:2], _metrics, str(tmp_path / "r.jsonl"), key_fields=("b",),
                     log=log.append)
  assert log[-1].startswith("[2/2] ") and "s/point" in log[-1] and "ETA 0 s" in log[-1]


def test_a_corrupt_line_before_the_end_is_an_error(tmp_path):
  path = tmp_path / "r.jsonl"
  path.write_text('{"a": 1, "b": 0.5}\n{"a": 1, "b\n{"a": 2, "b": 0.5}\n')
  with pytest.raises(ValueError, match="line 2 is not JSON and is not the last line"):
    sweep_lib.run_grid(GRID, _metrics, str(path), key_fields=("a", "b"))


@pytest.mark.parametrize("points, key_fields, evaluate, match", [
    ([], ("a",), _metrics, r"points=\[\] must be a non-empty list"),
    (GRID, (), _metrics, r"key_fields=\(\) must be a non-empty sequence"),
    (GRID, "a", _metrics, r"key_fields='a' must be a non-empty sequence"),
    (GRID, ("a", "c"), _metrics, r"\['c'\] not in points\[0\]"),
    (GRID, ("a",), _metrics, r"points\[0\] and points\[1\] have the same key \[1\]"),
    ([dict(a=1, f=object())], ("a",), _metrics, "is not JSON-able"),
    (GRID, ("a", "b"), lambda p: {"a": 0}, "overwrite key fields"),
    (GRID, ("a", "b"), lambda p: {"v": object()}, "not JSON-able"),
    (GRID, ("a", "b"), lambda p: 1.0, "expected a dict of metrics"),
])
def test_bad_arguments_raise_clear_errors(tmp_path, points, key_fields, evaluate, match):
  path = str(tmp_path / "r.jsonl")
  with pytest.raises(ValueError, match=match):
    sweep_lib.run_grid(points, evaluate, path, key_fields=key_fields, log=lambda s: None)
  assert not os.path.exists(path) or _lines(path) == []


def test_markdown_table():
  rows = [dict(name="a|b", v=0.123456, n=3), dict(name="c", v=2.0)]
  table = sweep_lib.markdown_table(rows, ["name", "v", "n"], formats={"v": ".2f"},
                                   headers={"v": "value"})
  assert table.splitlines() == ["| name | value | n |", "|---|---|---|",
                                "| a\\|b | 0.12 | 3 |", "| c | 2.00 |  |"]
  assert sweep_lib.markdown_table([dict(x=1 / 3)], ["x"]).splitlines()[-1] == "| 0.3333 |"
  with pytest.raises(ValueError, match=r"formats names \['w'\], which are not in columns"):
    sweep_lib.markdown_table(rows, ["name"], formats={"w": ".1f"})
  with pytest.raises(ValueError, match="columns=.* must be a non-empty sequence"):
    sweep_lib.markdown_table(rows, [])


def test_plot_writes_a_png(tmp_path):
  rows = [dict(x=x, y=x * x, s=s) for s in ("p", "q") for x in (2, 4, 8)]
  path = sweep_lib.plot(rows, x="x", y="y", series="s", path=str(tmp_path / "d" / "p.png"),
                        xlabel="x", ylabel="y", title="t", references={"ref": 3.0},
                        xscale="log2")
  with open(path, "rb") as f:
    data = f.read()
  assert data.startswith(PNG_MAGIC) and len(data) > 5000
  with pytest.raises(ValueError, match=r"y='z' is not a field of rows\[0\]"):
    sweep_lib.plot(rows, x="x", y="z", series="s", path=path, xlabel="", ylabel="", title="")
  with pytest.raises(ValueError, match=r"x='s': rows\[0\]\['s'\]='p' is not a number"):
    sweep_lib.plot(rows, x="s", y="y", series=None, path=path, xlabel="", ylabel="", title="")
  with pytest.raises(ValueError, match="xscale='exp'; valid"):
    sweep_lib.plot(rows, x="x", y="y", series="s", path=path, xlabel="", ylabel="", title="",
                   xscale="exp")


@pytest.fixture(scope="module")
def source(tmp_path_factory):
  src = tmp_path_factory.mktemp("src")
  cfg = model.get_preset("test")
  checkpoint_lib.save_params(str(src), model.init(cfg, jax.random.key(0)), cfg, step=0)
  with open(src / "config.json", "w") as f:  # the data section a training run would save
    json.dump({"data": {"seq_len": 32, "batch_size": 4}}, f)
  return str(src)


def _config(source, **eval_kw):
  c = compress_config.get_config("smoke")
  with c.unlocked():
    c.source = source
    c.eval.update(eval_kw)
  return c


def by_nm_sparsity(rows):
  return {r["sparsity"] for r in rows if r["method"].endswith("N:M")}


def test_compress_sweep_end_to_end_and_resume(source, tmp_path):
  config = _config(source)
  out = str(tmp_path / "sweep")
  result = compress_sweep_lib.run(config, out)
  rows = result["rows"]
  assert len(rows) == (1 + 2 * 3) * 2 == result["evaluated"]  # dense + 2 methods x (2 + 2:4)
  assert by_nm_sparsity(rows) == {0.5}
  by = {(r["prune"], r["quant"]): r for r in rows}
  dense = by["none", "none"]
  assert dense["bits"] == 32 and dense["sparsity_achieved"] == 0.0
  assert by["none", "int8"]["bits"] == 8
  for s in (0.25, 0.5):
    mag = by[f"magnitude:{s:g}", "none"]
    assert mag["sparsity_achieved"] == pytest.approx(s, abs=1e-3)
    assert mag["nonzeros"] < dense["nonzeros"] and mag["param_bytes"] == dense["param_bytes"]
  for prune in {r["prune"] for r in rows}:
    fl, q8 = by[prune, "none"], by[prune, "int8"]
    assert q8["param_bytes"] < fl["param_bytes"]
    assert abs(q8["bpb"] - fl["bpb"]) < 0.01, prune
  assert all(r["params"] == dense["params"] for r in rows)
  for name in ("results.md", "config.json", "bpb_vs_sparsity.png", "bpb_vs_bits.png"):
    assert os.path.getsize(os.path.join(out, name)) > 0
  with open(os.path.join(out, "results.md")) as f:
    md = f.read()
  assert "| none | none | float | 32 |" in md and md.count("\n| ") == len(rows) + 1
  again = compress_sweep_lib.run(config, out)
  assert again["evaluated"] == 0 and again["rows"] == rows
  with pytest.raises(ValueError, match=r"holds a sweep with different \['eval'\]"):
    compress_sweep_lib.run(_config(source, max_batches=1), out)


@pytest.mark.parametrize("field, value, match", [
    ("source", "", "config.source='' must be a run folder"),
    ("source", "/no/such/run", "holds no checkpoint"),
    ("grid.prune_methods", ("magnitude", "nope"), "unknown pruning method 'nope'"),
    ("grid.prune_methods", ("random", "random"), r"repeats \['random'\]"),
    ("grid.sparsities", (0.5, 1.0),
     r"config.grid.sparsities: .*'magnitude:1'=1.0 is outside the valid range \[0, 1\)"),
    ("grid.quant_recipes", ("none", "int3"),
     "config.grid.quant_recipes: .*unknown format 'int3'"),
    ("grid.quant_recipes", ("int8", "INT8"), r"repeats \['int8'\]"),
    ("grid.quant_recipes", (), "quant_recipes=\\(\\) is empty"),
    ("eval.split", "dev", "config.eval.split='dev'; valid"),
    ("eval.max_batches", -1, "config.eval.max_batches=-1 must be an int >= 0"),
])
def test_bad_config_fails_before_loading(source, field, value, match):
  c = _config(source)
  with c.unlocked():
    section, _, name = field.rpartition(".")
    (c[section] if section else c)[name] = value
  with pytest.raises(ValueError, match=match):
    compress_sweep_lib.validate(c)


def test_main_reports_a_bad_config_as_one_error_line(source, tmp_path):
  cmd = [sys.executable, "-m", "scripts.sweeps.compress",
         "--config=scripts/configs/sweeps/compress.py:smoke", f"--config.source={source}",
         "--config.grid.prune_methods=nope", f"--workdir={tmp_path / 'out'}"]
  proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120,
                        env={**os.environ, "PYTHONPATH": ROOT})
  errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
  assert proc.returncode == 2, proc.stderr
  assert len(errors) == 1 and "unknown pruning method 'nope'" in errors[0]
  assert not os.path.exists(tmp_path / "out")


def test_quant_sweep_methods_extra_checkpoints_and_plots(source, tmp_path):
  import quant
  cfg = model.get_preset("test")
  params = checkpoint_lib.load_params(source)[0]
  extra = str(tmp_path / "extra")
  checkpoint_lib.save_params(extra, quant.quantize(params, "int4:g32")[0], cfg, step=0)
  c = compress_config.get_config("quant")
  with c.unlocked():
    c.source, c.calib_seqs = source, 2
    c.eval.max_batches = 1
    c.grid.quant_recipes = ("none", "int4:g32", "int4:g32:gptq", "w8a8:smoothquant",
                            "int4:g32@first_last")
    c.extra = (f"qat:int4={extra}",)
  out = str(tmp_path / "sweep")
  result = compress_sweep_lib.run(c, out)
  by = {r["quant"]: r for r in result["rows"]}
  assert [by[q]["quant_method"] for q in ("none", "int4:g32", "int4:g32:gptq",
                                          "w8a8:smoothquant", "int4:g32@first_last",
                                          "qat:int4")] == [
      "float", "rtn", "gptq", "w8a8 smoothquant", "rtn@first_last", "qat"]
  # the extra checkpoint is the RTN tree, evaluated alike
  assert by["qat:int4"]["bpb"] == pytest.approx(by["int4:g32"]["bpb"], abs=1e-6)
  assert by["int4:g32@first_last"]["bits"] == 8  # 2 layers: both ends at int8
  assert by["int4:g32"]["bits"] == 4 and by["w8a8:smoothquant"]["bits"] == 8
  for name in ("bpb_vs_bits.png", "bpb_vs_bytes.png"):
    with open(os.path.join(out, name), "rb") as f:
      assert f.read(8) == PNG_MAGIC
  with c.unlocked():
    c.extra = ("no_equals_sign",)
  with pytest.raises(ValueError, match="LABEL=RUN_FOLDER"):
    compress_sweep_lib.validate(c)

"""The large-sparse vs small-dense sweep: smoke grid end to end, resume, bad grids."""

import os

import pytest

from scripts import gradual_sweep_lib
from scripts.configs.sweeps import gradual


def test_smoke_grid_and_resume(tmp_path):
  config = gradual.get_config("smoke")
  out = str(tmp_path / "sweep")
  result = gradual_sweep_lib.run(config, out)
  by = {r["kind"]: r for r in result["rows"]}
  assert by["gradual"]["sparsity_achieved"] == pytest.approx(0.5)
  assert by["gradual"]["nonzeros"] < by["gradual"]["params"]
  assert by["dense"]["nonzeros"] == by["dense"]["params"] and by["dense"]["bpb"] > 0
  assert os.path.getsize(os.path.join(out, "bpb_vs_nonzeros.png")) > 0
  again = gradual_sweep_lib.run(config, out)
  assert again["rows"] == result["rows"]


@pytest.mark.parametrize("field,value,match", [
    ("grid.sparsities", (1.5,), r"\[0, 1\)"), ("grid.dense_widths", (30,), "divisible"),
])
def test_bad_grid(field, value, match, tmp_path):
  config = gradual.get_config("smoke")
  section, name = field.split(".")
  with config.unlocked():
    config[section][name] = value
  with pytest.raises(ValueError, match=match):
    gradual_sweep_lib.run(config, str(tmp_path / "x"))
  assert not os.path.exists(tmp_path / "x")

"""autotune_kernels: candidates are legal, a tiny interpreted run writes a table that
`tuning.lookup` reads back, and the committed table is protected from interpret timings."""

import json

import jax
import pytest

from pallas_kernels import lowbit, tuning
from scripts.bench import autotune_kernels as at


def test_candidates_are_distinct_and_legal():
  for platform in ("tpu", "gpu"):
    for kernel, bits, g in (("weight_only", 4, 128), ("weight_only", 8, None),
                            ("w8a8", 8, None)):
      cands = at.candidates(kernel, platform, 16, 2048, 8192, bits=bits, group_size=g,
                            interpret=False)
      assert len(cands) > 1
      fitted = [tuple(c.values()) for c in cands]
      assert len(set(fitted)) == len(fitted)
      for c in cands:
        assert lowbit.fit_blocks(kernel, platform, 16, 2048, 8192, bits=bits, group_size=g,
                                 compiled=True, **c) == tuple(c.values())


def test_interpret_run_round_trips_through_lookup(tmp_path):
  path = str(tmp_path / "blocks.json")
  cases = at.cases([(64, 48)], [3], [4], [0, 32], w8a8=True)
  assert [c[0] for c in cases] == ["weight_only", "weight_only", "w8a8"]
  lines = []
  table = at.autotune(cases, path=path, dtype="float32", iters=1, interpret=True,
                      log=lines.append)
  with open(path) as f:
    assert json.load(f) == table
  kind = jax.devices()[0].device_kind
  for kernel, M, K, N, bits, g in cases:
    entry = table["devices"][kind][tuning.shape_key(kernel, K, N, bits=bits, group_size=g,
                                                    platform="tpu")][str(tuning.m_bucket(M))]
    got = tuning.lookup(kernel, M, K, N, bits=bits, group_size=g, platform="tpu", path=path)
    assert got == {k: entry[k] for k in tuning.BLOCK_KEYS}
    assert entry["seconds"] > 0
  assert any("wrote" in line for line in lines)
  # A second run keeps the entries it does not retune.
  at.autotune(cases[:1], path=path, dtype="float32", iters=1, interpret=True,
              log=lines.append)
  assert len(tuning.read_table(path)["devices"][kind]) == 3


def test_interpret_refuses_the_committed_table():
  with pytest.raises(ValueError, match="may not go into the committed table"):
    at.autotune([], path=tuning.TABLE_PATH, interpret=True)


def test_parse_shape():
  assert at.parse_shape("2048x8192") == (2048, 8192)
  with pytest.raises(ValueError, match="must be KxN"):
    at.parse_shape("2048")

r"""Peak memory of Hugging Face import: python -m scripts.bench.convert [--preset=llama-3.2-1b].

Writes a random checkpoint with the preset's shapes in the Hugging Face layout
(bf16, sharded at --shard_gb, or one file), then imports it in a fresh process
per case and reports the peak resident memory added by `model.convert.load_hf`
(VmHWM after resetting it, minus the resident memory before the call) divided by
the bytes of the params it returns. Rows: bf16 -> bf16 and bf16 -> f32, sharded
and single-file, plus `safetensors.numpy.load_file` of every shard (the naive
whole-checkpoint read) for context. Saves a table to --out as JSON, and beside
it as markdown (.md).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile

import numpy as np
from absl import flags

from model import convert, get_preset, transformer
from model.convert import safetensors_io as st
from scripts import cli_lib
from scripts.bench import bench_lib

_PRESET = flags.DEFINE_string("preset", "llama-3.2-1b", "model.get_preset name to mimic.")
_SHARD_GB = flags.DEFINE_float("shard_gb", 1.0, "Shard size of the sharded checkpoint, GiB.")
_CKPT = flags.DEFINE_string("ckpt_root", None, "Where to write the checkpoints (default: tmp).")
_OUT = flags.DEFINE_string("out", "docs/bench_convert.json",
                           "JSON output path (the markdown goes beside it, .md).")
_MEASURE = flags.DEFINE_string("measure", None, "Internal: measure one import of this dir.")
_MODE = flags.DEFINE_enum("mode", "load_hf", ["load_hf", "load_file"], "Internal.")
_PARAM_DTYPE = flags.DEFINE_string("param_dtype", "bfloat16", "Internal.")


def _status(key: str) -> int:
  with open("/proc/self/status") as f:
    for line in f:
      if line.startswith(key + ":"):
        return int(line.split()[1]) * 1024
  raise RuntimeError(f"{key} not in /proc/self/status")


def _measure(path: str, mode: str, param_dtype: str) -> dict:
  import jax

  jax.devices()  # backend start-up is not part of the import
  base = _status("VmRSS")
  try:  # resets VmHWM to the current RSS (Linux >= 4.0)
    with open("/proc/self/clear_refs", "w") as f:
      f.write("5")
    reset = True
  except OSError:
    reset = False
  if mode == "load_hf":
    seconds, (_, params) = bench_lib.timed(lambda: convert.load_hf(path, param_dtype=param_dtype))
  else:
    from safetensors.numpy import load_file

    def read_all():
      tensors = {}
      for name in sorted(os.listdir(path)):
        if name.endswith(".safetensors"):
          tensors.update(load_file(os.path.join(path, name)))
      return tensors

    seconds, params = bench_lib.timed(read_all)
  nbytes = sum(int(x.nbytes) for x in jax.tree.leaves(params))
  peak = _status("VmHWM") - base
  return {"params_bytes": nbytes, "peak_extra_bytes": peak, "peak_over_params": peak / nbytes,
          "seconds": seconds, "peak_reset": reset}


def _write_checkpoint(cfg, path: str, shard_bytes: int) -> int:
  """A random bf16 checkpoint with cfg's shapes, written one tensor at a time."""
  import ml_dtypes

  shapes = transformer.param_shapes(cfg)
  rng = np.random.default_rng(0)
  bf16 = np.dtype(ml_dtypes.bfloat16)
  tensors = []
  for name, p, transposed in convert.name_map(cfg):
    leaf = shapes
    for k in p:
      leaf = leaf[k]
    shape = tuple(leaf.shape)[::-1] if transposed else tuple(leaf.shape)
    fetch = (lambda s=shape: (rng.standard_normal(s, np.float32) * 0.02).astype(bf16))
    tensors.append(st.PlannedTensor(name, bf16, shape, fetch))
  os.makedirs(path, exist_ok=True)
  st.write_sharded(path, tensors, shard_bytes)
  with open(os.path.join(path, "config.json"), "w") as f:
    json.dump(convert.to_hf_config(cfg, dtype="bfloat16"), f)
  return sum(t.nbytes for t in tensors)


def _run_child(path: str, mode: str, param_dtype: str) -> dict:
  cmd = [sys.executable, "-m", "scripts.bench.convert", f"--measure={path}", f"--mode={mode}",
         f"--param_dtype={param_dtype}"]
  out = subprocess.run(cmd, check=True, capture_output=True, text=True)
  return json.loads(out.stdout.strip().splitlines()[-1])


def markdown(result: dict) -> str:
  """The rows as a markdown table."""
  gib = lambda b: f"{b / 2**30:.2f}"
  lines = [f"# Peak memory of Hugging Face import (preset `{result['preset']}`)", "",
           f"Machine: {result['machine']}; jax {result['jax']}. Command: "
           f"`{result['command']}`", "",
           "| reader | layout | params dtype | params GiB | peak extra GiB | peak / params | s |",
           "|---|---|---|---:|---:|---:|---:|"]
  for r in result["rows"]:
    lines.append(f"| {r['reader']} | {r['layout']} | {r['param_dtype']} | "
                 f"{gib(r['params_bytes'])} | {gib(r['peak_extra_bytes'])} | "
                 f"{r['peak_over_params']:.3f} | {r['seconds']:.1f} |")
  lines += ["", result["note"] + "."]
  return "\n".join(lines) + "\n"


def main():
  if _MEASURE.value:
    print(json.dumps(_measure(_MEASURE.value, _MODE.value, _PARAM_DTYPE.value)))
    return
  if _SHARD_GB.value <= 0:
    raise ValueError(f"--shard_gb={_SHARD_GB.value} must be > 0")
  cfg = get_preset(_PRESET.value)
  root = _CKPT.value or tempfile.mkdtemp(prefix="bench_convert_")
  dirs = {"sharded": os.path.join(root, "sharded"), "single": os.path.join(root, "single")}
  for kind, shard in (("sharded", int(_SHARD_GB.value * 2**30)), ("single", 2**62)):
    if not os.path.isfile(os.path.join(dirs[kind], "config.json")):
      seconds, size = bench_lib.timed(lambda: _write_checkpoint(cfg, dirs[kind], shard))
      print(f"wrote {kind} checkpoint ({size / 2**30:.2f} GiB) in {seconds:.0f}s")
  cases = [("load_hf", "sharded", "bfloat16"), ("load_hf", "single", "bfloat16"),
           ("load_hf", "sharded", "float32"), ("load_file", "sharded", "bfloat16")]
  rows = []
  print(f"{'reader':10} {'layout':8} {'params':9} {'GiB':>6} {'peak+GiB':>9} {'peak/params':>12}"
        f" {'s':>6}")
  for mode, kind, dtype in cases:
    r = {"reader": mode, "layout": kind, "param_dtype": dtype,
         **_run_child(dirs[kind], mode, dtype)}
    rows.append(r)
    print(f"{mode:10} {kind:8} {dtype:9} {r['params_bytes'] / 2**30:6.2f} "
          f"{r['peak_extra_bytes'] / 2**30:9.2f} {r['peak_over_params']:12.3f} "
          f"{r['seconds']:6.1f}")
  # Only now, after the children: starting a GPU backend here would preallocate the device
  # memory they need.
  result = {**bench_lib.machine_info(), "preset": _PRESET.value, "shard_gb": _SHARD_GB.value,
            "command": bench_lib.command_line("scripts.bench.convert",
                                              ("preset", "shard_gb", "ckpt_root", "out")),
            "note": "peak_extra_bytes: VmHWM during the import minus VmRSS before it; "
                    "seconds are noisy on a shared machine, memory is not",
            "rows": rows}
  bench_lib.write_results(os.path.splitext(_OUT.value)[0], result, markdown(result))


if __name__ == "__main__":
  cli_lib.run(main)

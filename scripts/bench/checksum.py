r"""What checkpoint checksums cost: save and restore with and without them.

  python -m scripts.bench.checksum                       # ~1 min on 2 cores
  python -m scripts.bench.checksum --preset=smollm-135m --dtype=bfloat16

Random weights of a preset (drawn with NumPy on `model.param_shapes`, no compile) are
saved as a params checkpoint (`model.checkpoint.save_params`: the CRC-32 of every array
is computed and stored in the meta) and restored with `load_params(verify=True)` (the
checksums recomputed and compared, the params checked finite) and `verify=False`. The
checksum pass alone is timed too, and its cost extrapolated to the 1.24B-parameter
`llama-3.2-1b` preset in bfloat16 (2.47 GB) at the measured rate. Writes `<out>.json` and
`<out>.md`.
"""

import shutil
import tempfile

import jax.numpy as jnp
import numpy as np
from absl import flags

import model
from model import checkpoint as ckpt
from scripts import cli_lib
from scripts.bench import bench_lib

_PRESET = flags.DEFINE_string("preset", "smollm-135m", "Model preset (random weights).")
_DTYPE = flags.DEFINE_enum("dtype", "bfloat16", ["float32", "bfloat16"], "Param dtype.")
_REPEATS = flags.DEFINE_integer("repeats", 3, "Timed runs per point (the best is kept).")
_OUT = flags.DEFINE_string("out", "docs/bench_checksum", "Output path prefix.")
FLAG_NAMES = ("preset", "dtype", "repeats", "out")
ONE_B = "llama-3.2-1b"


def _params(cfg):
  return _draw(model.param_shapes(cfg), np.random.RandomState(0))


def _draw(tree, rng):
  if isinstance(tree, dict):
    return {k: _draw(v, rng) for k, v in tree.items()}
  return jnp.asarray(rng.standard_normal(tree.shape).astype(np.float32) * 0.02, tree.dtype)


def _table(r: dict, meta: dict, command: str) -> str:
  lines = [f"# Checkpoint checksums: cost ({meta['machine']})", "",
           f"Preset `{meta['preset']}` ({meta['params'] / 1e6:.1f}M params, {meta['dtype']}, "
           f"{r['bytes'] / 1e6:.0f} MB), random weights, local disk. jax {meta['jax']}. Load "
           f"average at start / end: {meta['load_avg_1m']:.2f} / {meta['load_avg_1m_end']:.2f}.",
           "", "| step | seconds | share |", "|---|---:|---:|",
           f"| save (checksums included) | {r['save_s']:.3f} | 100% |",
           f"| of which checksums | {r['checksum_s']:.3f} | "
           f"{100 * r['checksum_s'] / r['save_s']:.0f}% |",
           f"| restore, verify=False | {r['load_s']:.3f} | 100% |",
           f"| restore, verify=True | {r['load_verify_s']:.3f} | "
           f"{100 * r['load_verify_s'] / r['load_s']:.0f}% |", "",
           f"Checksum rate: {r['checksum_gb_s']:.2f} GB/s (CRC-32, leaves hashed in parallel "
           f"threads). At that rate the {ONE_B} preset in bfloat16 ({r['one_b_bytes'] / 1e9:.2f} "
           f"GB) costs {r['one_b_checksum_s']:.1f} s at save and again at restore. Best of "
           f"{meta['repeats']} runs. Command: `{command}`."]
  return "\n".join(lines) + "\n"


def main():
  if _REPEATS.value < 1:
    raise ValueError(f"--repeats={_REPEATS.value} must be >= 1")
  cfg = model.get_preset(_PRESET.value, param_dtype=_DTYPE.value, dtype=_DTYPE.value)
  params = _params(cfg)
  meta = dict(**bench_lib.machine_info(), preset=_PRESET.value, dtype=_DTYPE.value,
              params=model.count_params(params), repeats=_REPEATS.value)
  nbytes = model.tree_nbytes(params)
  folder = tempfile.mkdtemp(prefix="sparq-checksum-")
  try:
    def save():
      shutil.rmtree(folder, ignore_errors=True)
      ckpt.save_params(folder, params, model_cfg=cfg)
    save_s, _ = bench_lib.best_of(save, _REPEATS.value)
    sum_s, _ = bench_lib.best_of(lambda: ckpt.checksums(params), _REPEATS.value)
    load_s, _ = bench_lib.best_of(lambda: ckpt.load_params(folder, verify=False),
                                  _REPEATS.value)
    load_v_s, _ = bench_lib.best_of(lambda: ckpt.load_params(folder), _REPEATS.value)
  finally:
    shutil.rmtree(folder, ignore_errors=True)
  one_b = model.count_params(model.param_shapes(model.get_preset(ONE_B))) * 2
  rate = nbytes / sum_s
  r = dict(bytes=nbytes, save_s=save_s, checksum_s=sum_s, load_s=load_s, load_verify_s=load_v_s,
           checksum_gb_s=rate / 1e9, one_b_bytes=one_b, one_b_checksum_s=one_b / rate)
  print(f"{nbytes / 1e6:.0f} MB: save {save_s:.2f} s (checksums {sum_s:.2f} s), restore "
        f"{load_s:.2f} s, verified {load_v_s:.2f} s; {ONE_B} bf16: {one_b / rate:.1f} s")
  bench_lib.finish("scripts.bench.checksum", FLAG_NAMES, _OUT.value, meta,
                   lambda cmd: (dict(meta=meta, result=r), _table(r, meta, cmd)))


if __name__ == "__main__":
  cli_lib.run(main)

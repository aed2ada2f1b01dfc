r"""Training throughput: python -m scripts.bench.train [--presets=tiny,small,bench-25m].

Times the jitted train step (AdamW, clipping, packed stdlib batches) per preset
after one compile step, prints a table and writes docs/bench_train.json (and a
PNG bar chart). Not a test: numbers depend on the machine and its load, which
are recorded with them.
"""

import json
import os
import platform
import time

import jax
import jax.numpy as jnp
from absl import app, flags, logging

import model
from model import transformer
from model.config import get_preset
from scripts import data_lib, train_lib
from scripts.configs.train import lm as train_config

_PRESETS = flags.DEFINE_list("presets", ["test", "tiny", "small"], "Model presets.")
_SEQ_LEN = flags.DEFINE_integer("seq_len", 256, "Tokens per row.")
_BATCH = flags.DEFINE_integer("batch_size", 32, "Rows per batch.")
_STEPS = flags.DEFINE_integer("steps", 10, "Timed steps per preset (after 1 compile step).")
_OUTPUT = flags.DEFINE_string("output", "docs/bench_train.json", "JSON path ('' to skip).")
_MACHINE = flags.DEFINE_string("machine", "2-core CPU container, no accelerator",
                               "Machine description stored with the numbers.")


def bench(preset: str, seq_len: int, batch_size: int, steps: int) -> dict:
  """Compile time and steady-state tokens/s of one preset's train step."""
  config = train_config.get_config(preset)
  model_cfg = get_preset(preset)
  if seq_len > model_cfg.max_seq_len:
    raise ValueError(f"--seq_len={seq_len} exceeds {preset}'s max_seq_len={model_cfg.max_seq_len}")
  tx, schedule = train_lib.make_optimizer(config.opt, 1000)
  step = jax.jit(lambda s, b: train_lib.train_step(s, b, model_cfg=model_cfg, tx=tx,
                                                   schedule=schedule), donate_argnums=0)
  it = data_lib.BatchIterator(data_lib.load_split(config.data, "train"), batch_size, seq_len)
  batches = [jax.tree.map(jnp.asarray, next(it)) for _ in range(steps + 1)]
  params = transformer.init(model_cfg, jax.random.key(0))
  state = {"params": params, "opt_state": tx.init(params), "step": jnp.zeros([], jnp.int32)}
  t0 = time.perf_counter()
  state, m = step(state, batches[0])
  jax.block_until_ready(m)
  compile_s = time.perf_counter() - t0
  t0 = time.perf_counter()
  for b in batches[1:]:
    state, m = step(state, b)
  jax.block_until_ready(m)
  dt = time.perf_counter() - t0
  return {"preset": preset, "params": model.tree_size(state["params"]),
          "seq_len": seq_len, "batch_size": batch_size, "steps": steps,
          "compile_s": round(compile_s, 2), "step_s": round(dt / steps, 4),
          "tokens_per_s": round(batch_size * seq_len * steps / dt, 1),
          "final_loss": round(float(m["loss"]), 4)}


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)
  load = os.getloadavg()[0]
  rows = [bench(p, _SEQ_LEN.value, _BATCH.value, _STEPS.value) for p in _PRESETS.value]
  header = f"{'preset':<10} {'params':>10} {'B x L':>9} {'compile s':>9} {'step s':>8} {'tok/s':>9}"
  print(header)
  print("-" * len(header))
  for r in rows:
    print(f"{r['preset']:<10} {r['params']:>10,} {r['batch_size']:>4}x{r['seq_len']:<4} "
          f"{r['compile_s']:>9.1f} {r['step_s']:>8.3f} {r['tokens_per_s']:>9,.0f}")
  out = {"machine": _MACHINE.value, "cpu_count": os.cpu_count(), "load_avg_1m_at_start": load,
         "backend": jax.default_backend(), "jax": jax.__version__,
         "python": platform.python_version(), "results": rows}
  if _OUTPUT.value:
    os.makedirs(os.path.dirname(os.path.abspath(_OUTPUT.value)), exist_ok=True)
    with open(_OUTPUT.value, "w") as f:
      json.dump(out, f, indent=2)
    _plot(rows, os.path.splitext(_OUTPUT.value)[0] + ".png", _MACHINE.value)
    print(f"wrote {_OUTPUT.value}")


def _plot(rows, path: str, machine: str) -> None:
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  fig, ax = plt.subplots(figsize=(5, 3))
  labels = [f"{r['preset']}\n{r['params'] / 1e6:.2f}M" for r in rows]
  ax.bar(labels, [r["tokens_per_s"] for r in rows], color="tab:blue")
  ax.set_yscale("log")
  ax.set_ylabel("train tokens / s")
  ax.set_title(f"sparq training throughput ({machine})", fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


if __name__ == "__main__":
  app.run(main)

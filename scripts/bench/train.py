r"""Training throughput: python -m scripts.bench.train [--presets=tiny,small,bench-25m].

Times the jitted train step (AdamW, clipping, packed stdlib batches) per preset
after one compile step, prints a table and writes docs/bench_train.json (with
the table as docs/bench_train.md and a PNG bar chart). Not a test: numbers depend
on the machine and its load, which are recorded with them.
"""

import os

import jax
import jax.numpy as jnp
from absl import flags

import model
from model import transformer
from model.config import get_preset
from model.tokenizer import ByteTokenizer
from scripts import cli_lib, data_lib, train_lib
from scripts.bench import bench_lib
from scripts.configs.train import lm as train_config

_PRESETS = flags.DEFINE_list("presets", ["test", "tiny", "small"], "Model presets.")
_SEQ_LEN = flags.DEFINE_integer("seq_len", 256, "Tokens per row.")
_BATCH = flags.DEFINE_integer("batch_size", 32, "Rows per batch.")
_STEPS = flags.DEFINE_integer("steps", 10, "Timed steps per preset (after 1 compile step).")
_OUTPUT = flags.DEFINE_string(
    "output", "docs/bench_train.json",
    "JSON path ('' to skip); the table (.md) and the chart (.png) go beside it.")


def bench(preset: str, seq_len: int, batch_size: int, steps: int) -> dict:
  """Compile time and steady-state tokens/s of one preset's train step."""
  config = train_config.get_config(preset)
  model_cfg = get_preset(preset)
  if model_cfg.vocab_size < ByteTokenizer.vocab_size:  # bench-25m (256): the byte corpus'
    # BOS / PAD ids would index past the embedding; the step's cost barely depends on V.
    model_cfg = model_cfg.replace(vocab_size=ByteTokenizer.vocab_size)
    print(f"{preset}: vocab_size raised to {model_cfg.vocab_size} for the byte corpus")
  data_lib.check_vocab(model_cfg.vocab_size, f"{preset} vocab_size")
  if seq_len > model_cfg.max_seq_len:
    raise ValueError(f"--seq_len={seq_len} exceeds {preset}'s max_seq_len={model_cfg.max_seq_len}")
  tx, schedule = train_lib.make_optimizer(config.opt, 1000)
  params = transformer.init(model_cfg, jax.random.key(0))
  mask = train_lib.trainable_mask(params, None)  # plain LM training: every leaf trains
  step = jax.jit(lambda s, b: train_lib.train_step(s, b, model_cfg=model_cfg, tx=tx,
                                                   schedule=schedule, hooks=train_lib.Hooks(),
                                                   mask=mask), donate_argnums=0)
  it = data_lib.BatchIterator(data_lib.load_split(config.data, "train"), batch_size, seq_len)
  batches = [jax.tree.map(jnp.asarray, next(it)) for _ in range(steps + 1)]
  state = {"params": params, "opt_state": tx.init(params), "step": jnp.zeros([], jnp.int32)}
  compile_s, (state, m) = bench_lib.timed(lambda: step(state, batches[0]))

  def timed_steps():
    s, m = state, None
    for b in batches[1:]:
      s, m = step(s, b)
    return s, m

  dt, (state, m) = bench_lib.timed(timed_steps)
  return {"preset": preset, "params": model.tree_size(state["params"]),
          "seq_len": seq_len, "batch_size": batch_size, "steps": steps,
          "compile_s": round(compile_s, 2), "step_s": round(dt / steps, 4),
          "tokens_per_s": round(batch_size * seq_len * steps / dt, 1),
          "final_loss": round(float(m["loss"]), 4)}


def markdown(rows: list[dict], info: dict, command: str) -> str:
  """The results as a markdown table."""
  lines = [f"# Training throughput ({info['machine']})", "",
           f"jax {info['jax']}, backend {info['backend']}, load average at start "
           f"{info['load_avg_1m']:.2f}. Command: `{command}`", "",
           "| preset | params | B x L | compile s | step s | tok/s | final loss |",
           "|---|---:|---:|---:|---:|---:|---:|"]
  for r in rows:
    lines.append(f"| {r['preset']} | {r['params']:,} | {r['batch_size']} x {r['seq_len']} | "
                 f"{r['compile_s']:.1f} | {r['step_s']:.3f} | {r['tokens_per_s']:,.0f} | "
                 f"{r['final_loss']:.4f} |")
  return "\n".join(lines) + "\n"


def main():
  if _STEPS.value < 1 or _BATCH.value < 1 or _SEQ_LEN.value < 1:
    raise ValueError(f"--steps={_STEPS.value}, --batch_size={_BATCH.value} and "
                     f"--seq_len={_SEQ_LEN.value} must be >= 1")
  info = bench_lib.machine_info()  # before the runs: the load they meet, not the load they add
  rows = [bench(p, _SEQ_LEN.value, _BATCH.value, _STEPS.value) for p in _PRESETS.value]
  command = bench_lib.command_line("scripts.bench.train",
                                   ("presets", "seq_len", "batch_size", "steps", "output"))
  md = markdown(rows, info, command)
  if not _OUTPUT.value:
    print(md)
    return
  out = os.path.splitext(_OUTPUT.value)[0]
  bench_lib.write_results(out, {**info, "command": command, "results": rows}, md)
  _plot(rows, out + ".png", info["machine"])
  print(f"wrote {out}.png")


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
  cli_lib.run(main)

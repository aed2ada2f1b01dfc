r"""Converts Hugging Face checkpoints: python -m scripts.convert --to=sparq --hf_dir=D --workdir=W.

  --to=sparq: HF dir (config.json + safetensors) -> orbax params checkpoint in
    --workdir (usable by the eval / prune / quantize / decode commands).
  --to=hf: the checkpoint in --workdir -> HF dir (config.json, model.safetensors
    or shards + index, and the tokenizer files saved at import).
Supported architectures: Llama (2 / 3 / 3.1 / 3.2, TinyLlama, SmolLM), Mistral,
Qwen2 / 2.5, Qwen3. Pickle weights are refused, never loaded.
"""

from absl import app, flags, logging

from model import convert
from scripts import convert_lib

_TO = flags.DEFINE_enum("to", None, ["sparq", "hf"], "Conversion direction.")
_HF_DIR = flags.DEFINE_string("hf_dir", None, "Hugging Face model folder (read or written).")
_WORKDIR = flags.DEFINE_string("workdir", None, "sparq workdir (written or read).")
_DTYPE = flags.DEFINE_enum(
    "dtype", None, ["float32", "bfloat16", "float16"],
    "--to=sparq: param dtype (default: the checkpoint's); --to=hf: weight dtype on disk "
    "(default: the params').")
_ARCH = flags.DEFINE_enum("architecture", None, list(convert.ARCHITECTURES),
                          "--to=hf: architecture to write (default: the imported one, or "
                          "inferred from the model config).")
_STEP = flags.DEFINE_integer("step", None, "--to=hf: checkpoint step (default: latest).")
_SHARD_GB = flags.DEFINE_float("max_shard_gb", 5.0, "--to=hf: largest safetensors shard, GiB.")
flags.mark_flags_as_required(["to", "hf_dir", "workdir"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if not flags.FLAGS["verbosity"].present:  # orbax logs every file at INFO
    logging.set_verbosity(logging.WARNING)
  if _SHARD_GB.value <= 0:
    raise SystemExit(f"error: --max_shard_gb={_SHARD_GB.value} must be > 0")
  try:
    if _TO.value == "sparq":
      cfg, folder = convert_lib.hf_to_checkpoint(_HF_DIR.value, _WORKDIR.value,
                                                 param_dtype=_DTYPE.value)
      print(f"imported {_HF_DIR.value} ({cfg.n_layers} layers, d_model {cfg.d_model}, "
            f"{cfg.param_dtype}) -> {folder}")
    else:
      arch = convert_lib.checkpoint_to_hf(
          _WORKDIR.value, _HF_DIR.value, step=_STEP.value, dtype=_DTYPE.value,
          architecture=_ARCH.value, max_shard_bytes=int(_SHARD_GB.value * 2**30))
      print(f"exported {_WORKDIR.value} -> {_HF_DIR.value} as {arch}")
  except (ValueError, FileNotFoundError) as e:
    raise SystemExit(f"error: {e}") from None


if __name__ == "__main__":
  app.run(main)

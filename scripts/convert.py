r"""Converts Hugging Face checkpoints: python -m scripts.convert --to=sparq --hf_dir=D --workdir=W.

  --to=sparq: HF dir (config.json + safetensors) -> orbax params checkpoint in
    --workdir (usable by the eval / prune / quantize / decode commands).
  --to=hf: the checkpoint in --workdir -> HF dir (config.json, model.safetensors
    or shards + index, and the tokenizer files saved at import).
Supported architectures: Llama (2 / 3 / 3.1 / 3.2, TinyLlama, SmolLM), Mistral,
Qwen2 / 2.5, Qwen3. Pickle weights are refused, never loaded.
"""

from absl import flags

from model import convert
from scripts import cli_lib, convert_lib

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


def main():
  print(convert_lib.run_conversion(_TO.value, _HF_DIR.value, _WORKDIR.value,
                                   dtype=_DTYPE.value, architecture=_ARCH.value,
                                   step=_STEP.value, max_shard_gb=_SHARD_GB.value))


if __name__ == "__main__":
  cli_lib.run(main)

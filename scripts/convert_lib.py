"""Hugging Face model dir <-> sparq orbax checkpoint (the library behind scripts/convert.py).

An imported checkpoint is an ordinary params checkpoint (scripts/checkpoint_lib:
`<workdir>/checkpoints/0/{params,meta}` + `model_config.json`), so prune / quantize
/ eval / decode commands take it like a trained one. Its meta records the source
(`meta["source"]`: format, path, architecture, the original config.json), and the
tokenizer files are copied to `<workdir>/hf/`, so exporting back restores the
architecture, special-token ids and tokenizer.
"""

from __future__ import annotations

import os
import shutil

from model import convert
from model.config import ModelConfig
from model.tokenizer import Tokenizer, get_tokenizer
from scripts import checkpoint_lib, cli_lib

HF_SUBDIR = "hf"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "generation_config.json", "tokenizer.model")
_TOKEN_KEYS = ("bos_token_id", "eos_token_id", "pad_token_id")
# JSON files read beside a tokenizer.json (by model.hf_tokenizer), checked before it loads.
_TOKENIZER_SIDE_FILES = ("tokenizer_config.json", "config.json", "generation_config.json")


def _is_hf_config(cfg) -> bool:
  return isinstance(cfg, dict) and ("model_type" in cfg or "architectures" in cfg)


def read_hf_config(hf_dir: str, flag: str = "--hf_dir") -> dict:
  """The config.json of the Hugging Face dir `hf_dir`, or a one-line ValueError naming
  `flag`, the file and what is wrong with it (missing, junk JSON, not a model config)."""
  what = f"{flag}={hf_dir}"
  if not os.path.isdir(hf_dir):
    raise ValueError(f"{what} {'is not a folder' if os.path.exists(hf_dir) else 'does not exist'}"
                     " (expected a Hugging Face model dir)")
  file = os.path.join(hf_dir, "config.json")
  if not os.path.isfile(file):
    raise ValueError(f"{what} has no config.json (expected a Hugging Face model dir)")
  cfg = cli_lib.read_json(file, what)
  if not _is_hf_config(cfg):
    raise ValueError(f"{what}: {file} names no model_type or architectures (not a Hugging "
                     "Face model config)")
  return cfg


def model_kind(path: str, flag: str) -> str:
  """"hf" for a Hugging Face dir, "sparq" for a folder with checkpoints; else a ValueError
  naming `flag` and why neither fits (a junk config.json is named, not skipped over)."""
  what = f"{flag}={path}"
  if not os.path.isdir(path):
    raise ValueError(f"{what} {'is not a folder' if os.path.exists(path) else 'does not exist'}"
                     " (expected a sparq workdir or a Hugging Face model dir)")
  file = os.path.join(path, "config.json")
  cfg, error = None, None
  if os.path.isfile(file):
    try:
      cfg = cli_lib.read_json(file, what)
    except ValueError as e:
      error = e
  if _is_hf_config(cfg):
    return "hf"
  if checkpoint_lib.has_checkpoint(path):  # a run's own config.json is not read to load it
    return "sparq"
  if error is not None:
    raise error
  if cfg is not None:
    raise ValueError(f"{what}: {file} names no model_type or architectures (not a Hugging "
                     f"Face model config) and the folder holds no "
                     f"{checkpoint_lib.CKPT_SUBDIR}/<step>")
  raise ValueError(f"{what} holds neither a Hugging Face config.json nor sparq checkpoints "
                   f"({checkpoint_lib.CKPT_SUBDIR}/<step>)")


def load_hf(hf_dir: str, flag: str = "--hf_dir", *,
            param_dtype: str | None = None) -> tuple[ModelConfig, dict]:
  """`convert.load_hf` with its config.json checked first and its errors naming `flag`
  (its own messages say "config.json", not which one)."""
  read_hf_config(hf_dir, flag)
  try:
    return convert.load_hf(hf_dir, param_dtype=param_dtype)
  except ValueError as e:
    raise ValueError(f"{flag}={hf_dir}: {e}") from None


def load_tokenizer(spec: str, what: str | None = None) -> Tokenizer:
  """`get_tokenizer(spec)`, with the JSON files beside a tokenizer.json checked first, so a
  junk one is named, after `what` (the flag that chose it, default `--tokenizer=<spec>`),
  instead of raising a bare JSON error."""
  if spec == "byte":
    return get_tokenizer(spec)
  where = what or f"--tokenizer={spec}"
  if not os.path.exists(spec):
    raise ValueError(f"{where}: tokenizer file {spec} does not exist")
  folder = spec if os.path.isdir(spec) else os.path.dirname(os.path.abspath(spec))
  for name in _TOKENIZER_SIDE_FILES:
    if os.path.isfile(os.path.join(folder, name)):
      cli_lib.read_json(os.path.join(folder, name), where)
  try:
    return get_tokenizer(spec)
  except ValueError as e:
    raise ValueError(f"{where}: {e}") from None


def _copy_tokenizer(src: str, dst: str) -> list[str]:
  names = [n for n in TOKENIZER_FILES if os.path.isfile(os.path.join(src, n))]
  if names:
    os.makedirs(dst, exist_ok=True)
  for n in names:
    shutil.copyfile(os.path.join(src, n), os.path.join(dst, n))
  return names


def hf_to_checkpoint(hf_dir: str, workdir: str, *,
                     param_dtype: str | None = None) -> tuple[ModelConfig, str]:
  """Imports `hf_dir` into a new params checkpoint under `workdir`; returns (cfg, its folder)."""
  if os.path.isdir(os.path.join(workdir, checkpoint_lib.CKPT_SUBDIR)):
    raise ValueError(f"workdir={workdir!r} already holds checkpoints; pick an empty folder")
  cfg, params = load_hf(hf_dir, param_dtype=param_dtype)
  hf_cfg = read_hf_config(hf_dir)
  source = {"format": "huggingface", "path": os.path.abspath(hf_dir),
            "architecture": convert.architecture_of(hf_cfg), "config": hf_cfg}
  folder = checkpoint_lib.save_params(workdir, params, cfg, step=0, meta={"source": source})
  _copy_tokenizer(hf_dir, os.path.join(workdir, HF_SUBDIR))
  return cfg, folder


def checkpoint_to_hf(workdir: str, hf_dir: str, *, step: int | None = None,
                     dtype: str | None = None, architecture: str | None = None,
                     max_shard_bytes: int = convert.DEFAULT_MAX_SHARD_BYTES) -> str:
  """Exports a params checkpoint to a Hugging Face dir; returns the architecture written."""
  params, cfg, step = checkpoint_lib.load_params(workdir, step)
  source = checkpoint_lib.load_meta(workdir, step).get("source") or {}
  if architecture is None and source.get("architecture"):
    try:  # the imported family, unless the model was changed into another one
      convert.check_architecture(cfg, source["architecture"])
      architecture = source["architecture"]
    except ValueError:
      architecture = None
  extra = {k: source["config"][k] for k in _TOKEN_KEYS if k in source.get("config", {})}
  arch = convert.export_hf(cfg, params, hf_dir, dtype=dtype, architecture=architecture,
                           extra_config=extra, max_shard_bytes=max_shard_bytes)
  _copy_tokenizer(os.path.join(workdir, HF_SUBDIR), hf_dir)
  return arch


def load_model(path: str, *, step: int | None = None, param_dtype: str | None = None,
               flag: str = "--workdir") -> tuple[ModelConfig, dict]:
  """(cfg, params) from a Hugging Face dir or a sparq workdir, for eval / generation mains;
  `flag` is the one that named `path`, for the errors."""
  if model_kind(path, flag) == "hf":
    return load_hf(path, flag, param_dtype=param_dtype)
  params, cfg, _ = checkpoint_lib.load_params(path, step)
  return cfg, params


def tokenizer_path(path: str) -> str | None:
  """The tokenizer.json of a Hugging Face dir or of an imported workdir, if there is one."""
  for folder in (path, os.path.join(path, HF_SUBDIR)):
    if os.path.isfile(os.path.join(folder, "tokenizer.json")):
      return os.path.join(folder, "tokenizer.json")
  return None


def run_conversion(to: str, hf_dir: str, workdir: str, *, dtype: str | None = None,
            architecture: str | None = None, step: int | None = None,
            max_shard_gb: float = 5.0) -> str:
  """`to="sparq"`: import `hf_dir` into `workdir`; `to="hf"`: export; returns a summary line."""
  if max_shard_gb <= 0:
    raise ValueError(f"--max_shard_gb={max_shard_gb} must be > 0")
  if to == "sparq":
    cfg, folder = hf_to_checkpoint(hf_dir, workdir, param_dtype=dtype)
    return (f"imported {hf_dir} ({cfg.n_layers} layers, d_model {cfg.d_model}, "
            f"{cfg.param_dtype}) -> {folder}")
  if to != "hf":
    raise ValueError(f"--to={to!r}; valid: 'sparq', 'hf'")
  arch = checkpoint_to_hf(workdir, hf_dir, step=step, dtype=dtype, architecture=architecture,
                          max_shard_bytes=int(max_shard_gb * 2**30))
  return f"exported {workdir} -> {hf_dir} as {arch}"

"""Streaming safetensors I/O: header-first reads and writes, one tensor in memory at a time.

The format is a little-endian u64 header length, a JSON header
`{name: {dtype, shape, data_offsets: [begin, end]}, "__metadata__": {...}}`
and the raw tensor bytes. Reading with plain file reads (not mmap) keeps the
process's resident memory to the tensors it actually holds, which is what the
import peak-memory bound is about.
"""

from __future__ import annotations

import dataclasses
import json
import os
import struct
import sys

import ml_dtypes
import numpy as np

DTYPES = {
    "F64": np.dtype(np.float64), "F32": np.dtype(np.float32), "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16), "I64": np.dtype(np.int64), "I32": np.dtype(np.int32),
    "I16": np.dtype(np.int16), "I8": np.dtype(np.int8), "U8": np.dtype(np.uint8),
    "BOOL": np.dtype(np.bool_),
}
_CODES = {v: k for k, v in DTYPES.items()}
_MAX_HEADER = 100 * 2**20
INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
_PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")

if sys.byteorder != "little":  # safetensors is little-endian; we view bytes directly
  raise ImportError("model.convert needs a little-endian host")


@dataclasses.dataclass(frozen=True)
class TensorInfo:
  """Where one tensor lives: file, dtype, shape and byte range (absolute file offsets)."""

  file: str
  dtype: np.dtype
  shape: tuple[int, ...]
  start: int
  end: int

  @property
  def nbytes(self) -> int:
    return self.end - self.start


def read_header(file: str) -> dict[str, TensorInfo]:
  """Parses a .safetensors header (no tensor data is read)."""
  with open(file, "rb") as f:
    raw = f.read(8)
    if len(raw) != 8:
      raise ValueError(f"{file} is not a safetensors file (shorter than 8 bytes)")
    (n,) = struct.unpack("<Q", raw)
    if n > _MAX_HEADER:
      raise ValueError(f"{file} is not a safetensors file (header length {n})")
    try:
      header = json.loads(f.read(n))
    except json.JSONDecodeError as e:
      raise ValueError(f"{file} has a corrupt safetensors header: {e}") from e
  size = os.path.getsize(file)
  out = {}
  for name, entry in header.items():
    if name == "__metadata__":
      continue
    if entry["dtype"] not in DTYPES:
      raise ValueError(f"{file}: tensor {name!r} has dtype {entry['dtype']}; "
                       f"supported: {sorted(DTYPES)}")
    dtype = DTYPES[entry["dtype"]]
    shape = tuple(int(d) for d in entry["shape"])
    begin, end = (8 + n + int(o) for o in entry["data_offsets"])
    if end - begin != int(np.prod(shape)) * dtype.itemsize or end > size:
      raise ValueError(f"{file}: tensor {name!r} byte range {entry['data_offsets']} does not "
                       f"match shape {shape} x {entry['dtype']} (file size {size})")
    out[name] = TensorInfo(file, dtype, shape, begin, end)
  return out


def index_weights(path: str) -> dict[str, TensorInfo]:
  """All tensors of a Hugging Face model dir (single file or sharded index), by name."""
  index = os.path.join(path, INDEX_FILE)
  if os.path.isfile(index):
    with open(index) as f:
      weight_map = json.load(f)["weight_map"]
    files = sorted(set(weight_map.values()))
  elif os.path.isfile(os.path.join(path, SINGLE_FILE)):
    files = [SINGLE_FILE]  # ignore side files such as Mistral's consolidated.safetensors
  else:
    files = sorted(n for n in os.listdir(path) if n.endswith(".safetensors"))
  if not files:
    pickles = sorted(n for n in os.listdir(path) if n.endswith(_PICKLE_SUFFIXES))
    if pickles:
      raise ValueError(
          f"{path} holds only pickle weights ({', '.join(pickles)}); sparq never unpickles "
          "(it can run arbitrary code). Convert them once, in an environment you trust: "
          "`python -c \"from transformers import AutoModelForCausalLM as M; "
          f"M.from_pretrained('{path}').save_pretrained('OUT_DIR', safe_serialization=True)\"` "
          "and import OUT_DIR.")
    raise FileNotFoundError(f"no weights in {path}: expected {SINGLE_FILE}, *.safetensors "
                            f"shards or {INDEX_FILE}")
  tensors: dict[str, TensorInfo] = {}
  for name in files:
    file = os.path.join(path, name)
    if not os.path.isfile(file):
      raise FileNotFoundError(f"{INDEX_FILE} in {path} lists shard {name}, which is missing")
    for key, info in read_header(file).items():
      if key in tensors:
        raise ValueError(f"tensor {key!r} appears in both {tensors[key].file} and {file}")
      tensors[key] = info
  return tensors


def read_tensor(info: TensorInfo) -> np.ndarray:
  """Reads one tensor with a plain file read (one buffer of exactly its bytes)."""
  buf = np.empty(info.nbytes, np.uint8)
  with open(info.file, "rb") as f:
    f.seek(info.start)
    if f.readinto(memoryview(buf)) != info.nbytes:
      raise ValueError(f"{info.file} is truncated")
  return buf.view(info.dtype).reshape(info.shape)


@dataclasses.dataclass(frozen=True)
class PlannedTensor:
  """A tensor to write: its name, dtype, shape, and a thunk producing the array."""

  name: str
  dtype: np.dtype
  shape: tuple[int, ...]
  fetch: object  # () -> np.ndarray with this dtype and shape

  @property
  def nbytes(self) -> int:
    return int(np.prod(self.shape)) * self.dtype.itemsize


def write_file(file: str, tensors: list[PlannedTensor], metadata: dict[str, str]) -> None:
  """Writes one .safetensors file, fetching and writing one tensor at a time."""
  header: dict = {"__metadata__": metadata}
  offset = 0
  for t in tensors:
    header[t.name] = {"dtype": _CODES[t.dtype], "shape": list(t.shape),
                      "data_offsets": [offset, offset + t.nbytes]}
    offset += t.nbytes
  raw = json.dumps(header, separators=(",", ":")).encode()
  raw += b" " * (-len(raw) % 8)  # the reference writer aligns data to 8 bytes
  with open(file, "wb") as f:
    f.write(struct.pack("<Q", len(raw)))
    f.write(raw)
    for t in tensors:
      arr = np.ascontiguousarray(t.fetch())
      if arr.dtype != t.dtype or arr.shape != t.shape:
        raise AssertionError(f"{t.name}: planned {t.dtype}{t.shape}, got {arr.dtype}{arr.shape}")
      f.write(memoryview(arr.reshape(-1).view(np.uint8)))


def write_sharded(path: str, tensors: list[PlannedTensor], max_shard_bytes: int) -> list[str]:
  """Writes `model.safetensors` or numbered shards plus the index; returns file names."""
  shards: list[list[PlannedTensor]] = [[]]
  size = 0
  for t in tensors:
    if shards[-1] and size + t.nbytes > max_shard_bytes:
      shards.append([])
      size = 0
    shards[-1].append(t)
    size += t.nbytes
  n = len(shards)
  names = [SINGLE_FILE] if n == 1 else [
      f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
  for name, shard in zip(names, shards, strict=True):
    write_file(os.path.join(path, name), shard, {"format": "pt"})
  if n > 1:
    index = {"metadata": {"total_size": sum(t.nbytes for t in tensors)},
             "weight_map": {t.name: name for name, s in zip(names, shards, strict=True)
                            for t in s}}
    with open(os.path.join(path, INDEX_FILE), "w") as f:
      json.dump(index, f, indent=2)
  return names

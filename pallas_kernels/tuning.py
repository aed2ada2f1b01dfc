"""Block sizes of the low-bit matmul kernels: a heuristic, and a table of measured winners.

`lookup` is what `pallas_kernels.lowbit` asks when a call leaves block sizes unset: the
entry measured (by `scripts/bench/autotune_kernels.py`) on this device kind for the same
kernel, platform, bit width, group size and weight shape, at the nearest M bucket, else
`default_blocks`. Table entries are only ever written from timings on real hardware;
the committed `tuned_blocks.json` starts empty.

Kernels: "weight_only" (int8 / int4 codes dequantized in-kernel) and "w8a8" (int8 x int8
-> int32). Platforms: "tpu" (Mosaic; blocks are multiples of (8, 128) or span the whole
dimension) and "gpu" (Triton; power-of-two tiles, at least 16, tails masked).

Table format (JSON):

  {"version": 1,
   "devices": {
     "<device_kind, e.g. NVIDIA H200 or TPU v5 lite>": {
       "<kernel>/<platform>/b<bits>/g<group_size, 0 = per channel>/K<K>/N<N>": {
         "<M bucket: a power of two, as a string>": {
           "block_m": 16, "block_n": 256, "block_k": 512, "seconds": 1.2e-05}}}}}

M buckets are powers of two (`m_bucket(M)`: the smallest power of two >= M); `lookup`
takes the bucket nearest to M's in log2 distance (ties to the larger). `write_table`
writes atomically (temp file in the same folder, then `os.replace`).
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from typing import Any

import jax

KERNELS = ("weight_only", "w8a8")
PLATFORMS = ("tpu", "gpu")
VERSION = 1
TABLE_PATH = os.path.join(os.path.dirname(__file__), "tuned_blocks.json")
BLOCK_KEYS = ("block_m", "block_n", "block_k")
# Mosaic TPU tiling of the last two block dims (sublanes, lanes).
TPU_SUBLANE, TPU_LANE = 8, 128
# Triton tl.dot needs every tile dim >= 16; int8 x int8 dots want K tiles >= 32.
GPU_MIN_TILE = 16

_CACHE: dict[str, tuple[float, dict]] = {}


def empty_table() -> dict[str, Any]:
  return {"version": VERSION, "devices": {}}


def shape_key(kernel: str, K: int, N: int, *, bits: int, group_size: int | None,
              platform: str) -> str:
  """The table key of one (kernel, platform, bits, group size, K, N) case."""
  return f"{kernel}/{platform}/b{bits}/g{group_size or 0}/K{K}/N{N}"


def m_bucket(M: int) -> int:
  """The smallest power of two >= M (1 for M <= 1)."""
  return 1 << max(int(M) - 1, 0).bit_length()


def next_pow2(n: int) -> int:
  return 1 << max(int(n) - 1, 0).bit_length()


def _largest_divisor_multiple(total: int, unit: int, limit: int, align: int) -> int | None:
  """The largest b <= limit with b % unit == 0, total % b == 0 and b % align == 0."""
  best = None
  for t in range(1, total // unit + 1):
    b = unit * t
    if b > limit:
      break
    if total % b == 0 and b % align == 0:
      best = b
  return best


def min_gpu_block_k(kernel: str, bits: int) -> int:
  """Smallest legal GPU K tile: 32 for int4 (two 16-row nibble halves) and int8 dots."""
  return 32 if bits == 4 or kernel == "w8a8" else GPU_MIN_TILE


def default_blocks(kernel: str, M: int, K: int, N: int, *, bits: int,
                   group_size: int | None, platform: str) -> dict[str, int]:
  """A heuristic block choice, legal for these shapes on `platform`.

  Decode (M <= 16): one small M block and wide N / K tiles (the weight stream dominates);
  otherwise square-ish tiles. TPU blocks span a whole dimension when smaller than the
  target (always legal); grouped TPU K tiles hold whole groups and divide K. GPU tiles are
  powers of two; a grouped GPU K tile divides the group (one scale row per tile).
  """
  if kernel not in KERNELS:
    raise ValueError(f"kernel={kernel!r}; valid: {KERNELS}")
  if platform not in PLATFORMS:
    raise ValueError(f"platform={platform!r}; valid: {PLATFORMS}")
  g = group_size or None
  decode = M <= 16
  if platform == "tpu":
    # Decode: K tiles of 1024 rows for plain int8 codes; dequantized int4 / grouped tiles
    # carry int32 and f32 temporaries of the tile's size, so they stay at 512 (VMEM).
    plain = bits == 8 and g is None
    tm, tn, tk = (M, 512, 1024 if plain else 512) if decode else (256, 256, 512)
    bm = M if M <= tm else tm
    bn = N if N <= tn else tn
    lane = TPU_LANE * (2 if bits == 4 else 1)  # int4: x halves carry bk / 2 lanes
    if g is None:
      bk = K if K <= tk else tk
    else:
      bk = _largest_divisor_multiple(K, g, max(tk, g), lane) or K
    return dict(block_m=max(bm, 1), block_n=max(bn, 1), block_k=max(bk, 1))
  tm, tn, tk = (GPU_MIN_TILE, 128, 128) if decode else (64, 128, 64)
  kmin = min_gpu_block_k(kernel, bits)
  bm = max(min(tm, next_pow2(M)), GPU_MIN_TILE)
  bn = max(min(tn, next_pow2(N)), GPU_MIN_TILE)
  bk = max(min(tk, next_pow2(K)), kmin)
  if g is not None:
    bk = min(bk, g)
    while bk > kmin and g % bk:
      bk //= 2
    bk = max(bk, kmin)  # g % bk may still fail (g < kmin or odd); lowbit raises then
  return dict(block_m=bm, block_n=bn, block_k=bk)


def read_table(path: str | None = None) -> dict[str, Any]:
  """The table at `path` (default: the committed one), cached by modification time."""
  path = path or TABLE_PATH
  try:
    mtime = os.path.getmtime(path)
  except OSError:
    return empty_table()
  hit = _CACHE.get(path)
  if hit is not None and hit[0] == mtime:
    return hit[1]
  with open(path) as f:
    table = json.load(f)
  if table.get("version") != VERSION or not isinstance(table.get("devices"), dict):
    raise ValueError(f"{path}: not a version-{VERSION} block table ({{'version': "
                     f"{VERSION}, 'devices': {{...}}}}); got keys {sorted(table)}")
  _CACHE[path] = (mtime, table)
  return table


def current_device_kind() -> str:
  """The `device_kind` of this process's first device (the table's device key)."""
  return jax.devices()[0].device_kind


def lookup(kernel: str, M: int, K: int, N: int, *, bits: int, group_size: int | None,
           platform: str, device_kind: str | None = None, path: str | None = None
           ) -> dict[str, int]:
  """Measured blocks for this case on `device_kind` (default: this machine's) at the
  nearest M bucket, else `default_blocks`."""
  kind = device_kind if device_kind is not None else current_device_kind()
  cases = read_table(path)["devices"].get(kind, {})
  buckets = cases.get(shape_key(kernel, K, N, bits=bits, group_size=group_size,
                                platform=platform), {})
  if buckets:
    target = math.log2(m_bucket(M))
    best = min(buckets, key=lambda b: (abs(math.log2(int(b)) - target), -int(b)))
    return {k: int(buckets[best][k]) for k in BLOCK_KEYS}
  return default_blocks(kernel, M, K, N, bits=bits, group_size=group_size, platform=platform)


def record(table: dict[str, Any], kernel: str, M: int, K: int, N: int, *, bits: int,
           group_size: int | None, platform: str, device_kind: str, blocks: dict[str, int],
           seconds: float) -> dict[str, Any]:
  """Puts one measured winner into `table` (in place, also returned) at M's bucket."""
  if kernel not in KERNELS:
    raise ValueError(f"kernel={kernel!r}; valid: {KERNELS}")
  key = shape_key(kernel, K, N, bits=bits, group_size=group_size, platform=platform)
  entry = {k: int(blocks[k]) for k in BLOCK_KEYS}
  entry["seconds"] = float(seconds)
  table.setdefault("devices", {}).setdefault(device_kind, {}).setdefault(key, {})[
      str(m_bucket(M))] = entry
  table["version"] = VERSION
  return table


def write_table(path: str, table: dict[str, Any]) -> str:
  """Writes `table` to `path` atomically (temp file + os.replace); returns the path."""
  folder = os.path.dirname(os.path.abspath(path))
  os.makedirs(folder, exist_ok=True)
  fd, tmp = tempfile.mkstemp(prefix=".tuned_blocks.", suffix=".json", dir=folder)
  try:
    with os.fdopen(fd, "w") as f:
      json.dump(table, f, indent=1, sort_keys=True)
      f.write("\n")
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.unlink(tmp)
    raise
  _CACHE.pop(path, None)
  return path

"""One request path for every decoding loop (generate, beam, speculative, shared prefix):
`prepare` pads and buckets the prompts, validates the input, makes and checks the
cache, and builds per-row keys, EOS / stop-sequence arrays and the prefill and buffer
lengths; `shard_batch` places a request on a mesh."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec
from jaxtyping import Array

from decoding.sampling import Sampler
from model.kv_cache import KVCache, PrefixCache
from model.transformer import check_token_id, check_token_ids

MIN_BUCKET = 16


def bucket(n: int) -> int:
  """The padded length for n: the next power of two, at least MIN_BUCKET."""
  return max(MIN_BUCKET, 1 << max(0, int(n) - 1).bit_length())


def round_up(n: int, multiple: int) -> int:
  return -(-int(n) // multiple) * multiple


def pad_prompts(prompt_tokens, prompt_lengths=None, pad_id: int = 0,
                vocab_size: int | None = None) -> tuple[np.ndarray, np.ndarray]:
  """Ragged lists, or [B, P] + lengths, -> (right-padded i32[B, bucket(P)], i32[B]).

  Raises ValueError for an empty batch, an empty prompt, lengths out of range, non-integer
  ids or (given `vocab_size`) a prompt id outside [0, vocab_size); padding past a row's
  length is not checked (it is replaced by pad_id).
  """
  if isinstance(prompt_tokens, (list, tuple)) and prompt_lengths is None:
    rows = [np.asarray(p).reshape(-1) for p in prompt_tokens]
    if not rows:
      raise ValueError("prompt_tokens is empty; pass at least one prompt")
    for i, r in enumerate(rows):
      if r.size and r.dtype.kind not in "iu":
        raise ValueError(f"prompt_tokens[{i}] must hold integer token ids, got dtype {r.dtype}")
    lens = np.array([len(r) for r in rows], np.int64)
    width = max(int(lens.max()), 1)
    arr = np.full((len(rows), width), pad_id, np.int64)
    for i, r in enumerate(rows):
      arr[i, : len(r)] = r
  else:
    arr = np.asarray(prompt_tokens)
    if arr.ndim != 2:
      raise ValueError(f"prompt_tokens must be [B, P] (or a list of lists), got shape {arr.shape}")
    lens = (np.full((arr.shape[0],), arr.shape[1]) if prompt_lengths is None
            else np.asarray(prompt_lengths).reshape(-1))
    if lens.shape[0] != arr.shape[0]:
      raise ValueError(f"prompt_lengths has {lens.shape[0]} rows, prompt_tokens has {arr.shape[0]}")
    if (lens > arr.shape[1]).any():
      raise ValueError(f"prompt_lengths={lens.tolist()} exceed the prompt width {arr.shape[1]}")
  if arr.shape[0] == 0:
    raise ValueError("prompt_tokens is empty; pass at least one prompt")
  if (lens < 1).any():
    rows = np.flatnonzero(lens < 1).tolist()
    raise ValueError(f"empty prompt in rows {rows}: every prompt needs >= 1 token "
                     "(e.g. a BOS token)")
  if not np.issubdtype(arr.dtype, np.integer):
    raise ValueError(f"prompt_tokens must hold integer token ids, got dtype {arr.dtype}")
  if vocab_size is not None:  # before the int32 cast below, which would wrap huge ids
    check_token_ids("prompt_tokens", arr, vocab_size,
                    valid=np.arange(arr.shape[1])[None] < lens[:, None])
  width = bucket(int(lens.max()))
  out = np.full((arr.shape[0], width), pad_id, np.int32)
  cols = min(arr.shape[1], width)
  out[:, :cols] = arr[:, :cols]
  valid = np.arange(width)[None] < lens[:, None]
  out = np.where(valid, out, pad_id).astype(np.int32)
  return out, lens.astype(np.int32)


def check_step_fn(step_fn, name: str) -> None:
  missing = [a for a in ("init_cache", "read_params", "n_heads", "head_dim", "n_layers",
                         "vocab_size") if not hasattr(step_fn, a)]
  if not callable(step_fn) or missing:
    raise ValueError(f"{name} must be a model.Decoder (or answer {missing} like one), got "
                     f"{step_fn!r}")


def make_cache(cache, step_fn, batch: int, max_prompt: int, need: int, *, name: str = "cache",
               what: str = "max_new_tokens", full_ok: bool | None = None):
  """`cache` checked against the request, or a new one: `cache(batch, n)` for a factory,
  `step_fn.init_cache(batch, n)` for None, with n = `need` rounded up to 64.

  Rounding keeps shapes (and compilations) stable across nearby lengths; when the
  factory rejects the rounded size (above the model's max_seq_len), the exact size is
  used. full_ok: True lets the request outgrow the cache (rows stop with CACHE_FULL);
  None: the loop has no such option.
  """
  if cache is None or callable(cache):
    factory = step_fn.init_cache if cache is None else cache
    try:
      cache = factory(batch, round_up(need, 64))
    except ValueError:
      try:
        cache = factory(batch, need)
      except ValueError as e:
        raise ValueError(f"prompt length {max_prompt} + {what} needs {need} cache slots, more "
                         f"than {name} can hold: {e}") from None
  if cache.batch != batch:
    raise ValueError(f"{name} has batch {cache.batch}, the prompt batch has {batch}")
  if max_prompt > cache.max_len:
    raise ValueError(f"prompt length {max_prompt} is longer than the {name} "
                     f"(max_len={cache.max_len}); valid: 1..{cache.max_len}")
  if need > cache.max_len and not full_ok:
    hint = ("; use a larger cache, fewer new tokens, or stop_on_full_cache=True to stop such "
            "rows with finish_reason CACHE_FULL" if full_ok is not None else "")
    raise ValueError(f"prompt length {max_prompt} + {what} needs {need} cache slots, the "
                     f"{name} has max_len={cache.max_len}{hint}")
  return cache


def check_ids(vocab_size: int, *, pad_id=0, eos_id=None, stop_sequences=()) -> None:
  """ValueError naming the argument when pad_id, an EOS id or a stop-sequence id lies outside
  [0, vocab_size): an out-of-vocab pad poisons every padded row, an out-of-vocab EOS or stop
  id can never fire (the row silently runs to max_new_tokens)."""
  check_token_id("pad_id", pad_id, vocab_size)
  if eos_id is not None:
    if np.ndim(eos_id) == 0:
      check_token_id("eos_id", eos_id, vocab_size)
    else:
      check_token_ids("eos_id", np.asarray(eos_id), vocab_size)
  for i, seq in enumerate(stop_sequences):
    ids = np.asarray(seq)
    if ids.ndim != 1:
      raise ValueError(f"stop_sequences[{i}]={seq!r} must be a sequence of token ids "
                       "(stop_sequences is a list of them)")
    check_token_ids(f"stop_sequences[{i}]", ids, vocab_size)


def check_count(name: str, value) -> int:
  """`value` as an int >= 1, or a ValueError naming `name`."""
  if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
    raise ValueError(f"{name}={value!r} must be an integer >= 1")
  return int(value)


@dataclasses.dataclass(frozen=True)
class Request:
  """A validated decoding request: padded prompts and every array a decoding loop takes."""

  prompt_BP: np.ndarray  # i32[B, bucket(max prompt)], right-padded with pad_id
  lengths_B: np.ndarray  # i32[B]
  max_new_tokens: int
  prefill_len: int  # prompt tokens written before the loop (all but the last, bucketed)
  buf_len: int  # output buffer length (bucketed max_new_tokens)
  need: int  # cache slots the request needs
  sampler: Sampler
  keys_B: Array
  eos_E: Array
  stop_NS: Array
  cache: KVCache | PrefixCache

  @property
  def batch(self) -> int:
    return self.prompt_BP.shape[0]

  @property
  def max_prompt(self) -> int:
    return int(self.lengths_B.max())


def prepare(step_fn, prompt_tokens, *, max_new_tokens: int, cache=None, prompt_lengths=None,
            sampler: Sampler | None = None, key=None, eos_id: int | Sequence[int] | None = None,
            stop_sequences: Sequence[Sequence[int]] = (), pad_id: int = 0,
            extra_slots: int = 0, what: str = "max_new_tokens",
            stop_on_full_cache: bool | None = None) -> Request:
  """Validates and prepares a request for any decoding loop (before any compute).

  Checks every token id against the model's vocabulary (`check_ids`; the prompts in
  `pad_prompts`), pads the prompts to a bucket, makes or checks the cache (`make_cache`;
  the request needs max prompt + max_new_tokens - 1 + `extra_slots` slots), builds the
  sampler (default greedy), per-row keys, EOS and stop-sequence arrays and the prefill and
  buffer lengths.
  """
  check_step_fn(step_fn, "step_fn")
  check_ids(step_fn.vocab_size, pad_id=pad_id, eos_id=eos_id, stop_sequences=stop_sequences)
  prompt_BP, lens_B = pad_prompts(prompt_tokens, prompt_lengths, pad_id, step_fn.vocab_size)
  b = prompt_BP.shape[0]
  max_new_tokens = check_count("max_new_tokens", max_new_tokens)
  sampler = Sampler.greedy(b) if sampler is None else sampler
  if sampler.batch != b:
    raise ValueError(f"sampler has {sampler.batch} rows, the prompt batch has {b}")
  max_prompt = int(lens_B.max())
  need = max_prompt + max_new_tokens - 1 + extra_slots  # the last sampled token is never written
  cache = make_cache(cache, step_fn, b, max_prompt, need, what=what, full_ok=stop_on_full_cache)
  eos_E = jnp.asarray(np.atleast_1d(np.asarray(-1 if eos_id is None else eos_id, np.int32)))
  return Request(
      prompt_BP=prompt_BP, lengths_B=lens_B, max_new_tokens=max_new_tokens,
      prefill_len=min(bucket(max_prompt - 1), cache.max_len) if max_prompt > 1 else 0,
      buf_len=bucket(max_new_tokens), need=need, sampler=sampler, keys_B=row_keys(key, b),
      eos_E=eos_E, stop_NS=jnp.asarray(stop_array(stop_sequences)), cache=cache)


def row_keys(key, batch: int):
  """Per-row PRNG keys [B]: given as [B], or `fold_in(key, row)` from one key (default 0)."""
  if key is None:
    key = jax.random.key(0)
  elif not jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
    key = jax.random.wrap_key_data(key)  # raw uint32 keys from jax.random.PRNGKey
  if key.ndim == 0:
    return jax.vmap(lambda i: jax.random.fold_in(key, i))(jnp.arange(batch))
  if key.shape != (batch,):
    raise ValueError(f"key must be one key or one per row ({batch}), got shape {key.shape}")
  return key


def stop_array(stop_sequences: Sequence[Sequence[int]]) -> np.ndarray:
  """Stop sequences right-aligned in an i32[N, S] array, left-padded with -1.

  N and S are rounded up (to multiples of 4 and 8) so that changing the stop
  sequences rarely changes the shape, hence rarely recompiles.
  """
  seqs = [list(map(int, s)) for s in stop_sequences]
  if any(len(s) == 0 for s in seqs):
    raise ValueError("stop_sequences contains an empty sequence")
  if any(t < 0 for s in seqs for t in s):
    raise ValueError(f"stop_sequences must hold token ids >= 0, got {seqs}")
  n = round_up(max(len(seqs), 1), 4)
  s = round_up(max([len(x) for x in seqs] + [1]), 8)
  out = np.full((n, s), -1, np.int32)
  for i, seq in enumerate(seqs):
    out[i, s - len(seq):] = seq
  return out


def shard_batch(mesh: jax.sharding.Mesh, data_axis: str, params, batch_tree, other_tree):
  """Splits `batch_tree` (batch-leading leaves) over `data_axis`; replicates the rest.

  Params already placed on all of the mesh's devices keep their sharding.
  """
  if data_axis not in mesh.axis_names:
    raise ValueError(f"data_axis={data_axis!r} is not a mesh axis; valid: {mesh.axis_names}")
  n = mesh.shape[data_axis]
  batch = jax.tree.leaves(batch_tree)[0].shape[0]
  if batch % n:
    raise ValueError(f"batch {batch} must be divisible by the mesh's {data_axis!r} axis ({n})")
  devices = set(mesh.devices.flat)
  replicated = NamedSharding(mesh, PartitionSpec())
  split = NamedSharding(mesh, PartitionSpec(data_axis))

  def place_param(x):
    on_mesh = isinstance(x, jax.Array) and set(x.sharding.device_set) == devices
    return x if on_mesh else jax.device_put(x, replicated)

  return (jax.tree.map(place_param, params), jax.device_put(batch_tree, split),
          jax.device_put(other_tree, replicated))

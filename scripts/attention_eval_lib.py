"""Pruned-attention evaluation on real models: bits/byte of long windows through a
`model.Decoder` (dense, a block selector, or a KV-eviction policy), layouts' recall of the
true attention on the model's own queries and keys, and the retrieval sweeps of
`scripts/attention_eval.py`.

Every measurement runs a cached forward (`step_fn(params, tokens, cache)`), the path
selectors and eviction policies act on, for the dense baseline too, so rows differ only
in the attention they compute.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax

from scripts import data_lib


def document_windows(stream: data_lib.TokenStream, n: int, seq_len: int) -> np.ndarray:
  """[n, seq_len] tokens: the first seq_len tokens of the first n documents at least that
  long (a window never crosses a document boundary), or a ValueError saying how many
  exist."""
  starts = np.flatnonzero(stream.doc_start)
  ends = np.append(starts[1:], len(stream))
  long = starts[(ends - starts) >= seq_len]
  if len(long) < n:
    raise ValueError(f"the split has {len(long)} documents of >= {seq_len} tokens; asked for "
                     f"n={n} windows (lower n or seq_len)")
  return np.stack([np.asarray(stream.tokens[s:s + seq_len], np.int32) for s in long[:n]])


def _forward(step_fn):
  return jax.jit(lambda params, tokens, cache: step_fn(params, tokens, cache)[0])


def cached_nll(step_fn, params, tokens_BT: np.ndarray, *, batch: int = 4) -> tuple[float, int]:
  """(sum of next-token NLL in nats, targets) of each row as one cached forward from an empty
  cache; rows go `batch` at a time (the last batch is padded and its padding dropped)."""
  tokens_BT = np.asarray(tokens_BT, np.int32)
  n, t = tokens_BT.shape
  if batch < 1:
    raise ValueError(f"batch={batch} must be >= 1")
  fwd = _forward(step_fn)
  total, count = 0.0, 0
  for i in range(0, n, batch):
    rows = tokens_BT[i:i + batch]
    real = len(rows)
    rows = np.concatenate([rows, np.repeat(rows[-1:], batch - real, axis=0)])
    logits = fwd(params, jnp.asarray(rows), step_fn.init_cache(batch, t))
    nll = optax.softmax_cross_entropy_with_integer_labels(logits[:real, :-1],
                                                          jnp.asarray(rows[:real, 1:]))
    total += float(jnp.sum(nll))
    count += real * (t - 1)
  return total, count


def cached_bpb(step_fn, params, tokens_BT: np.ndarray, *, batch: int = 4) -> float:
  """Bits per byte (byte tokenizer: one target per byte) of `cached_nll`."""
  nll, count = cached_nll(step_fn, params, tokens_BT, batch=batch)
  return nll / max(count, 1) / np.log(2)

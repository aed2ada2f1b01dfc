"""Byte-level corpora, file-level splits, packing and a resumable batch iterator.

Corpus. The default corpus is the running interpreter's standard library: every
`.py` file under `sysconfig.get_paths()["stdlib"]` (this includes the
`pydoc_data/topics.py` help text), skipping `site-packages`, `dist-packages`,
test folders (`test`, `tests`, `idle_test`) and `__pycache__`; about 12 MB.
Alternatively `data.corpus="files"` reads a local file or folder (`data.path`).
Files are split into train / val / test by a hash of their relative path, so a
file never straddles splits and the split does not depend on the file order.
Two exceptions play the role of many files: `pydoc_data/topics.py` (0.75 MB of
help texts, which alone would make up most of a 5% split) is cut into
`CHUNK` byte pieces named `pydoc_data/topics.py#<i>`, and so is a single
local file given as `data.path`.

Tokens. Bytes are token ids 0..255 (`model.ByteTokenizer`); every document is
`[BOS] + bytes`. A split is one stream: the concatenation of its documents.

Batch convention. A batch is `{"tokens", "segment_ids", "positions"}`, each
int32 [B, L]. Rows are consecutive length-L windows of the stream; inside a row
segment ids count documents from 1 and positions restart at 0 at every document
start (and at the row start). Segment id 0 marks padding (only in evaluation
batches). Targets are the next tokens: position t predicts `tokens[:, t + 1]`
where `target_mask(segment_ids)` is true (same segment, not padding), so every
target is a byte and bits-per-byte is the mean target NLL over ln 2.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import os
import sysconfig
from collections.abc import Iterator

import ml_collections
import numpy as np

from model.tokenizer import ByteTokenizer

SPLITS = ("train", "val", "test")
CORPORA = ("stdlib", "files")
STDLIB_SKIP_DIRS = frozenset(
    {"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__"})
CHUNK = 4096
STDLIB_CHUNKED = frozenset({"pydoc_data/topics.py"})
BOS = ByteTokenizer.bos_id
PAD = ByteTokenizer.pad_id


def default_config() -> ml_collections.ConfigDict:
  """The `data` section of a run: the stdlib corpus, file-level splits, rows of 256 bytes."""
  c = ml_collections.ConfigDict()
  c.corpus = "stdlib"  # "stdlib" | "files"
  c.path = ""  # a text file or folder when corpus="files"
  c.extensions = ".py,.txt,.md,.rst"  # files read from a folder
  c.val_fraction = 0.05
  c.test_fraction = 0.05
  c.seq_len = 256
  c.batch_size = 32
  c.seed = 0  # row shuffling
  return c


@dataclasses.dataclass(frozen=True)
class TokenStream:
  """One split as a flat token stream; `doc_start[i]` marks the first token of a document."""

  tokens: np.ndarray  # uint16 [N]
  doc_start: np.ndarray  # bool [N]
  n_docs: int

  def __len__(self) -> int:
    return int(self.tokens.shape[0])


def stdlib_root() -> str:
  return sysconfig.get_paths()["stdlib"]


def _walk(root: str, suffixes: tuple[str, ...], skip: frozenset[str]) -> list[str]:
  out = []
  for d, dirs, files in os.walk(root):
    dirs[:] = sorted(x for x in dirs if x not in skip)
    out.extend(os.path.join(d, f) for f in sorted(files) if f.endswith(suffixes))
  return sorted(os.path.relpath(p, root) for p in out)


def write_documents(folder: str, lines, per_doc: int) -> list[str]:
  """`lines` as files of `per_doc` lines each in `folder` (a `corpus="files"` path); each
  file is one document. Returns the paths, in order."""
  os.makedirs(folder, exist_ok=True)
  paths = []
  for j in range(0, len(lines), per_doc):
    path = os.path.join(folder, f"doc{j // per_doc:06d}.txt")
    with open(path, "w") as f:
      f.write("".join(lines[j:j + per_doc]))
    paths.append(path)
  return paths


def split_of(name: str, val_fraction: float, test_fraction: float) -> str:
  """The split of a document, from the SHA-256 of its name (a relative path)."""
  u = int.from_bytes(hashlib.sha256(name.encode("utf-8")).digest()[:8], "big") / 2.0**64
  if u < val_fraction:
    return "val"
  return "test" if u < val_fraction + test_fraction else "train"


def validate(data) -> None:
  """Checks a `data` config section (fields, ranges, path) without reading file contents."""
  if data.corpus not in CORPORA:
    raise ValueError(f"config.data.corpus={data.corpus!r}; valid: {CORPORA}")
  for name in ("val_fraction", "test_fraction"):
    v = data[name]
    if not 0.0 < v < 0.5:
      raise ValueError(f"config.data.{name}={v} must be in (0, 0.5)")
  for name in ("seq_len", "batch_size"):
    if data[name] < 1:
      raise ValueError(f"config.data.{name}={data[name]} must be >= 1")
  if data.corpus == "files":
    _document_names(data.corpus, data.path, data.extensions)  # raises on a missing/empty path


def check_vocab(vocab_size: int, where: str) -> None:
  """ValueError unless a model with `vocab_size` logits covers every byte-tokenizer id
  (bytes 0-255, BOS 256, EOS 257, PAD 258): a smaller vocab gathers out of range and
  trains or evaluates to NaN. `where` names the setting (e.g. "config.model.vocab_size")."""
  need = ByteTokenizer.vocab_size
  if vocab_size < need:
    raise ValueError(f"{where}={vocab_size} is smaller than the byte tokenizer's {need} ids "
                     f"(bytes 0-255, BOS {BOS}, EOS {ByteTokenizer.eos_id}, PAD {PAD}); valid: "
                     f">= {need}")


def _document_names(corpus: str, path: str, extensions: str) -> tuple[str, list[str]]:
  """(root, relative file names) of a corpus; raises ValueError if there are none."""
  if corpus == "stdlib":
    root = stdlib_root()
    names = _walk(root, (".py",), STDLIB_SKIP_DIRS)
    if not names:
      raise ValueError(f"no .py files under the stdlib at {root!r}; use config.data.corpus=files")
    return root, names
  given = path
  path = os.path.abspath(os.path.expanduser(path)) if path else ""
  if not path or not os.path.exists(path):
    raise ValueError(
        f"config.data.path={given!r} does not exist; give a text file or a folder "
        "(required when config.data.corpus='files')")
  if os.path.isfile(path):
    if os.path.getsize(path) == 0:
      raise ValueError(f"config.data.path={given!r} is an empty file")
    return path, [""]
  suffixes = tuple(s.strip() for s in extensions.split(",") if s.strip())
  names = [n for n in _walk(path, suffixes, frozenset({"__pycache__", ".git"}))
           if os.path.getsize(os.path.join(path, n)) > 0]
  if not names:
    raise ValueError(
        f"config.data.path={given!r} holds no non-empty files ending in "
        f"{list(suffixes)} (config.data.extensions)")
  return path, names


def _documents(root: str, names: list[str], chunked: frozenset[str]):
  """(name, bytes) per document; files in `chunked` yield one document per CHUNK bytes."""
  if names == [""]:  # a single file
    root, names, chunked = os.path.dirname(root), [os.path.basename(root)], None
  for n in names:
    name = n.replace(os.sep, "/")
    with open(os.path.join(root, n), "rb") as f:
      raw = f.read()
    if chunked is None or name in chunked:
      for i in range(0, len(raw), CHUNK):
        yield f"{name}#{i // CHUNK}", raw[i:i + CHUNK]
    else:
      yield name, raw


def load_splits(data) -> dict[str, TokenStream]:
  """All three splits of the corpus named by a `data` config (cached in memory)."""
  validate(data)
  key = (data.corpus, data.path if data.corpus == "files" else "", data.extensions,
         float(data.val_fraction), float(data.test_fraction))
  return _load_cached(*key)


@functools.lru_cache(maxsize=4)
def _load_cached(corpus, path, extensions, val_fraction, test_fraction):
  root, names = _document_names(corpus, path, extensions)
  parts = {s: [] for s in SPLITS}
  chunked = STDLIB_CHUNKED if corpus == "stdlib" else frozenset()
  for name, raw in _documents(root, names, chunked):
    if raw:
      parts[split_of(name, val_fraction, test_fraction)].append(raw)
  streams = {}
  for split, docs in parts.items():
    lengths = np.array([len(d) + 1 for d in docs], np.int64)
    tokens = np.empty(int(lengths.sum()), np.uint16)
    doc_start = np.zeros(tokens.shape, bool)
    starts = np.cumsum(lengths) - lengths
    doc_start[starts] = True
    for s, d in zip(starts, docs, strict=True):
      tokens[s] = BOS
      tokens[s + 1:s + 1 + len(d)] = np.frombuffer(d, np.uint8)
    tokens.flags.writeable = False
    doc_start.flags.writeable = False
    streams[split] = TokenStream(tokens, doc_start, len(docs))
  return streams


def load_split(data, split: str) -> TokenStream:
  """One split ('train' | 'val' | 'test'); raises ValueError if it holds no documents."""
  if split not in SPLITS:
    raise ValueError(f"split={split!r}; valid: {SPLITS}")
  stream = load_splits(data)[split]
  if stream.n_docs == 0:
    where = f"config.data.path={data.path!r}" if data.corpus == "files" else "the stdlib"
    raise ValueError(
        f"split {split!r} of {where} holds no documents (files are split by a hash of "
        f"their path; val_fraction={data.val_fraction}, test_fraction={data.test_fraction}); "
        "add more files")
  return stream


def unigram_entropy_bits(stream: TokenStream) -> float:
  """Entropy in bits of the byte unigram distribution (BOS markers excluded)."""
  counts = np.bincount(stream.tokens, minlength=256)[:256].astype(np.float64)
  p = counts[counts > 0] / counts.sum()
  return float(-(p * np.log2(p)).sum())


def target_mask(segment_ids):
  """bool [B, L-1]: position t has a target `tokens[:, t+1]` (same segment, not padding)."""
  return (segment_ids[:, 1:] == segment_ids[:, :-1]) & (segment_ids[:, 1:] > 0)


def pack_rows(stream: TokenStream, starts: np.ndarray, seq_len: int) -> dict[str, np.ndarray]:
  """Rows `stream[s : s + seq_len]` for each start s, with segment ids and positions.

  A window that runs past the end of the stream is padded with PAD / segment 0.
  """
  n = len(stream)
  idx_BL = starts[:, None] + np.arange(seq_len)[None]
  valid_BL = idx_BL < n
  idx_BL = np.minimum(idx_BL, n - 1)
  tokens_BL = np.where(valid_BL, stream.tokens[idx_BL], PAD).astype(np.int32)
  new_BL = stream.doc_start[idx_BL] & valid_BL
  new_BL[:, 0] = True
  segment_ids_BL = np.cumsum(new_BL, axis=1, dtype=np.int32) * valid_BL
  col_BL = np.broadcast_to(np.arange(seq_len, dtype=np.int32), idx_BL.shape)
  last_start_BL = np.maximum.accumulate(np.where(new_BL, col_BL, 0), axis=1)
  positions_BL = ((col_BL - last_start_BL) * valid_BL).astype(np.int32)
  return {"tokens": tokens_BL, "segment_ids": segment_ids_BL, "positions": positions_BL}


def num_rows(stream: TokenStream, seq_len: int) -> int:
  """Full training rows in a stream (the tail shorter than a row is dropped)."""
  return len(stream) // seq_len


class BatchIterator:
  """Infinite, shuffled, resumable batches over the full rows of a stream.

  Batch n holds global rows n*B .. n*B+B-1; global row g is row `perm_e[g % R]`
  of epoch e = g // R, where perm_e is a permutation seeded by (seed, e). The
  whole position is `state["batch"]`, so restoring a state replays exactly the
  batches an uninterrupted run would have seen.
  """

  def __init__(self, stream: TokenStream, batch_size: int, seq_len: int, seed: int = 0):
    self.stream, self.batch_size, self.seq_len, self.seed = stream, batch_size, seq_len, seed
    self.n_rows = num_rows(stream, seq_len)
    if self.n_rows < 1:
      raise ValueError(
          f"config.data.seq_len={seq_len} exceeds the training stream ({len(stream)} tokens)")
    self.batch = 0
    self._perm_epoch, self._perm = -1, None

  @property
  def state(self) -> dict:
    return {"batch": self.batch, "seed": self.seed, "batch_size": self.batch_size,
            "seq_len": self.seq_len, "n_rows": self.n_rows}

  def restore(self, state: dict) -> None:
    mine = self.state
    for k in ("seed", "batch_size", "seq_len", "n_rows"):
      if state[k] != mine[k]:
        raise ValueError(f"cannot resume the data iterator: checkpoint has {k}={state[k]}, "
                         f"this run has {k}={mine[k]}")
    self.batch = int(state["batch"])

  def _rows(self, g: np.ndarray) -> np.ndarray:
    out = np.empty_like(g)
    for e in np.unique(g // self.n_rows):
      if e != self._perm_epoch:
        rng = np.random.default_rng([self.seed, int(e)])
        self._perm_epoch, self._perm = int(e), rng.permutation(self.n_rows)
      sel = g // self.n_rows == e
      out[sel] = self._perm[g[sel] % self.n_rows]
    return out

  def __iter__(self):
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    g = self.batch * self.batch_size + np.arange(self.batch_size, dtype=np.int64)
    self.batch += 1
    return pack_rows(self.stream, self._rows(g) * self.seq_len, self.seq_len)


def eval_batches(stream: TokenStream, batch_size: int, seq_len: int,
                 max_batches: int | None = None) -> Iterator[dict[str, np.ndarray]]:
  """In-order batches covering the whole stream once (the last one padded with segment 0).

  Consecutive rows do not overlap, so the first token of every row after the first
  has no target; that costs 1/seq_len of the targets and keeps rows independent.
  """
  n_rows = -(-len(stream) // seq_len)
  n_batches = -(-n_rows // batch_size)
  if max_batches is not None:
    n_batches = min(n_batches, max_batches)
  for b in range(n_batches):
    rows = np.arange(b * batch_size, (b + 1) * batch_size, dtype=np.int64)
    starts = np.where(rows < n_rows, rows * seq_len, len(stream))
    yield pack_rows(stream, starts, seq_len)


def calibration_batches(data, n_seqs: int, seq_len: int, *, seed: int = 0,
                        batch_size: int = 8, tokenizer=None) -> list[dict[str, np.ndarray]]:
  """`n_seqs` random windows of the train split for one-shot compression (as upstream: C4).

  Byte tokenizer (default): rows of the packed stream with segment ids (0 = padding).
  Another tokenizer (a model imported from Hugging Face): each window's bytes are
  decoded as UTF-8 and re-encoded, and rows shorter than `seq_len` are padded
  with segment 0. Batches of `batch_size` rows (the last one may be smaller).
  """
  for name, v in (("n_seqs", n_seqs), ("seq_len", seq_len), ("batch_size", batch_size)):
    if isinstance(v, bool) or not isinstance(v, int) or v < 1:
      raise ValueError(f"calibration {name}={v!r} must be a positive integer")
  stream = load_split(data, "train")
  byte_len = seq_len if tokenizer is None else 6 * seq_len
  if len(stream) <= byte_len:
    raise ValueError(f"calibration seq_len={seq_len} exceeds the train split "
                     f"({len(stream)} tokens)")
  rng = np.random.default_rng([seed, 17])
  starts = rng.integers(0, len(stream) - byte_len, size=n_seqs)
  if tokenizer is None:
    rows = pack_rows(stream, starts, seq_len)
    rows = {"tokens": rows["tokens"], "segment_ids": rows["segment_ids"]}
  else:
    tokens = np.zeros((n_seqs, seq_len), np.int32)
    seg = np.zeros((n_seqs, seq_len), np.int32)
    for i, s in enumerate(starts):
      raw = stream.tokens[s:s + byte_len]
      text = raw[raw < 256].astype(np.uint8).tobytes().decode("utf-8", errors="ignore")
      ids = tokenizer.encode(text)[:seq_len]
      tokens[i, :len(ids)], seg[i, :len(ids)] = ids, 1
    rows = {"tokens": tokens, "segment_ids": seg}
  return [{k: v[i:i + batch_size] for k, v in rows.items()}
          for i in range(0, n_seqs, batch_size)]

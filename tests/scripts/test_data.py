"""Data pipeline: file-level splits, packing, resumable iteration, entropy, bad paths."""

import math
import os

import numpy as np
import pytest

from model.tokenizer import ByteTokenizer
from scripts import data_lib
from scripts.configs.train import lm as train_config


def _data(**kw):
  c = train_config.get_config("test").data
  c.unlock()
  c.update(kw)
  return c


def _folder(tmp_path, n=40):
  rng = np.random.default_rng(0)
  for i in range(n):
    sub = tmp_path / f"d{i % 3}"
    sub.mkdir(exist_ok=True)
    words = rng.choice(["alpha", "beta", "gamma", "delta\n", "def f(x):\n"], size=20 + i)
    (sub / f"f{i}.txt").write_text(" ".join(words))
  (tmp_path / "skip.bin").write_bytes(b"\x00\x01")  # wrong extension: ignored
  return str(tmp_path)


def test_stdlib_split_deterministic_and_disjoint():
  root = data_lib.stdlib_root()
  names = data_lib._document_names("stdlib", "", "")[1]
  assert "pydoc_data/topics.py" in names and not any("site-packages" in n for n in names)
  assert not any(part in ("test", "tests") for n in names for part in n.split(os.sep))
  total = sum(os.path.getsize(os.path.join(root, n)) for n in names)
  assert 5e6 < total < 40e6  # "about 12 MB" on CPython 3.11
  first = {n: data_lib.split_of(n, 0.05, 0.05) for n in names}
  again = {n: data_lib.split_of(n, 0.05, 0.05) for n in reversed(names)}
  assert first == again
  counts = {s: sum(v == s for v in first.values()) for s in data_lib.SPLITS}
  assert counts["val"] > 5 and counts["test"] > 5 and counts["train"] > 0.8 * len(names)


def test_stdlib_streams_partition_the_files():
  streams = data_lib.load_splits(_data())
  names = data_lib._document_names("stdlib", "", "")[1]
  root = data_lib.stdlib_root()
  sizes = {s: 0 for s in data_lib.SPLITS}
  for n in names:
    size = os.path.getsize(os.path.join(root, n))
    if n in data_lib.STDLIB_CHUNKED:  # cut into CHUNK-byte documents
      for i in range(0, size, data_lib.CHUNK):
        piece = min(data_lib.CHUNK, size - i)
        sizes[data_lib.split_of(f"{n}#{i // data_lib.CHUNK}", 0.05, 0.05)] += piece + 1
    else:
      sizes[data_lib.split_of(n.replace(os.sep, "/"), 0.05, 0.05)] += size + (size > 0)
  for s in data_lib.SPLITS:
    assert len(streams[s]) == sizes[s]
    assert streams[s].n_docs == int(streams[s].doc_start.sum())
    assert np.all(streams[s].tokens[streams[s].doc_start] == data_lib.BOS)
  h = data_lib.unigram_entropy_bits(streams["train"])
  assert 4.0 < h < 6.0


def test_folder_split_is_disjoint_and_covers_every_file(tmp_path):
  path = _folder(tmp_path)
  streams = data_lib.load_splits(_data(corpus="files", path=path, val_fraction=0.2,
                                       test_fraction=0.2))
  docs = {s: _docs(streams[s]) for s in data_lib.SPLITS}
  files = {open(os.path.join(path, f"d{i % 3}", f"f{i}.txt"), "rb").read() for i in range(40)}
  assert set().union(*docs.values()) == files
  assert sum(len(d) for d in docs.values()) == 40  # disjoint
  assert all(docs[s] for s in data_lib.SPLITS)


def _docs(stream):
  starts = np.flatnonzero(stream.doc_start)
  ends = np.append(starts[1:], len(stream))
  return {stream.tokens[a + 1:b].astype(np.uint8).tobytes() for a, b in zip(starts, ends)}


def test_single_file_is_chunked(tmp_path):
  f = tmp_path / "one.txt"
  f.write_bytes(bytes(range(256)) * 200)  # 51200 bytes -> 13 chunks
  streams = data_lib.load_splits(_data(corpus="files", path=str(f), val_fraction=0.2,
                                       test_fraction=0.2))
  n = sum(s.n_docs for s in streams.values())
  assert n == math.ceil(51200 / data_lib.CHUNK)
  assert sum(len(s) for s in streams.values()) == 51200 + n


def _brute_force_row(tokens, doc_start, start, seq_len):
  seg, pos, toks, s, p = [], [], [], 0, 0
  for j in range(seq_len):
    i = start + j
    if i >= len(tokens):
      toks.append(data_lib.PAD), seg.append(0), pos.append(0)
      continue
    if j == 0 or doc_start[i]:
      s, p = s + 1, 0
    toks.append(int(tokens[i])), seg.append(s), pos.append(p)
    p += 1
  return toks, seg, pos


def test_packing_matches_brute_force():
  rng = np.random.default_rng(1)
  lengths = rng.integers(1, 12, size=30)
  doc_start = np.zeros(int(lengths.sum()), bool)
  doc_start[np.concatenate([[0], np.cumsum(lengths)[:-1]])] = True
  tokens = rng.integers(0, 256, size=doc_start.shape).astype(np.uint16)
  stream = data_lib.TokenStream(tokens, doc_start, len(lengths))
  starts = np.array([0, 3, 17, len(tokens) - 5, len(tokens)])
  b = data_lib.pack_rows(stream, starts, 16)
  for r, st in enumerate(starts):
    toks, seg, pos = _brute_force_row(tokens, doc_start, st, 16)
    np.testing.assert_array_equal(b["tokens"][r], toks)
    np.testing.assert_array_equal(b["segment_ids"][r], seg)
    np.testing.assert_array_equal(b["positions"][r], pos)
  mask = data_lib.target_mask(b["segment_ids"])
  assert not mask[-1].any()  # an all-padding row has no targets
  for r, st in enumerate(starts):  # a target iff the next token continues the same document
    want = [st + j + 1 < len(tokens) and not doc_start[st + j + 1] for j in range(15)]
    np.testing.assert_array_equal(mask[r], want)


def test_iterator_resume_equals_uninterrupted():
  full_stream = data_lib.load_split(_data(), "train")
  n = 10 * 32 + 5  # 10 rows: a short epoch, so the run crosses epoch boundaries
  stream = data_lib.TokenStream(full_stream.tokens[:n], full_stream.doc_start[:n], 1)
  make = lambda seed=3: data_lib.BatchIterator(stream, batch_size=4, seq_len=32, seed=seed)
  it = make()
  full = [next(it) for _ in range(8)]
  a = make()
  for _ in range(3):
    next(a)
  b = make()
  b.restore(a.state)
  resumed = [next(b) for _ in range(5)]
  for x, y in zip(full[3:], resumed):
    for k in x:
      np.testing.assert_array_equal(x[k], y[k])
  rows = [r.tobytes() for batch in full[:3] for r in batch["tokens"]]
  windows = {stream.tokens[i * 32:(i + 1) * 32].astype(np.int32).tobytes() for i in range(10)}
  assert set(rows[:10]) == windows  # each epoch visits every row once
  assert [r for r in rows[:10]] != [stream.tokens[i * 32:(i + 1) * 32].astype(np.int32).tobytes()
                                   for i in range(10)]  # shuffled
  with pytest.raises(ValueError, match="seed"):
    make(seed=4).restore(a.state)


def test_eval_batches_cover_stream_once(tmp_path):
  path = _folder(tmp_path)
  stream = data_lib.load_split(_data(corpus="files", path=path, val_fraction=0.2,
                                     test_fraction=0.2), "val")
  batches = list(data_lib.eval_batches(stream, batch_size=3, seq_len=16))
  toks = np.concatenate([b["tokens"][b["segment_ids"] > 0] for b in batches])
  np.testing.assert_array_equal(toks, stream.tokens)


@pytest.mark.parametrize("kw,match", [
    (dict(corpus="files", path="/nonexistent/x"), "config.data.path='/nonexistent/x'"),
    (dict(corpus="files", path=""), "config.data.path=''"),
    (dict(corpus="web"), "config.data.corpus='web'"),
    (dict(val_fraction=0.7), "config.data.val_fraction=0.7"),
])
def test_bad_data_config(kw, match):
  with pytest.raises(ValueError, match=match.replace("(", r"\(")):
    data_lib.validate(_data(**kw))


def test_empty_folder_and_file(tmp_path):
  (tmp_path / "empty.txt").write_text("")
  with pytest.raises(ValueError, match="no non-empty files"):
    data_lib.validate(_data(corpus="files", path=str(tmp_path)))
  with pytest.raises(ValueError, match="empty file"):
    data_lib.validate(_data(corpus="files", path=str(tmp_path / "empty.txt")))


def test_calibration_batches_bytes_and_retokenized():
  data = _data()
  batches = data_lib.calibration_batches(data, 10, 64, seed=3, batch_size=4)
  assert [b["tokens"].shape for b in batches] == [(4, 64), (4, 64), (2, 64)]
  again = data_lib.calibration_batches(data, 10, 64, seed=3, batch_size=4)
  np.testing.assert_array_equal(batches[1]["tokens"], again[1]["tokens"])  # seeded
  assert all((b["segment_ids"] > 0).all() for b in batches)  # windows never run past the end
  other = data_lib.calibration_batches(data, 3, 32, tokenizer=ByteTokenizer())
  toks, seg = other[0]["tokens"], other[0]["segment_ids"]
  assert toks.shape == (3, 32) and (toks[seg > 0] < 256).all()
  with pytest.raises(ValueError, match="n_seqs=0"):
    data_lib.calibration_batches(data, 0, 32)

"""Reward models that score candidates step by step: the oracle, a noisy oracle, a value head.

  score = OraclePRM(ARITHMETIC).bind(problem)        # samples -> (per-step scores, Cost)
  score = NoisyPRM(ARITHMETIC, fp=0.2, fn=0.1, sharpness=2.0).bind(problem)
  score = LearnedPRM(cfg, params, head, ARITHMETIC).bind(problem)

Every bound scorer follows `core.Score`: `score(samples)` returns one list of
scores in [0, 1] per sample, aligned with `base.segments(sample.text)` (its
complete steps), and a Cost of one reward call per sample. Each has `calls`
(the reward calls made so far, i.e. samples scored) and `vocab_size` (the token
vocabulary it reads; None for the vocabulary-free oracles), for `check_vocab`.

The oracle's label of step i is `task.step_labels` (steps 0..i keep a correct
solution reachable), except that the last step of a finished sample is labelled
by the outcome verifier `task.is_correct`. `NoisyPRM` reports those labels
through a binary channel (false positives at rate fp, false negatives at rate
fn) as miscalibrated confidences, deterministically per scored prefix.

The learned PRM is a value head (linear or a one-hidden-layer MLP) on the
policy's final-normed hidden state at the token that ENDS each step (its
STEP_SEP, or END for the last step of a finished text): the state that has read
the whole step. `labelled_steps` + `step_features` turn policy samples into
(features, labels) with process (oracle step) or outcome (final correctness)
targets, `fit_value_head` trains it (Adam, sigmoid cross-entropy), and
`save_head` / `load_head` keep it in one .npz (plus a readable .json of its meta).
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import math
import os
import tempfile
import time
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from decoding import request
from decoding.cost import Cost
from decoding.search.core import Sample, as_key, check_vocab_sizes
from decoding.tasks import base
from model import transformer
from model.config import ModelConfig
from model.tokenizer import ByteTokenizer
from model.tree import tree_nbytes, tree_size

TARGETS = ("process", "outcome")
HEAD_FORMAT = "sparq.value_head"
_TOK = ByteTokenizer()
_END_ID, _SEP_ID = ord(base.END), ord(base.STEP_SEP)
_STATS = ("x_mean", "x_std")  # feature standardisation stored in a head (not trained)


check_vocab = check_vocab_sizes  # (policy vocab_size, reward model vocab_size)


def _step_ends(seq, sep, end) -> list[int]:
  """Indices of the items ending each complete step of `seq` (a str or token ids): every
  `sep` before the first `end`, then that `end`; one per `base.segments` entry."""
  out = []
  for i, x in enumerate(seq):
    if x == end:
      out.append(i)
      break
    if x == sep:
      out.append(i)
  return out


def step_end_positions(text_tokens: Sequence[int]) -> list[int]:
  """Positions (in `text_tokens`, the byte ids of a sample's text) of the token that ends
  each complete step: each STEP_SEP before the first END, then the END itself.

  One position per `base.segments` entry, so step i is scored where it is complete.
  """
  return _step_ends([int(t) for t in text_tokens], _SEP_ID, _END_ID)


def _oracle_labels(task: base.Task, problem: base.Problem, text: str) -> list[bool]:
  labels = list(task.step_labels(problem, text))
  if base.is_finished(text) and labels:
    labels[-1] = bool(task.is_correct(problem, text))
  return labels


def _check_samples(samples) -> list[Sample]:
  samples = list(samples)
  for s in samples:
    if not isinstance(s, Sample):
      raise ValueError(f"score takes core.Sample candidates, got {type(s).__name__}")
  return samples


# ----------------------------------------------------------------------------- oracles


@dataclasses.dataclass(frozen=True)
class OraclePRM:
  """The task's exact verifier as a reward model.

  Process mode (outcome=False): step i scores 1.0 / 0.0 = `task.step_labels`, and the
  last step of a finished sample scores `task.is_correct` (the outcome verifier).
  Outcome mode (outcome=True), an outcome reward model: a finished sample (END written,
  or cut at the length limit: `Sample.finished`) gets one score [is_correct], an
  unfinished one [] (nothing to judge yet; `core.aggregate` gives 0 for it). Its lists
  are then not aligned with `segments`, so use it with methods that score finished
  candidates (best-of-n), not step-wise search.
  Process mode scores only complete steps; a sample cut at the length limit (no END)
  gets its steps' labels and no outcome.
  """

  task: base.Task
  outcome: bool = False

  def bind(self, problem: base.Problem) -> OracleScore:
    return OracleScore(self, problem)


class OracleScore:
  """`OraclePRM.bind(problem)`: exact labels of one problem's candidates."""

  vocab_size = None  # reads text, not tokens

  def __init__(self, prm: OraclePRM, problem: base.Problem):
    self.prm, self.problem = prm, problem
    self.calls = 0

  def __call__(self, samples: Sequence[Sample]) -> tuple[list[list[float]], Cost]:
    t0 = time.perf_counter()
    samples = _check_samples(samples)
    task, p = self.prm.task, self.problem
    out = []
    for s in samples:
      if self.prm.outcome:
        done = s.finished or base.is_finished(s.text)
        out.append([float(task.is_correct(p, s.text))] if done else [])
      else:
        out.append([float(v) for v in _oracle_labels(task, p, s.text)])
    self.calls += len(samples)
    return out, Cost(reward_calls=len(samples), wall_time_s=time.perf_counter() - t0)


def _check_prob(name: str, v) -> float:
  if isinstance(v, bool) or not isinstance(v, (int, float, np.integer, np.floating)) or not (
      0.0 <= float(v) <= 1.0):
    raise ValueError(f"{name}={v!r} must be a probability in [0, 1]")
  return float(v)


@dataclasses.dataclass(frozen=True)
class NoisyPRM:
  """The oracle's step labels seen through a noisy, miscalibrated reward model.

  Per step: the oracle label (as `OraclePRM`); the reported label flips a correct step
  to incorrect with probability `fn` and an incorrect one to correct with probability
  `fp`; the score is a confidence: a latent u uniform in (0.5, 1) if reported correct,
  in (0, 0.5) if reported incorrect, then score = sigmoid(sharpness * logit(u) + bias).
  sharpness 1 and bias 0 keep u (a PRM calibrated on its own reports: thresholding at
  0.5 gives the reported label); sharpness > 1 is overconfident (scores pushed to 0 / 1),
  < 1 underconfident; bias shifts every logit (> 0 optimistic).

  All randomness is a stable hash of (seed, problem prompt, step index, the text up to
  and including the step's separator): re-scoring a prefix gives the same score, and a
  step's score never depends on later text or on the other samples.
  """

  task: base.Task
  fp: float = 0.1
  fn: float = 0.1
  sharpness: float = 1.0
  bias: float = 0.0
  seed: int = 0

  def __post_init__(self):
    object.__setattr__(self, "fp", _check_prob("fp", self.fp))
    object.__setattr__(self, "fn", _check_prob("fn", self.fn))
    s = self.sharpness
    if isinstance(s, bool) or not isinstance(s, (int, float, np.integer, np.floating)) or not (
        math.isfinite(s) and s > 0):
      raise ValueError(f"sharpness={s!r} must be a finite number > 0 (1 = calibrated)")
    b = self.bias
    if isinstance(b, bool) or not isinstance(b, (int, float, np.integer, np.floating)) or not (
        math.isfinite(b)):
      raise ValueError(f"bias={b!r} must be a finite number (0 = unbiased)")
    if isinstance(self.seed, bool) or not isinstance(self.seed, (int, np.integer)):
      raise ValueError(f"seed={self.seed!r} must be an int")

  def bind(self, problem: base.Problem) -> NoisyScore:
    return NoisyScore(self, problem)

  def step_score(self, problem: base.Problem, index: int, prefix: str, label: bool) -> float:
    """The score of step `index` whose text (with everything before it) is `prefix`, given
    its oracle `label`."""
    msg = "\x00".join((str(int(self.seed)), problem.prompt, str(int(index)), prefix))
    digest = hashlib.blake2b(msg.encode("utf-8"), digest_size=16).digest()
    rng = np.random.default_rng(int.from_bytes(digest, "little"))
    flip, k = rng.random(), int(rng.integers(0, 1 << 52))
    reported = flip >= self.fn if label else flip < self.fp
    v = (k + 0.5) / float(1 << 52)  # uniform in (0, 1), both ends excluded
    u = 0.5 * (1.0 + v) if reported else 0.5 * v
    z = self.sharpness * (math.log(u) - math.log1p(-u)) + self.bias
    return 1.0 / (1.0 + math.exp(-z)) if z >= 0 else math.exp(z) / (1.0 + math.exp(z))


class NoisyScore:
  """`NoisyPRM.bind(problem)`: noisy confidences for one problem's candidates."""

  vocab_size = None

  def __init__(self, prm: NoisyPRM, problem: base.Problem):
    self.prm, self.problem = prm, problem
    self.calls = 0

  def __call__(self, samples: Sequence[Sample]) -> tuple[list[list[float]], Cost]:
    t0 = time.perf_counter()
    samples = _check_samples(samples)
    prm, p = self.prm, self.problem
    out = []
    for s in samples:
      labels = _oracle_labels(prm.task, p, s.text)
      ends = _step_ends(s.text, base.STEP_SEP, base.END)
      assert len(ends) == len(labels), (ends, labels)
      out.append([prm.step_score(p, i, s.text[: e + 1], lab)
                  for i, (e, lab) in enumerate(zip(ends, labels, strict=True))])
    self.calls += len(samples)
    return out, Cost(reward_calls=len(samples), wall_time_s=time.perf_counter() - t0)


# ----------------------------------------------------------------------------- value head


def _normed_states(module: transformer.Transformer, tokens_BT):
  x_BTD, _ = module.hidden_states(tokens_BT)
  return module.final_norm(x_BTD).astype(jnp.float32)


@functools.cache
def _feature_fn(cfg: ModelConfig):
  return jax.jit(lambda params, tokens_BT: transformer.Transformer(cfg).apply(
      {"params": params}, tokens_BT, method=_normed_states))


def _pad_rows(cfg: ModelConfig, token_rows) -> tuple[np.ndarray, list[int]]:
  """Right-padded i32[bucket(N), bucket(T)] (pad id 0; rows padded to a power of two)."""
  rows = [np.asarray(r).reshape(-1) for r in token_rows]
  if not rows:
    raise ValueError("token_rows is empty; give at least one row")
  lens = [len(r) for r in rows]
  for i, (r, n) in enumerate(zip(rows, lens, strict=True)):
    if n < 1:
      raise ValueError(f"token row {i} is empty; every row needs >= 1 token (BOS)")
    if n > cfg.max_seq_len:
      raise ValueError(f"token row {i} has {n} tokens, more than the model's "
                       f"max_seq_len={cfg.max_seq_len}")
    transformer.check_token_ids(f"token_rows[{i}]", r, cfg.vocab_size)
  t = min(request.bucket(max(lens)), cfg.max_seq_len)
  buf = np.zeros((1 << max(0, len(rows) - 1).bit_length(), t), np.int32)
  for i, r in enumerate(rows):
    buf[i, : len(r)] = r
  return buf, lens


def _features_padded(cfg: ModelConfig, params, token_rows):
  buf, lens = _pad_rows(cfg, token_rows)
  return _feature_fn(cfg)(params, jnp.asarray(buf)), buf.shape, lens


def value_features(cfg: ModelConfig, params, token_rows: Sequence[Sequence[int]]) -> np.ndarray:
  """The final-normed hidden states f32[N, T, D] of N token rows (T = the longest row).

  One jitted causal forward over the rows right-padded (pad id 0, which no real position
  sees) to a power-of-two row count and length bucket; positions past a row's length
  are padding.
  """
  x, _, lens = _features_padded(cfg, params, token_rows)
  return np.asarray(x[: len(lens), : max(lens)])


def step_features(cfg: ModelConfig, params, token_rows: Sequence[Sequence[int]],
                  positions: Sequence[Sequence[int]], *, batch_rows: int = 64) -> np.ndarray:
  """f32[M, D]: the features at each row's `positions`, rows in order (M = all positions),
  computed `batch_rows` rows per forward."""
  if len(token_rows) != len(positions):
    raise ValueError(f"{len(token_rows)} token rows but {len(positions)} position lists")
  out = []
  for start in range(0, len(token_rows), batch_rows):
    rows = token_rows[start : start + batch_rows]
    pos = positions[start : start + batch_rows]
    r_idx = np.concatenate([np.full(len(p), i, np.int32) for i, p in enumerate(pos)] + [
        np.zeros(0, np.int32)])
    t_idx = np.concatenate([np.asarray(p, np.int32).reshape(-1) for p in pos] + [
        np.zeros(0, np.int32)])
    for i, (r, p) in enumerate(zip(rows, pos, strict=True)):
      if len(p) and not (0 <= min(p) and max(p) < len(r)):
        raise ValueError(f"row {start + i}: positions {list(p)} fall outside its {len(r)} "
                         "tokens")
    if not len(r_idx):
      continue
    x, _, _ = _features_padded(cfg, params, rows)
    out.append(np.asarray(x[r_idx, t_idx]))
  d = cfg.d_model
  return np.concatenate(out) if out else np.zeros((0, d), np.float32)


def _check_int(name: str, v, lo: int) -> int:
  if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < lo:
    raise ValueError(f"{name}={v!r} must be an int >= {lo}")
  return int(v)


def init_value_head(d_model: int, key, hidden: int = 0) -> dict:
  """A value head's params (a plain dict): linear (hidden=0: w[D], b[]) or a one-hidden-
  layer GELU MLP (w1[D, H], b1[H], w2[H], b2[]), plus the feature standardisation
  x_mean[D] (zeros) and x_std[D] (ones) that `fit_value_head` sets from its data."""
  d_model, hidden = _check_int("d_model", d_model, 1), _check_int("hidden", hidden, 0)
  k1, k2 = jax.random.split(as_key(key))
  head = {"x_mean": jnp.zeros((d_model,), jnp.float32),
          "x_std": jnp.ones((d_model,), jnp.float32)}
  if hidden == 0:
    head["w"] = jax.random.normal(k1, (d_model,), jnp.float32) / math.sqrt(d_model)
    head["b"] = jnp.zeros((), jnp.float32)
  else:
    head["w1"] = jax.random.normal(k1, (d_model, hidden), jnp.float32) / math.sqrt(d_model)
    head["b1"] = jnp.zeros((hidden,), jnp.float32)
    head["w2"] = jax.random.normal(k2, (hidden,), jnp.float32) / math.sqrt(hidden)
    head["b2"] = jnp.zeros((), jnp.float32)
  return head


def head_dims(head: dict) -> tuple[int, int]:
  """(d_model, hidden) of a value head (hidden 0 = linear); ValueError for a malformed one."""
  if "w" in head and "b" in head:
    return int(np.shape(head["w"])[0]), 0
  if all(k in head for k in ("w1", "b1", "w2", "b2")):
    d, h = np.shape(head["w1"])
    return int(d), int(h)
  raise ValueError(f"value head with keys {sorted(head)} is neither linear (w, b) nor an "
                   "MLP (w1, b1, w2, b2)")


def value_head_apply(head: dict, x):
  """Logits [...] of features x [..., D] (sigmoid gives the step-correct probability)."""
  z = (x - head.get("x_mean", 0.0)) / head.get("x_std", 1.0)
  if "w1" in head:
    return jax.nn.gelu(z @ head["w1"] + head["b1"]) @ head["w2"] + head["b2"]
  return z @ head["w"] + head["b"]


def fit_value_head(features, labels, *, steps: int = 500, lr: float = 1e-2,
                   weight_decay: float = 1e-4, key=0, hidden: int = 0, batch_size: int = 256,
                   balance: bool = False) -> tuple[dict, dict]:
  """Trains a value head on (features f32[M, D], labels [M] in {0, 1}).

  Features are standardised by their mean / std (kept in the head); then `steps` AdamW
  steps (decay on the weights only) on the sigmoid cross-entropy over minibatches of
  `batch_size` rows drawn with replacement (the full set when M <= batch_size).
  `balance` weighs each class by M / (2 * its count) so a rare class counts as much.

  Returns:
    (head, history): history["loss"] f32[steps] per-step minibatch loss, and
    "train_loss" / "train_accuracy" (threshold 0.5) of the final head on all the data.
  """
  x = np.asarray(features, np.float32)
  y = np.asarray(labels)
  if x.ndim != 2 or x.shape[0] < 1:
    raise ValueError(f"features must be [M, D] with M >= 1, got shape {x.shape}")
  if y.shape != (x.shape[0],):
    raise ValueError(f"labels must be [M]={x.shape[0]} values, got shape {y.shape}")
  if not np.isin(y, (0, 1)).all():
    raise ValueError("labels must be 0 / 1 (or bools)")
  if not np.isfinite(x).all():
    raise ValueError("features hold non-finite values")
  steps, batch_size = _check_int("steps", steps, 1), _check_int("batch_size", batch_size, 1)
  hidden = _check_int("hidden", hidden, 0)
  for name, v, positive in (("lr", lr, True), ("weight_decay", weight_decay, False)):
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or (
        v <= 0 if positive else v < 0):
      raise ValueError(f"{name}={v!r} must be a finite number {'> 0' if positive else '>= 0'}")
  m, d = x.shape
  y = y.astype(np.float32)
  if balance:
    n_pos = float(y.sum())
    n_neg = m - n_pos
    w_pos = m / (2 * n_pos) if n_pos else 0.0
    w_neg = m / (2 * n_neg) if n_neg else 0.0
    w = np.where(y > 0, w_pos, w_neg).astype(np.float32)
  else:
    w = np.ones(m, np.float32)
  k_init, k_train = jax.random.split(as_key(key))
  head = init_value_head(d, k_init, hidden)
  stats = {"x_mean": jnp.asarray(x.mean(0)), "x_std": jnp.asarray(np.maximum(x.std(0), 1e-6))}
  params = {k: v for k, v in head.items() if k not in _STATS}
  opt = optax.adamw(lr, weight_decay=weight_decay,
                    mask=lambda p: {k: k.startswith("w") for k in p})
  xs, ys, ws = jnp.asarray(x), jnp.asarray(y), jnp.asarray(w)
  full = m <= batch_size

  def loss_fn(p, xb, yb, wb):
    logits = value_head_apply({**p, **stats}, xb)
    per = optax.sigmoid_binary_cross_entropy(logits, yb)
    return jnp.sum(wb * per) / jnp.maximum(jnp.sum(wb), 1e-12)

  def step(carry, k):
    p, s = carry
    if full:
      xb, yb, wb = xs, ys, ws
    else:
      idx = jax.random.randint(k, (batch_size,), 0, m)
      xb, yb, wb = xs[idx], ys[idx], ws[idx]
    loss, g = jax.value_and_grad(loss_fn)(p, xb, yb, wb)
    upd, s = opt.update(g, s, p)
    return (optax.apply_updates(p, upd), s), loss

  @jax.jit
  def train(p, k):
    (p, _), losses = jax.lax.scan(step, (p, opt.init(p)), jax.random.split(k, steps))
    return p, losses

  params, losses = train(params, k_train)
  head = {**params, **stats}
  logits = value_head_apply(head, xs)
  history = {"loss": np.asarray(losses),
             "train_loss": float(loss_fn(params, xs, ys, ws)),
             "train_accuracy": float(np.mean((np.asarray(logits) > 0) == (y > 0)))}
  return head, history


# ----------------------------------------------------------------------------- learned PRM


def sample_row(task: base.Task, problem: base.Problem, text: str) -> tuple[list[int], list[int]]:
  """(BOS + prompt + text token ids, the row positions ending each complete step)."""
  prompt = task.prompt_tokens(problem)
  toks = _TOK.encode(text)
  return [*prompt, *toks], [len(prompt) + i for i in step_end_positions(toks)]


def labelled_steps(task: base.Task, problem: base.Problem, samples: Sequence[Sample], *,
                   target: str = "process"
                   ) -> tuple[list[list[int]], list[list[int]], list[np.ndarray]]:
  """Training data for a value head from policy samples of one problem.

  Returns (token rows, positions, labels), one entry per sample: the row BOS + prompt +
  text, the positions of its step ends (as `step_end_positions`, offset by the prompt)
  and i32 labels, one per step. target="process": step i's oracle label (as
  `OraclePRM`: task.step_labels, the last step of a finished sample task.is_correct);
  "outcome": every step gets the sample's final correctness (an ORM-style target with
  no step labels; unfinished samples count as wrong). Feed `step_features(rows,
  positions)` and `np.concatenate(labels)` to `fit_value_head`.
  """
  if target not in TARGETS:
    raise ValueError(f"target={target!r} must be one of {TARGETS}")
  rows, positions, labels = [], [], []
  for s in _check_samples(samples):
    row, pos = sample_row(task, problem, s.text)
    if target == "process":
      lab = _oracle_labels(task, problem, s.text)
    else:
      lab = [bool(task.is_correct(problem, s.text))] * len(pos)
    assert len(lab) == len(pos), (s.text, lab, pos)
    rows.append(row)
    positions.append(pos)
    labels.append(np.asarray(lab, np.int32))
  return rows, positions, labels


@dataclasses.dataclass(frozen=True)
class LearnedPRM:
  """A value head on the policy model's final-normed hidden states as a process RM.

  `bind(problem)(samples)`: one batched forward over BOS + prompt + text of every
  sample with a complete step (rows padded to a power of two, length to a bucket), and
  step i's score = sigmoid(head(state at the token ending step i)).
  Cost: reward_calls = len(samples) (forward_passes / forward_tokens count the policy
  only, so they stay 0 here); flops = 2 * P * rows * length (padded; P = logical
  params) + 4 * layers * heads * head_dim * rows * length^2 (the full causal score and
  value products, as computed) + 2 * head params per scored step; bytes_moved = the
  params' and head's stored bytes, read once (no KV cache).
  """

  cfg: ModelConfig
  params: object
  head: dict
  task: base.Task

  def __post_init__(self):
    d, _ = head_dims(self.head)
    if d != self.cfg.d_model:
      raise ValueError(f"value head input dim {d} differs from the model's "
                       f"d_model={self.cfg.d_model}")

  def bind(self, problem: base.Problem) -> LearnedScore:
    return LearnedScore(self, problem)


class LearnedScore:
  """`LearnedPRM.bind(problem)`: the value head scoring one problem's candidates."""

  def __init__(self, prm: LearnedPRM, problem: base.Problem):
    self.prm, self.problem = prm, problem
    self.vocab_size = prm.cfg.vocab_size
    self.calls = 0

  def __call__(self, samples: Sequence[Sample]) -> tuple[list[list[float]], Cost]:
    t0 = time.perf_counter()
    samples = _check_samples(samples)
    prm = self.prm
    made = [sample_row(prm.task, self.problem, s.text) for s in samples]
    live = [i for i, (_, pos) in enumerate(made) if pos]
    out: list[list[float]] = [[] for _ in samples]
    cost = Cost(reward_calls=len(samples))
    if live:
      x, (b, t), _ = _features_padded(prm.cfg, prm.params, [made[i][0] for i in live])
      r_idx = np.concatenate([np.full(len(made[i][1]), r, np.int32) for r, i in enumerate(live)])
      t_idx = np.concatenate([np.asarray(made[i][1], np.int32) for i in live])
      probs = np.asarray(jax.nn.sigmoid(value_head_apply(prm.head, x[r_idx, t_idx])),
                         np.float64)
      start = 0
      for i in live:
        n = len(made[i][1])
        out[i] = [float(v) for v in probs[start : start + n]]
        start += n
      c = prm.cfg
      attn = 4.0 * c.n_layers * c.n_heads * c.dh * b * t * t
      cost += Cost(flops=2.0 * tree_size(prm.params) * b * t + attn
                   + 2.0 * tree_size(prm.head) * len(t_idx),
                   bytes_moved=float(tree_nbytes(prm.params) + tree_nbytes(prm.head)))
    self.calls += len(samples)
    return out, cost.replace(wall_time_s=time.perf_counter() - t0)


# ----------------------------------------------------------------------------- save / load


def _atomic_write(path: str, write) -> None:
  d = os.path.dirname(os.path.abspath(path))
  os.makedirs(d, exist_ok=True)
  fd, tmp = tempfile.mkstemp(dir=d, prefix=".tmp-", suffix=os.path.basename(path))
  try:
    with os.fdopen(fd, "wb") as f:
      write(f)
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.remove(tmp)
    raise


def _npz_path(path) -> str:
  path = os.fspath(path)
  return path if path.endswith(".npz") else path + ".npz"


def save_head(path, head: dict, meta: dict | None = None) -> str:
  """Writes a value head to `path` (.npz appended if missing) with its JSON `meta` inside,
  and a readable copy of the meta beside it (.json); each file is written to a temporary
  file and moved into place, so a reader never sees a partial file. Returns the .npz path.
  """
  d, hidden = head_dims(head)
  try:
    info = json.dumps({"format": HEAD_FORMAT, "version": 1, "d_model": d, "hidden": hidden,
                       "meta": {} if meta is None else meta}, indent=1, sort_keys=True)
  except TypeError as e:
    raise ValueError(f"value head meta must be JSON-serialisable: {e}") from None
  npz = _npz_path(path)
  arrays = {k: np.asarray(v, np.float32) for k, v in head.items()}
  if "__meta__" in arrays:
    raise ValueError("a value head param may not be named '__meta__'")
  arrays["__meta__"] = np.frombuffer(info.encode("utf-8"), np.uint8)
  _atomic_write(npz[: -len(".npz")] + ".json", lambda f: f.write(info.encode("utf-8")))
  _atomic_write(npz, lambda f: np.savez(f, **arrays))
  return npz


def load_head(path) -> tuple[dict, dict]:
  """(head, meta) saved by `save_head`."""
  npz = _npz_path(path)
  with np.load(npz, allow_pickle=False) as z:
    if "__meta__" not in z.files:
      raise ValueError(f"{npz} is not a saved value head (no __meta__ entry)")
    info = json.loads(bytes(z["__meta__"]).decode("utf-8"))
    head = {k: jnp.asarray(z[k]) for k in z.files if k != "__meta__"}
  if info.get("format") != HEAD_FORMAT:
    raise ValueError(f"{npz} has format {info.get('format')!r}, expected {HEAD_FORMAT!r}")
  head_dims(head)
  return head, info["meta"]

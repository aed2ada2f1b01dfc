"""GPTQ on one layer: parity with a NumPy float64 transcription of the reference, vs RTN."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from model.qarray import codes, dequantize
from quant import gptq
from quant.rtn import quantize_tensor

IN, OUT, TOKENS = 64, 24, 256


def _layer(seed=0, in_dim=IN, out_dim=OUT, tokens=TOKENS, dead=()):
  """Kernel [in, out] and correlated inputs X [tokens, in], float32, fixed seed."""
  rng = np.random.default_rng(seed)
  mix = np.eye(in_dim) + 0.7 * rng.standard_normal((in_dim, in_dim)) / np.sqrt(in_dim)
  scales = np.exp(rng.standard_normal(in_dim) * 0.5)
  x = (rng.standard_normal((tokens, 4)) @ rng.standard_normal((4, in_dim))
       + rng.standard_normal((tokens, in_dim)) @ mix) * scales
  x[:, list(dead)] = 0.0
  w = rng.standard_normal((in_dim, out_dim)) * np.exp(rng.standard_normal(out_dim) * 0.3)
  return w.astype(np.float32), x.astype(np.float32)


def _hessian(x):
  return (x.T @ x).astype(np.float32)


def _err(w, w_hat, x):
  x, w, w_hat = (np.asarray(a, np.float64) for a in (x, w, w_hat))
  return float(np.linalg.norm(x @ (w - w_hat)) / np.linalg.norm(x @ w))


# ----------------------------------------------------------------------------- reference
# A transcription of the reference GPTQ (`GPTQ.fasterquant` + `Quantizer.find_params` /
# `quantize`, per channel, min-max, no MSE search) in its own torch orientation: W is
# [out, in] (rows = output channels), columns are the inputs. float64 throughout.


class _Quantizer:
  """Reference min-max quantizer with per-row (output channel) parameters."""

  def __init__(self, bits, sym):
    self.maxq, self.sym = 2 ** bits - 1, sym
    self.scale = self.zero = None

  def find_params(self, x):
    xmin = np.minimum(x.min(1), 0.0)
    xmax = np.maximum(x.max(1), 0.0)
    if self.sym:
      xmax = np.maximum(np.abs(xmin), xmax)
      neg = xmin < 0
      xmin = xmin.copy()
      xmin[neg] = -xmax[neg]
    both = (xmin == 0) & (xmax == 0)
    xmin, xmax = xmin.copy(), xmax.copy()
    xmin[both], xmax[both] = -1.0, 1.0
    self.scale = (xmax - xmin) / self.maxq
    if self.sym:
      self.zero = np.full_like(self.scale, (self.maxq + 1) / 2)
    else:
      self.zero = np.round(-xmin / self.scale)

  def quantize(self, w):
    u = np.clip(np.round(w / self.scale) + self.zero, 0, self.maxq)
    return self.scale * (u - self.zero), u


def _reference(kernel, hessian, *, bits, groupsize=-1, sym=False, actorder=False,
               static_groups=False, blocksize=128, percdamp=0.01):
  """(Q [in, out], codes u [in, out]) from the transcription, back in the kernel orientation."""
  W = np.array(kernel, np.float64).T.copy()
  H = np.array(hessian, np.float64).copy()
  columns = W.shape[1]
  quantizer = _Quantizer(bits, sym)
  quantizer.find_params(W)
  dead = np.diag(H) == 0
  H[dead, dead] = 1
  W[:, dead] = 0
  if static_groups:
    groups = []
    for i in range(0, columns, groupsize):
      g = _Quantizer(bits, sym)
      g.find_params(W[:, i:i + groupsize])
      groups.append(g)
  if actorder:
    perm = np.argsort(-np.diag(H), kind="stable")
    W = W[:, perm]
    H = H[perm][:, perm]
    invperm = np.argsort(perm)
  Q = np.zeros_like(W)
  U = np.zeros_like(W)
  H[np.arange(columns), np.arange(columns)] += percdamp * np.mean(np.diag(H))
  Hinv = np.linalg.cholesky(np.linalg.inv(H)).T  # upper: Hinv^T Hinv = H^-1
  for i1 in range(0, columns, blocksize):
    i2 = min(i1 + blocksize, columns)
    W1 = W[:, i1:i2].copy()
    Err1 = np.zeros_like(W1)
    Hinv1 = Hinv[i1:i2, i1:i2]
    for i in range(i2 - i1):
      w = W1[:, i]
      d = Hinv1[i, i]
      if groupsize != -1:
        if not static_groups:
          if (i1 + i) % groupsize == 0:
            quantizer.find_params(W[:, i1 + i:i1 + i + groupsize])
        else:
          idx = perm[i1 + i] if actorder else i1 + i
          quantizer = groups[idx // groupsize]
      q, u = quantizer.quantize(w)
      Q[:, i1 + i], U[:, i1 + i] = q, u
      err1 = (w - q) / d
      W1[:, i:] -= np.outer(err1, Hinv1[i, i:])
      Err1[:, i] = err1
    W[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]
  if actorder:
    Q, U = Q[:, invperm], U[:, invperm]
  return Q.T, U.T


# ----------------------------------------------------------------------------- parity


def _signed(bits, u):
  return np.asarray(u) - 2 ** (bits - 1)


@pytest.mark.parametrize("blocksize,group_size,sym",
                         list(itertools.product((16, 128), (None, 16), (True, False))))
def test_matches_reference_transcription(blocksize, group_size, sym):
  w, x = _layer(0)
  h = _hessian(x)
  res = gptq.gptq_sweep(w, h, bits=4, group_size=group_size, sym=sym, blocksize=blocksize)
  q_ref, u_ref = _reference(w, h, bits=4, groupsize=group_size or -1, sym=sym,
                            blocksize=blocksize)
  agree = np.mean(np.asarray(codes(res.qarray)) == _signed(4, u_ref))
  assert agree >= 0.99, agree
  e, e_ref = _err(w, dequantize(res.qarray), x), _err(w, q_ref, x)
  assert abs(e / e_ref - 1) <= 0.02, (e, e_ref)
  assert (res.qarray.zero is None) == sym
  assert res.qarray.scale.shape == ((1, OUT) if group_size is None else (IN // 16, OUT))


@pytest.mark.parametrize("group_size,static_groups", [(None, False), (16, False), (16, True)])
def test_act_order_matches_reference_with_static_groups(group_size, static_groups):
  w, x = _layer(1)
  h = _hessian(x)
  qa = gptq.gptq_layer(w, h, bits=4, group_size=group_size, act_order=True, blocksize=16,
                       static_groups=static_groups)
  q_ref, u_ref = _reference(w, h, bits=4, groupsize=group_size or -1, actorder=True,
                            static_groups=group_size is not None, blocksize=16)
  assert np.mean(np.asarray(codes(qa)) == _signed(4, u_ref)) >= 0.99
  e, e_ref = _err(w, dequantize(qa), x), _err(w, q_ref, x)
  assert abs(e / e_ref - 1) <= 0.02, (e, e_ref)


def test_static_groups_without_act_order_match_reference():
  w, x = _layer(2)
  h = _hessian(x)
  qa = gptq.gptq_layer(w, h, bits=4, group_size=16, static_groups=True, blocksize=32, sym=True)
  q_ref, u_ref = _reference(w, h, bits=4, groupsize=16, static_groups=True, blocksize=32,
                            sym=True)
  assert np.mean(np.asarray(codes(qa)) == _signed(4, u_ref)) >= 0.99
  assert abs(_err(w, dequantize(qa), x) / _err(w, q_ref, x) - 1) <= 0.02


def test_dead_channels_and_other_bit_widths_match_reference():
  w, x = _layer(3, dead=(5, 40))
  h = _hessian(x)
  for bits in (2, 8):
    res = gptq.gptq_sweep(w, h, bits=bits, group_size=16, blocksize=32)
    q_ref, u_ref = _reference(w, h, bits=bits, groupsize=16, blocksize=32)
    np.testing.assert_array_equal(np.asarray(res.weights)[[5, 40]], 0.0)
    assert np.mean(np.asarray(codes(res.qarray)) == _signed(bits, u_ref)) >= 0.99
    assert abs(_err(w, res.weights, x) / _err(w, q_ref, x) - 1) <= 0.02


@pytest.mark.parametrize("kw", [dict(), dict(group_size=16, sym=True), dict(act_order=True),
                                dict(act_order=True, group_size=16), dict(bits=2, blocksize=24)])
def test_dequantize_equals_the_sweep_weights_exactly(kw):
  w, x = _layer(4)
  kw = dict(dict(bits=4, blocksize=16), **kw)
  res = gptq.gptq_sweep(w, _hessian(x), **kw)
  np.testing.assert_array_equal(np.asarray(dequantize(res.qarray)), np.asarray(res.weights))
  c = np.asarray(codes(res.qarray))
  bits = kw["bits"]
  assert c.min() >= -2 ** (bits - 1) and c.max() < 2 ** (bits - 1)


# ----------------------------------------------------------------------------- quality


@pytest.mark.parametrize("seed,group_size,sym", [(10, None, False), (11, 16, False),
                                                 (12, None, True), (13, 16, True)])
def test_beats_rtn(seed, group_size, sym):
  w, x = _layer(seed)
  qa = gptq.gptq_layer(w, _hessian(x), bits=4, group_size=group_size, sym=sym)
  rtn = quantize_tensor(w, bits=4, group_size=group_size, symmetric=sym)
  assert _err(w, dequantize(qa), x) < 0.9 * _err(w, dequantize(rtn), x)


def test_tiny_layer_is_near_the_brute_force_optimum():
  """in=4, out=2, 2 bits: every code assignment on GPTQ's fixed per-channel grid."""
  worst = 0.0
  for seed in range(5):
    w, x = _layer(20 + seed, in_dim=4, out_dim=2, tokens=32)
    h = np.asarray(_hessian(x), np.float64)
    res = gptq.gptq_sweep(w, h, bits=2, percdamp=1e-6)
    scale = np.asarray(res.qarray.scale, np.float64)[0]
    zero = np.asarray(res.qarray.zero, np.float64)[0] + 2  # unsigned zero point
    grid = np.array(list(itertools.product(range(4), repeat=4)), np.float64)  # [256, in]
    for o in range(2):
      cand = (grid - zero[o]) * scale[o] - w[:, o]  # [256, in] errors
      opt = np.min(np.einsum("ki,ij,kj->k", cand, h, cand))
      e = np.asarray(res.weights, np.float64)[:, o] - w[:, o]
      got = e @ h @ e
      assert got >= opt * (1 - 1e-6)
      worst = max(worst, got / opt)
  assert worst <= 1.5, worst  # GPTQ is greedy: within 1.5x the exact least-squares optimum


# ----------------------------------------------------------------------------- bad input


@pytest.mark.parametrize("kernel,hessian,kw,match", [
    (np.ones((8, 4)), np.eye(8), dict(bits=3), "bits=3"),
    (np.ones((8, 4)), np.eye(8), dict(bits=True), "bits=True"),
    (np.ones((8, 4)), np.eye(8), dict(bits=4, group_size=3), "group_size=3"),
    (np.ones((8, 4)), np.eye(8), dict(bits=4, group_size=0), "group_size=0"),
    (np.ones(8), np.eye(8), dict(bits=4), "kernel must be a non-empty 2-D"),
    (np.ones((8, 4, 1)), np.eye(8), dict(bits=4), "kernel must be a non-empty 2-D"),
    (np.ones((8, 4), np.int32), np.eye(8), dict(bits=4), "kernel must be a floating"),
    (np.ones((8, 4)), np.eye(6), dict(bits=4), "hessian shape"),
    (np.ones((8, 4)), np.ones((8, 6)), dict(bits=4), "hessian must be a square"),
    (np.full((8, 4), np.nan), np.eye(8), dict(bits=4), "kernel contains NaN"),
    (np.full((8, 4), np.inf), np.eye(8), dict(bits=4), "kernel contains NaN or Inf"),
    (np.ones((8, 4)), np.diag([1.0] * 7 + [np.nan]), dict(bits=4), "hessian contains NaN"),
    (np.ones((8, 4)), np.eye(8), dict(bits=4, percdamp=0.0), "percdamp=0.0"),
    (np.ones((8, 4)), np.eye(8), dict(bits=4, percdamp=-1.0), "percdamp=-1.0"),
    (np.ones((8, 4)), np.eye(8), dict(bits=4, blocksize=0), "blocksize=0"),
    (np.ones((8, 4)), np.eye(8), dict(bits=4, static_groups=True), "static_groups=True"),
    (np.ones((8, 4)), np.eye(8), dict(bits=4, sym=1), "sym=1"),
    (np.ones((6, 4)), np.eye(6), dict(bits=2), "divisible by 4"),
])
def test_rejects_bad_arguments(kernel, hessian, kw, match):
  with pytest.raises(ValueError, match=match):
    gptq.gptq_layer(kernel, hessian, **kw)

"""The AQT bit-operations cost model: sum over a forward's matmuls of mults x wbits x abits.

Abdolrashidi et al., "Pareto-Optimal Quantized ResNet Is Mostly 4-bit" (AQT) compare
models by bit-ops: for every multiply of a matmul, the weight operand's bits times
the activation operand's bits. Here a forward of `tokens` query tokens (after
`context` cached ones) counts

  kernels    tokens x in x out mults per 2-D weight (q, k, v, o, gate, up, down, an
             untied lm_head; N:M kernels only their kept values), weight bits: the
             QArray's bits or the compute dtype's for a float leaf; activation bits:
             8 for W8A8 leaves (act_bits), else `act_bits` for quantized leaves (QAT
             activation quantization) or the compute dtype's bits;
  lm_head    the tied embedding's x @ E^T (weight bits of the embedding leaf);
  attention  q.k scores and p.v per layer, both operands activations (abits x abits),
             causal: query i sees context + i + 1 keys, each of n_heads x head_dim mults.

The embedding lookup is a gather (no mults); norms, RoPE and softmax are not matmuls.
"""

from __future__ import annotations

import jax.numpy as jnp

from model.config import ModelConfig
from model.nm_array import is_nmarray
from model.qarray import is_qarray
from model.tree import flatten


def _dtype_bits(dtype) -> int:
  return jnp.dtype(dtype).itemsize * 8


def _weight(leaf, cfg: ModelConfig) -> tuple[int, int, int | None, bool]:
  """(kept rows, out, weight bits, quantized?) of a kernel leaf as the matmul sees it."""
  if is_nmarray(leaf):
    vals = leaf.values
    rows, out = vals.shape[0], vals.shape[1]
  else:
    vals, (rows, out) = leaf, leaf.shape
  if is_qarray(vals):
    return rows, out, vals.bits, True
  return rows, out, _dtype_bits(cfg.jnp_dtype), False


def bit_ops(cfg: ModelConfig, params, *, tokens: int = 1, context: int = 0,
            act_bits: int | None = None) -> dict:
  """The bit-ops report of one forward of `tokens` tokens: per kernel, attention, totals.

  Args:
    params: float, QArray or NMArray leaves (e.g. the output of `quant.quantize`).
    act_bits: activation bits at the quantized kernels (QAT activation quantization);
      None: the compute dtype's bits (weight-only quantization).
  Returns {"kernels": {path: {mults, w_bits, a_bits, bit_ops}}, "attention": {...},
  "kernel_bit_ops", "attention_bit_ops", "total_bit_ops", "total_mults"}.
  """
  for name, v, lo in (("tokens", tokens, 1), ("context", context, 0)):
    if isinstance(v, bool) or not isinstance(v, int) or v < lo:
      raise ValueError(f"bit_ops: {name}={v!r}; valid: an int >= {lo}")
  if act_bits is not None and (isinstance(act_bits, bool) or act_bits not in range(2, 33)):
    raise ValueError(f"bit_ops: act_bits={act_bits!r}; valid: None or an int in 2..32")
  a_float = _dtype_bits(cfg.jnp_dtype)
  kernels = {}
  paths, leaves, _ = flatten(params)
  for path, leaf in zip(paths, leaves, strict=True):
    is_kernel = path.endswith("/kernel") and len(leaf.shape) == 2
    is_tied_head = cfg.tie_embeddings and path == "embed/embedding"
    if not (is_kernel or is_tied_head):
      continue
    rows, out, w_bits, quantized = _weight(leaf, cfg)
    if is_tied_head:  # [V, D] used as x @ E^T: D mults per logit
      rows, out, path = out, rows, "lm_head (tied embed/embedding)"
    lq = leaf.values if is_nmarray(leaf) else leaf
    if is_qarray(lq) and lq.act_bits:
      a_bits = lq.act_bits
    elif quantized and act_bits is not None:
      a_bits = act_bits
    else:
      a_bits = a_float
    mults = tokens * rows * out
    kernels[path] = dict(mults=mults, w_bits=w_bits, a_bits=a_bits,
                         bit_ops=mults * w_bits * a_bits)
  keys = tokens * context + tokens * (tokens + 1) // 2
  per = keys * cfg.n_heads * cfg.dh  # per layer, for each of q.k and p.v
  attention = {f"layers_{i}/attn/{name}": dict(mults=per, w_bits=a_float, a_bits=a_float,
                                               bit_ops=per * a_float * a_float)
               for i in range(cfg.n_layers) for name in ("scores", "pv")}
  k_ops = sum(v["bit_ops"] for v in kernels.values())
  a_ops = sum(v["bit_ops"] for v in attention.values())
  return dict(tokens=tokens, context=context, kernels=kernels, attention=attention,
              kernel_bit_ops=k_ops, attention_bit_ops=a_ops, total_bit_ops=k_ops + a_ops,
              total_mults=sum(v["mults"] for v in (*kernels.values(), *attention.values())))

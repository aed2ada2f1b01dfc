"""Backend selection for the Pallas kernels; `model/ops.py` calls only this module.

Which path runs for `int8_matmul`:

| backend | impl=None (auto)             | impl="pallas"                | impl="reference" |
|---------|------------------------------|------------------------------|------------------|
| tpu     | compiled Mosaic kernel       | compiled Mosaic kernel       | XLA reference    |
| gpu     | XLA reference                | error unless interpreted     | XLA reference    |
| cpu     | XLA reference                | interpreted kernel           | XLA reference    |

Asking for interpretation (`interpret=True`, `interpret=pltpu.InterpretParams()`,
or the environment variable `SPARQ_PALLAS_INTERPRET=1` / `=tpu`) runs the Pallas
kernel in interpret mode on any backend unless impl="reference". No compiled
GPU kernel ships yet: the Triton lowering is deprecated from JAX 0.11 and a
Mosaic GPU kernel has not been validated on hardware, so GPUs use the XLA path
(int8 codes enter the dot, the scale is applied to the f32 accumulator).
"""

from __future__ import annotations

import os

import jax
from jax.experimental.pallas import tpu as pltpu
from jaxtyping import Array, Float, Int8

from pallas_kernels import int8_matmul as _k

IMPLS = ("pallas", "reference")
ENV_INTERPRET = "SPARQ_PALLAS_INTERPRET"
_ENV_VALUES = {"": False, "0": False, "false": False, "1": True, "true": True, "tpu": "tpu"}


def env_interpret():
  """Interpret mode requested by SPARQ_PALLAS_INTERPRET: False, True or InterpretParams."""
  raw = os.environ.get(ENV_INTERPRET, "")
  v = _ENV_VALUES.get(raw.strip().lower())
  if v is None:
    raise ValueError(
        f"{ENV_INTERPRET}={raw!r}; valid: '0'/'false' (off), '1'/'true' (interpret=True), "
        "'tpu' (pltpu.InterpretParams())")
  return pltpu.InterpretParams() if v == "tpu" else v


def pick_impl(impl: str | None = None, interpret=None, backend: str | None = None):
  """The (impl, interpret) `int8_matmul` runs: ("pallas", mode) or ("reference", None)."""
  if impl is not None and impl not in IMPLS:
    raise ValueError(f"impl={impl!r}; valid: None (auto), {', '.join(map(repr, IMPLS))}")
  if interpret is None:
    interpret = env_interpret()
  elif not isinstance(interpret, (bool, pltpu.InterpretParams)):
    raise ValueError(
        f"interpret={interpret!r}; valid: None (read {ENV_INTERPRET}), True, False, "
        "pltpu.InterpretParams()")
  backend = backend or jax.default_backend()
  if impl == "reference":
    return "reference", None
  if interpret is not False:
    return "pallas", interpret
  if backend == "tpu":
    return "pallas", False
  if impl is None:
    return "reference", None
  if backend == "cpu":
    return "pallas", True  # interpretation is the only way Pallas runs on a CPU
  raise ValueError(
      f"impl='pallas' has no compiled kernel for backend {backend!r} (only 'tpu'); use "
      "impl=None or 'reference' for the XLA path, or interpret=True")


def int8_matmul(x: Float[Array, "M K"], w_int8: Int8[Array, "K N"], scale: Float[Array, "1 N"],
                *, impl: str | None = None, interpret=None, bm: int | None = None,
                bk: int | None = None, bn: int | None = None) -> Float[Array, "M N"]:
  """x @ (w_int8 * scale) in x.dtype with f32 accumulation, on the path `pick_impl` selects."""
  _k.check_args(x, w_int8, scale, bm, bk, bn)
  impl, interpret = pick_impl(impl, interpret)
  if impl == "reference":
    return _k.reference(x, w_int8, scale)
  return _k.int8_matmul(x, w_int8, scale, bm=bm, bk=bk, bn=bn, interpret=interpret)

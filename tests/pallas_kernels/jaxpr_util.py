"""Counting the Pallas kernels a traced function launches (shared by the tests here)."""

import jax


def count_pallas_calls(jaxpr) -> int:
  """pallas_call equations executed by a (closed) jaxpr, counting inside nested calls."""
  jaxpr = getattr(jaxpr, "jaxpr", jaxpr)
  n = 0
  for eqn in jaxpr.eqns:
    n += eqn.primitive.name == "pallas_call"
    for v in eqn.params.values():
      for sub in v if isinstance(v, (tuple, list)) else (v,):
        if hasattr(sub, "eqns") or hasattr(getattr(sub, "jaxpr", None), "eqns"):
          n += count_pallas_calls(sub)
  return n


def pallas_calls_in(fn, *args) -> int:
  return count_pallas_calls(jax.make_jaxpr(fn)(*args))

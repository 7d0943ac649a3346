"""FLOPs of a DiT and of any traced computation, counted as multiply-accumulates (MACs).

`matmul_gmacs` counts the dot_general / convolution contractions of the traced forward pass (the
paper's Gflops convention); `xla_gmacs` takes XLA's compiled cost analysis (elementwise work
too); `uncounted_loop_macs` adds what XLA misses in scanned loops. The train step
(dit_jax/step.py), the AOT planner and the grid use these; dit_jax/model_table.py compares
them with the paper's table. Everything is abstract: no weights are allocated.
"""

import math
from typing import Any

import jax
import jax.numpy as jnp

from dit_jax import models


def _abstract_inputs(model: models.DiT, batch: int = 1) -> tuple:
  """x, t, y and (a DiT with h_embedder) h, as `_forward` takes them."""
  s = model.input_size
  inputs = (jax.ShapeDtypeStruct((batch, s, s, model.in_channels), jnp.float32),
            jax.ShapeDtypeStruct((batch,), jnp.int32), jax.ShapeDtypeStruct((batch,), jnp.int32))
  if model.h_embedder:
    inputs += (jax.ShapeDtypeStruct((batch,), jnp.float32),)
  return inputs


def _forward(model: models.DiT, method: Any = None) -> Any:
  """(variables, x, t, y[, h]) -> model.apply or model.init's call of them."""
  call = model.init if method == 'init' else model.apply

  def fn(first, x, t, y, *h):
    return call(first, x, t, y, **({'h': h[0]} if h else {}))
  return fn


def abstract_params(model: models.DiT) -> Any:
  """Boxed ShapeDtypeStruct variables of `model` (no allocation, no FLOPs)."""
  return jax.eval_shape(_forward(model, 'init'), jax.random.key(0), *_abstract_inputs(model))


def _lowered(model: models.DiT, batch: int = 1):
  return jax.jit(_forward(model)).lower(abstract_params(model), *_abstract_inputs(model, batch))


def xla_cost(compiled: Any) -> dict:
  """XLA's cost analysis of a compiled computation's per-device program ('flops', 'bytes
  accessed', ...; {} where the backend gives none)."""
  cost = compiled.cost_analysis() or {}
  return cost[0] if isinstance(cost, (list, tuple)) else cost  # older jax: one per program


def xla_gmacs(model: models.DiT, batch: int = 1) -> float:
  """Compiled XLA cost analysis: flops / 2 / 1e9 of one forward pass (all ops, elementwise too)."""
  return xla_cost(_lowered(model, batch).compile())['flops'] / 2e9


def _eqn_macs(eqn) -> int:
  name = eqn.primitive.name
  if name == 'dot_general':
    (lhs_contract, _), _ = eqn.params['dimension_numbers']
    lhs = eqn.invars[0].aval.shape
    return math.prod(eqn.outvars[0].aval.shape) * math.prod(lhs[d] for d in lhs_contract)
  if name == 'conv_general_dilated':
    rhs = eqn.invars[1].aval.shape
    out_feature_dim = eqn.params['dimension_numbers'].rhs_spec[0]
    return math.prod(eqn.outvars[0].aval.shape) * math.prod(rhs) // rhs[out_feature_dim]
  return 0


def jaxpr_macs(jaxpr, loop_trips: bool = True) -> int:
  """MACs of the dot/conv contractions of a jaxpr and its nested bodies; a scan body counts
  once per iteration (once in all with loop_trips=False, as XLA's cost analysis counts loops).
  Pallas kernels (splash attention) are skipped: their body is one block of a grid, and XLA's
  cost analysis does not count them either."""
  total = 0
  for eqn in jaxpr.eqns:
    if eqn.primitive.name == 'pallas_call':
      continue
    total += _eqn_macs(eqn)
    trips = eqn.params.get('length', 1) if loop_trips and eqn.primitive.name == 'scan' else 1
    for sub in _subjaxprs(eqn):  # pjit / remat / custom_jvp / scan bodies
      total += trips * jaxpr_macs(sub, loop_trips)
  return total


def uncounted_loop_macs(fn: Any, *args: Any) -> int:
  """Matmul MACs of `fn` that XLA's cost analysis misses because it counts a while loop's body
  once: those of every scan body's iterations after the first (traced, nothing compiled)."""
  jaxpr = jax.make_jaxpr(fn)(*args).jaxpr
  return jaxpr_macs(jaxpr) - jaxpr_macs(jaxpr, loop_trips=False)


def _subjaxprs(eqn):
  for v in eqn.params.values():
    for item in (v if isinstance(v, (list, tuple)) else (v,)):
      if hasattr(item, 'jaxpr') and hasattr(item.jaxpr, 'eqns'):  # ClosedJaxpr
        yield item.jaxpr
      elif hasattr(item, 'eqns'):
        yield item


def matmul_gmacs(model: models.DiT, batch: int = 1) -> float:
  """GMACs of the dot_general / convolution contractions only (the paper's count)."""
  closed = jax.make_jaxpr(_forward(model))(abstract_params(model),
                                          *_abstract_inputs(model, batch))
  return jaxpr_macs(closed.jaxpr) / 1e9

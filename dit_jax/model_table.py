"""Parameter counts and forward compute of the DiT family beside the paper's table.

  python -m dit_jax.model_table

Counts: trainable parameters plus the frozen position table ([T, D]), as the released code counts
them (`sum(p.numel() for p in model.parameters())` includes its pos_embed). Gflops follow the paper's
convention, multiply-accumulates of one forward pass at batch 1: the compiled XLA computation's
`cost_analysis()['flops'] / 2`. That figure also counts elementwise work (softmax, GELU, LayerNorm,
adaLN modulation: +0.2..0.7%); the `matmul GMACs` column counts only the dot/conv contractions of the
traced computation, which is what the paper reports (equal to its figures up to their rounding).
Everything is abstract (jax.eval_shape / lowering on ShapeDtypeStructs): no weights are allocated.
"""

import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from dit_jax import models

# Paper, Table 4 (256x256, latent 32x32x4): name -> (Gflops = GMACs, params incl. the position table).
PAPER_256 = {
    'DiT-S/8': (0.36, 33_148_160), 'DiT-S/4': (1.41, 32_945_024), 'DiT-S/2': (6.06, 32_963_360),
    'DiT-B/8': (1.42, 130_881_536), 'DiT-B/4': (5.56, 130_475_648), 'DiT-B/2': (23.01, 130_512_416),
    'DiT-L/8': (5.01, 458_594_816), 'DiT-L/4': (19.70, 458_053_760), 'DiT-L/2': (80.71, 458_102_816),
    'DiT-XL/8': (7.39, 675_683_072), 'DiT-XL/4': (29.05, 675_074_432),
    'DiT-XL/2': (118.64, 675_129_632),
}
PAPER_XL2_512_GFLOPS = 524.6  # the paper gives no parameter count for 512 px


def _abstract_inputs(model: models.DiT, batch: int = 1) -> tuple:
  s = model.input_size
  return (jax.ShapeDtypeStruct((batch, s, s, model.in_channels), jnp.float32),
          jax.ShapeDtypeStruct((batch,), jnp.int32), jax.ShapeDtypeStruct((batch,), jnp.int32))


def abstract_params(model: models.DiT) -> Any:
  """Boxed ShapeDtypeStruct variables of `model` (no allocation, no FLOPs)."""
  x, t, y = _abstract_inputs(model)
  return jax.eval_shape(model.init, jax.random.key(0), x, t, y)


def count_params(model: models.DiT, include_pos_embed: bool = True) -> int:
  """Trainable parameters (+ the frozen [T, D] position table, as the release counts)."""
  leaves = jax.tree_util.tree_leaves(abstract_params(model)['params'])
  n = sum(math.prod(leaf.shape) for leaf in leaves)
  if include_pos_embed:
    n += model.grid_size**2 * model.hidden_size
  return n


def _lowered(model: models.DiT, batch: int = 1):
  return jax.jit(model.apply).lower(abstract_params(model), *_abstract_inputs(model, batch))


def xla_gmacs(model: models.DiT, batch: int = 1) -> float:
  """Compiled XLA cost analysis: flops / 2 / 1e9 of one forward pass (all ops, elementwise too)."""
  cost = _lowered(model, batch).compile().cost_analysis()
  if isinstance(cost, (list, tuple)):  # older jax returns one dict per device program
    cost = cost[0]
  return cost['flops'] / 2e9


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
  closed = jax.make_jaxpr(model.apply)(abstract_params(model), *_abstract_inputs(model, batch))
  return jaxpr_macs(closed.jaxpr) / 1e9


def table_rows() -> list[dict[str, Any]]:
  """One dict per configuration: 12 at 256 px, then DiT-XL/2 at 512 px."""
  specs = [(name, 32, PAPER_256[name]) for name in PAPER_256]
  specs.append(('DiT-XL/2', 64, (PAPER_XL2_512_GFLOPS, None)))
  rows = []
  for name, size, (paper_gflops, paper_params) in specs:
    model = models.get_model(name, input_size=size)
    rows.append(dict(name=name, image_size=size * 8, params=count_params(model),
                     paper_params=paper_params, xla_gmacs=xla_gmacs(model),
                     matmul_gmacs=matmul_gmacs(model), paper_gflops=paper_gflops))
  return rows


def format_table(rows: list[dict[str, Any]]) -> str:
  header = (f'{"model":<9} {"px":>4} {"params":>13} {"paper params":>13} {"=":>2} '
            f'{"Gflops (XLA)":>12} {"matmul GMACs":>12} {"paper":>7} {"XLA/paper":>9} '
            f'{"matmul/paper":>12}')
  lines = [header, '-' * len(header)]
  for r in rows:
    same = '' if r['paper_params'] is None else ('ok' if r['params'] == r['paper_params'] else 'NO')
    paper_params = '-' if r['paper_params'] is None else f'{r["paper_params"]:,}'
    lines.append(
        f'{r["name"]:<9} {r["image_size"]:>4} {r["params"]:>13,} {paper_params:>13} {same:>2} '
        f'{r["xla_gmacs"]:>12.2f} {r["matmul_gmacs"]:>12.2f} {r["paper_gflops"]:>7.2f} '
        f'{r["xla_gmacs"] / r["paper_gflops"]:>9.4f} {r["matmul_gmacs"] / r["paper_gflops"]:>12.4f}')
  lines.append('')
  lines.append('params = trainable + the frozen position table (as the release counts). Gflops = '
               'multiply-accumulates (paper convention), batch 1, one forward pass.')
  lines.append('Gflops (XLA) = compiled cost_analysis flops / 2 on backend '
               f'{jax.default_backend()!r} (includes elementwise ops); matmul GMACs = dot/conv only.')
  return '\n'.join(lines)


def main() -> None:
  print(format_table(table_rows()))


if __name__ == '__main__':
  main()

"""Parameter counts and forward compute of the DiT family beside the paper's table.

  python -m dit_jax.model_table

Counts: trainable parameters plus the frozen position table ([T, D]), as the released code counts
them (`sum(p.numel() for p in model.parameters())` includes its pos_embed). Gflops follow the paper's
convention, multiply-accumulates of one forward pass at batch 1 (counted by dit_jax/flops.py): the
compiled XLA computation's `cost_analysis()['flops'] / 2`. That figure also counts elementwise work
(softmax, GELU, LayerNorm, adaLN modulation: +0.2..0.7%); the `matmul GMACs` column counts only the
dot/conv contractions of the traced computation, which is what the paper reports (equal to its
figures up to their rounding). Everything is abstract: no weights are allocated.
"""

import math
from typing import Any

import jax

from dit_jax import flops, models

# Paper, Table 4 (256x256, latent 32x32x4): name -> (Gflops = GMACs, params incl. the position table).
PAPER_256 = {
    'DiT-S/8': (0.36, 33_148_160), 'DiT-S/4': (1.41, 32_945_024), 'DiT-S/2': (6.06, 32_963_360),
    'DiT-B/8': (1.42, 130_881_536), 'DiT-B/4': (5.56, 130_475_648), 'DiT-B/2': (23.01, 130_512_416),
    'DiT-L/8': (5.01, 458_594_816), 'DiT-L/4': (19.70, 458_053_760), 'DiT-L/2': (80.71, 458_102_816),
    'DiT-XL/8': (7.39, 675_683_072), 'DiT-XL/4': (29.05, 675_074_432),
    'DiT-XL/2': (118.64, 675_129_632),
}
PAPER_XL2_512_GFLOPS = 524.6  # the paper gives no parameter count for 512 px


def count_params(model: models.DiT, include_pos_embed: bool = True) -> int:
  """Trainable parameters (+ the frozen [T, D] position table, as the release counts)."""
  leaves = jax.tree_util.tree_leaves(flops.abstract_params(model)['params'])
  n = sum(math.prod(leaf.shape) for leaf in leaves)
  if include_pos_embed:
    n += model.grid_size**2 * model.hidden_size
  return n


# LightningDiT at 256 px as it is trained: /1 on VA-VAE f16d32 latents (16x16x32), /2 on SD-VAE
# latents (32x32x4); learn_sigma off (its configs). No paper figures to compare with.
LIGHTNING_256 = {name: (16, 32) if name.endswith('/1') else (32, 4) for name in models.DiT_models
                 if name.startswith('LightningDiT-')}


def table_rows(lightning: bool = True) -> list[dict[str, Any]]:
  """One dict per configuration: 12 at 256 px, DiT-XL/2 at 512 px, then LightningDiT's."""
  specs = [(name, 32, PAPER_256[name], {}) for name in PAPER_256]
  specs.append(('DiT-XL/2', 64, (PAPER_XL2_512_GFLOPS, None), {}))
  if lightning:
    specs += [(name, size, (None, None), dict(in_channels=ch, learn_sigma=False))
              for name, (size, ch) in LIGHTNING_256.items()]
  rows = []
  for name, size, (paper_gflops, paper_params), kwargs in specs:
    model = models.get_model(name, input_size=size, **kwargs)
    px = size * (16 if kwargs.get('in_channels') == 32 else 8)
    rows.append(dict(name=name, image_size=px, params=count_params(model),
                     paper_params=paper_params, xla_gmacs=flops.xla_gmacs(model),
                     matmul_gmacs=flops.matmul_gmacs(model), paper_gflops=paper_gflops))
  return rows


def format_table(rows: list[dict[str, Any]]) -> str:
  header = (f'{"model":<19} {"px":>4} {"params":>13} {"paper params":>13} {"=":>2} '
            f'{"Gflops (XLA)":>12} {"matmul GMACs":>12} {"paper":>7} {"XLA/paper":>9} '
            f'{"matmul/paper":>12}')
  lines = [header, '-' * len(header)]
  for r in rows:
    same = '' if r['paper_params'] is None else ('ok' if r['params'] == r['paper_params'] else 'NO')
    paper_params = '-' if r['paper_params'] is None else f'{r["paper_params"]:,}'
    g = r['paper_gflops']
    paper = (f'{"-":>7} {"-":>9} {"-":>12}' if g is None else
             f'{g:>7.2f} {r["xla_gmacs"] / g:>9.4f} {r["matmul_gmacs"] / g:>12.4f}')
    lines.append(
        f'{r["name"]:<19} {r["image_size"]:>4} {r["params"]:>13,} {paper_params:>13} {same:>2} '
        f'{r["xla_gmacs"]:>12.2f} {r["matmul_gmacs"]:>12.2f} {paper}')
  lines.append('')
  lines.append('params = trainable + the frozen position table (as the release counts). Gflops = '
               'multiply-accumulates (paper convention), batch 1, one forward pass.')
  lines.append('LightningDiT-*/1 on VA-VAE f16d32 latents (16x16x32), -*/2 on SD-VAE latents '
               '(32x32x4), learn_sigma off.')
  lines.append('Gflops (XLA) = compiled cost_analysis flops / 2 on backend '
               f'{jax.default_backend()!r} (includes elementwise ops); matmul GMACs = dot/conv only.')
  return '\n'.join(lines)


def main() -> None:
  print(format_table(table_rows()))


if __name__ == '__main__':
  main()

"""Parameter counts and forward GMACs against the paper's table."""

import pytest

from dit_jax import flops, model_table
from dit_jax import models


def test_param_counts_equal_the_paper():
  for name, (_, paper_params) in model_table.PAPER_256.items():
    assert model_table.count_params(models.get_model(name)) == paper_params, name
  # The position table is the only non-trainable part: [T, D] = [256, 1152] for XL/2.
  xl2 = models.get_model('DiT-XL/2')
  assert model_table.count_params(xl2, include_pos_embed=False) == 675_129_632 - 256 * 1152


@pytest.mark.parametrize('name', ['DiT-S/8', 'DiT-B/8'])
def test_gmacs_within_one_percent(name):
  model = models.get_model(name)
  paper = model_table.PAPER_256[name][0]
  assert abs(flops.xla_gmacs(model) / paper - 1) < 0.01
  # Matmul-only MACs are the paper's convention exactly (it rounds to 2 decimals).
  assert abs(flops.matmul_gmacs(model) - paper) <= 0.005


def test_format_table_marks_matches():
  rows = [dict(name='DiT-S/8', image_size=256, params=33_148_160, paper_params=33_148_160,
               xla_gmacs=0.3605, matmul_gmacs=0.358, paper_gflops=0.36)]
  text = model_table.format_table(rows)
  assert 'DiT-S/8' in text and '33,148,160' in text and ' ok ' in text and '1.0014' in text


def test_lightningdit_counts_follow_from_the_parts():
  # LightningDiT-XL/2 (learn_sigma off) against DiT-XL/2: a final linear for 4 channels, not 8;
  # SwiGLU's w12 (D -> 2 x 3072) and w3 (3072 -> D) instead of fc1/fc2 (D -> 4D -> D); and
  # the RMSNorm weights (2 per block, 1 in the final layer).
  d, depth = 1152, 28
  final = -(d * 2 * 2 * 4 + 2 * 2 * 4)
  swiglu = (d * 6144 + 6144 + 3072 * d + d) - (d * 4 * d + 4 * d + 4 * d * d + d)
  norms = (2 * depth + 1) * d
  want = model_table.PAPER_256['DiT-XL/2'][1] + final + depth * swiglu + norms
  xl2 = models.get_model('LightningDiT-XL/2', learn_sigma=False)
  assert model_table.count_params(xl2) == want == 675_219_856
  # RoPE, qk-norm off and the shift add no parameters; without the shift, 2D per block fewer.
  assert model_table.count_params(xl2.clone(rope=False)) == want
  assert model_table.count_params(xl2.clone(adaln_shift=False)) == want - depth * (2 * d * d + 2 * d)

"""LightningDiT's parts (RMSNorm, SwiGLU, 2-D RoPE, qk-norm, adaLN without shift) against their
formulas and closed forms, in every attention path."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dit_jax import models

HD = 16  # head_dim of the tests' RoPE


def _angle(channel: int, row: int, col: int, head_dim: int = HD) -> float:
  """The closed form: channel j < head_dim/2 rotates with the row, the rest with the column;
  channels 2i, 2i+1 of a half share the frequency 10000^(-2i / (head_dim/2))."""
  half = head_dim // 2
  pos, j = (row, channel) if channel < half else (col, channel - half)
  return pos * 10000.0 ** (-2 * (j // 2) / half)


def test_rope_is_a_rotation_of_each_pair_by_the_positions_angle():
  grid = 5
  cos, sin = models.rope_tables(HD, grid)
  want = np.array([[_angle(j, t // grid, t % grid) for j in range(HD)]
                   for t in range(grid * grid)])
  np.testing.assert_allclose(cos, np.cos(want), atol=2e-6)
  np.testing.assert_allclose(sin, np.sin(want), atol=2e-6)
  # apply_rope multiplies each pair (x[2i], x[2i+1]) as a complex number by exp(i angle).
  x = np.random.default_rng(0).normal(size=(3, grid * grid, HD)).astype(np.float32)
  got = np.asarray(models.apply_rope(jnp.asarray(x), cos, sin))
  z = (x[..., 0::2] + 1j * x[..., 1::2]) * np.exp(1j * want[None, :, 0::2])
  np.testing.assert_allclose(got[..., 0::2], z.real, atol=1e-5)
  np.testing.assert_allclose(got[..., 1::2], z.imag, atol=1e-5)


def test_rope_attention_scores_depend_only_on_the_offset():
  grid = 6
  cos, sin = (jnp.asarray(a) for a in models.rope_tables(HD, grid))
  rng = np.random.default_rng(1)
  q, k = (jnp.asarray(rng.normal(size=(HD,)), jnp.float32) for _ in range(2))

  def score(pq, pk):  # q at token pq, k at token pk: (row, col) each
    tq, tk = pq[0] * grid + pq[1], pk[0] * grid + pk[1]
    return float(models.apply_rope(q, cos[tq], sin[tq]) @ models.apply_rope(k, cos[tk], sin[tk]))
  base = score((1, 0), (3, 2))
  for shift in ((1, 1), (2, 3), (0, 2)):
    moved = score((1 + shift[0], shift[1]), (3 + shift[0], 2 + shift[1]))
    assert abs(moved - base) < 1e-4 * (1 + abs(base)), (shift, moved, base)
  assert abs(score((1, 0), (3, 3)) - base) > 1e-3  # another offset, another score


def test_rmsnorm_and_swiglu_follow_their_formulas():
  rng = np.random.default_rng(2)
  x = jnp.asarray(rng.normal(size=(2, 3, 12)) * 3, jnp.float32)
  norm = models.NORMS['rmsnorm']('n')
  w = jnp.asarray(rng.normal(size=(12,)), jnp.float32)
  got = norm.apply({'params': {'scale': w}}, x)
  want = x / np.sqrt(np.mean(np.square(x), -1, keepdims=True) + 1e-6) * w
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)

  mlp = models.SwiGLU(12, 48)
  params = nn.meta.unbox(mlp.init(jax.random.PRNGKey(0), x))['params']
  h = int(2 / 3 * 48)
  assert params['w12']['kernel'].shape == (12, 2 * h) and params['w3']['kernel'].shape == (h, 12)
  x12 = x @ params['w12']['kernel'] + params['w12']['bias']
  x1, x2 = x12[..., :h], x12[..., h:]
  want = (x1 / (1 + np.exp(-x1)) * x2) @ params['w3']['kernel'] + params['w3']['bias']
  np.testing.assert_allclose(mlp.apply({'params': params}, x), want, rtol=1e-5, atol=1e-5)


def _lightning(**kw):
  base = dict(input_size=8, num_classes=5, learn_sigma=False, hidden_size=64, depth=2,
              num_heads=4, patch_size=2)
  return models.get_model('LightningDiT-B/2', **{**base, **kw})


def _inputs(model, n=3):
  rng = np.random.default_rng(3)
  x = jnp.asarray(rng.normal(size=(n, model.input_size, model.input_size, model.in_channels)),
                  jnp.float32)
  return x, jnp.asarray(rng.uniform(0, 1, n), jnp.float32), jnp.arange(n, dtype=jnp.int32) % 5


def _perturbed(model, seed=4):
  """Initialised parameters with the zero-initialised adaLN and final layer made random, so
  that every part of the block reaches the output."""
  x, t, y = _inputs(model)
  params = nn.meta.unbox(model.init(jax.random.PRNGKey(0), x, t, y))['params']
  leaves, tree = jax.tree.flatten(params)
  keys = jax.random.split(jax.random.PRNGKey(seed), len(leaves))
  leaves = [p + 0.05 * jax.random.normal(k, p.shape) for p, k in zip(leaves, keys)]
  return jax.tree.unflatten(tree, leaves)


@pytest.mark.parametrize('parts', [
    dict(), dict(qk_norm=True), dict(qk_norm=True, norm='layernorm'),
    dict(adaln_shift=False), dict(rope=False, mlp='gelu')])
def test_every_attention_path_and_layout_gives_the_same_output(parts):
  model = _lightning(**parts)
  params = _perturbed(model)
  x, t, y = _inputs(model)
  ref = model.apply({'params': params}, x, t, y)
  assert ref.shape == x.shape and np.isfinite(np.asarray(ref)).all()
  tokens = model.clone(attention_impl='xla_tokens').apply({'params': params}, x, t, y)
  np.testing.assert_allclose(tokens, ref, rtol=1e-5, atol=1e-5)
  from dit_jax import convert  # pylint: disable=import-outside-toplevel
  scanned = model.clone(scan_layers=True).apply({'params': convert.stack_blocks(params)}, x, t, y)
  np.testing.assert_allclose(scanned, ref, rtol=1e-5, atol=1e-5)
  block = params['blocks_0']
  assert block['adaLN_modulation']['kernel'].shape[1] == (6 if model.adaln_shift else 4) * 64
  if model.qk_norm:
    assert set(block['attn']) == {'qkv', 'proj', 'q_norm', 'k_norm'}
    assert ('bias' in block['attn']['q_norm']) == (model.norm == 'layernorm')


def test_rope_and_qk_norm_change_the_output_and_the_defaults_are_lightningdits():
  model = _lightning()
  assert (model.norm, model.mlp, model.rope, model.qk_norm, model.adaln_shift) == (
      'rmsnorm', 'swiglu', True, False, True)
  params = _perturbed(model)
  x, t, y = _inputs(model)
  with_rope = model.apply({'params': params}, x, t, y)
  without = model.clone(rope=False).apply({'params': params}, x, t, y)
  assert float(jnp.abs(with_rope - without).max()) > 1e-3
  # The release's DiT is unchanged by the new fields' defaults.
  dit = models.get_model('DiT-S/2')
  assert (dit.norm, dit.mlp, dit.rope, dit.qk_norm, dit.adaln_shift) == (
      'layernorm', 'gelu', False, False, True)
  with pytest.raises(ValueError, match='head_dim=6 must be divisible by 4'):
    _lightning(hidden_size=24).validate()

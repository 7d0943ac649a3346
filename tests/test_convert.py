"""Parity with an independent PyTorch DiT (diffusers) and the released-checkpoint converter.

The reference is diffusers' DiTTransformer2DModel with every weight randomized (the zero-initialised
adaLN and final layers included, or the comparison would be vacuous). Two adjustments make it the
released model: its per-block timestep/label embedders are tied to one set (the release embeds once),
and its timestep frequencies use exp(-ln(1e4) k / 128) as the release does (diffusers' DiT divides by
127: `downscale_freq_shift=1`). The released-layout state_dict is assembled from its modules.
"""

import argparse
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import DiTTransformer2DModel
from diffusers.models.embeddings import get_2d_sincos_pos_embed as diffusers_pos_embed

from dit_jax import convert
from dit_jax import guidance
from dit_jax import models

TINY = dict(depth=2, num_heads=2, head_dim=8, patch_size=2, input_size=8, num_classes=10)
SMALL_S2 = dict(depth=12, num_heads=6, head_dim=64, patch_size=2, input_size=16, num_classes=1000)


def _reference(depth, num_heads, head_dim, patch_size, input_size, num_classes, seed=0,
               out_channels=8):
  """Randomized diffusers DiT (tied embedders) and its weights in the released state_dict layout."""
  torch.manual_seed(seed)
  ref = DiTTransformer2DModel(
      num_attention_heads=num_heads, attention_head_dim=head_dim, in_channels=4,
      out_channels=out_channels,
      num_layers=depth, sample_size=input_size, patch_size=patch_size,
      num_embeds_ada_norm=num_classes, norm_eps=1e-6).eval()
  with torch.no_grad():
    for name, w in ref.named_parameters():
      if 'embedding_table' in name:
        w.normal_(0.0, 0.5)
      elif w.ndim >= 2:  # unit-variance uniform, so adaLN gates/scales are O(1)
        bound = float(np.sqrt(3.0 / np.prod(w.shape[1:])))
        w.uniform_(-bound, bound)
      else:
        w.normal_(0.0, 0.1)
    emb0 = ref.transformer_blocks[0].norm1.emb
    for block in ref.transformer_blocks:
      block.norm1.emb.load_state_dict(emb0.state_dict())
      block.norm1.emb.time_proj.downscale_freq_shift = 0
  sd = {k: v.numpy() for k, v in ref.state_dict().items()}
  e = 'transformer_blocks.0.norm1.emb.'
  official = {
      'pos_embed': ref.pos_embed.pos_embed.numpy(),
      'x_embedder.proj.weight': sd['pos_embed.proj.weight'],
      'x_embedder.proj.bias': sd['pos_embed.proj.bias'],
      'y_embedder.embedding_table.weight': sd[e + 'class_embedder.embedding_table.weight'],
      'final_layer.adaLN_modulation.1.weight': sd['proj_out_1.weight'],
      'final_layer.adaLN_modulation.1.bias': sd['proj_out_1.bias'],
      'final_layer.linear.weight': sd['proj_out_2.weight'],
      'final_layer.linear.bias': sd['proj_out_2.bias'],
  }
  for s in ('weight', 'bias'):
    official[f't_embedder.mlp.0.{s}'] = sd[e + f'timestep_embedder.linear_1.{s}']
    official[f't_embedder.mlp.2.{s}'] = sd[e + f'timestep_embedder.linear_2.{s}']
    for i in range(depth):
      b, o = f'transformer_blocks.{i}.', f'blocks.{i}.'
      official[o + f'attn.qkv.{s}'] = np.concatenate([sd[b + f'attn1.to_{c}.{s}'] for c in 'qkv'])
      official[o + f'attn.proj.{s}'] = sd[b + f'attn1.to_out.0.{s}']
      official[o + f'mlp.fc1.{s}'] = sd[b + f'ff.net.0.proj.{s}']
      official[o + f'mlp.fc2.{s}'] = sd[b + f'ff.net.2.{s}']
      official[o + f'adaLN_modulation.1.{s}'] = sd[b + f'norm1.linear.{s}']
  model = models.DiT(input_size=input_size, patch_size=patch_size, in_channels=4,
                     hidden_size=num_heads * head_dim, depth=depth, num_heads=num_heads,
                     num_classes=num_classes, learn_sigma=out_channels == 8)
  return ref, official, model


def _torch_forward_with_cfg(ref, x, t, y, scale):
  """The release's guided forward, on the reference model (NCHW)."""
  half = x[: len(x) // 2]
  out = ref(torch.cat([half, half]), timestep=t, class_labels=y).sample
  eps, rest = out[:, :3], out[:, 3:]
  cond, uncond = torch.split(eps, len(eps) // 2, dim=0)
  guided = uncond + scale * (cond - uncond)
  return torch.cat([torch.cat([guided, guided]), rest], dim=1)


def _rel_err(a, b):
  return float(np.abs(np.asarray(a) - np.asarray(b)).max() / np.abs(np.asarray(b)).max())


def _nhwc(x):
  return jnp.asarray(np.asarray(x).transpose(0, 2, 3, 1))


def _apply(model, params, *args, method=None):
  # jit: one compile is much cheaper on CPU than eagerly compiling every op.
  fn = jax.jit(lambda p, *a: model.apply({'params': p}, *a, method=method))
  return fn(params, *args)


def _guided(model, params, x, t, labels, scale, channels=3):
  """dit_jax.guidance's CFG on [x[:N]; x[:N]] with labels [labels; null], jitted."""
  fn = lambda p, x, t, y: guidance.cfg_model_fn(
      lambda xx, tt, yy: model.apply({'params': p}, xx, tt, yy), y, model.num_classes, scale,
      channels)(x, t)
  return jax.jit(fn)(params, x, jnp.asarray(t), jnp.asarray(labels))


def _init(model):
  s = model.input_size
  zeros = jnp.zeros((1,), jnp.int32)
  return jax.jit(model.init)(jax.random.key(0), jnp.zeros((1, s, s, model.in_channels)), zeros, zeros)


@pytest.fixture(scope='module', params=[TINY, SMALL_S2], ids=['tiny', 'S2_16px'])
def reference(request):
  return _reference(**request.param)


def test_forward_and_guided_match_reference(reference):
  ref, official, model = reference
  params = convert.from_official(official, model)
  rng = np.random.default_rng(0)
  s = model.input_size
  x = rng.standard_normal((4, 4, s, s)).astype(np.float32)
  t = np.array([0, 3, 500, 999])
  y = np.array([1, model.num_classes - 1, 2, model.num_classes])  # last one is the null class
  # The release samples with labels [y; null] (sample.py): the guided call's labels.
  y_cfg = np.array([1, model.num_classes - 1, model.num_classes, model.num_classes])
  with torch.no_grad():
    want = ref(torch.from_numpy(x), timestep=torch.from_numpy(t),
               class_labels=torch.from_numpy(y)).sample.numpy()
    want_cfg = _torch_forward_with_cfg(ref, torch.from_numpy(x), torch.from_numpy(t),
                                       torch.from_numpy(y_cfg), 4.0).numpy()
  got = _apply(model, params, _nhwc(x), t, y)
  assert got.dtype == jnp.float32
  assert np.abs(want).max() > 0.1  # non-vacuous
  assert _rel_err(_nhwc(got.transpose(0, 3, 1, 2)), _nhwc(want)) < 1e-5
  got_cfg = _guided(model, params, _nhwc(x), t, y_cfg[:2], 4.0)
  assert _rel_err(np.asarray(got_cfg).transpose(0, 3, 1, 2), want_cfg) < 1e-5
  # The guided channels really differ from the unguided output; variance channels pass through.
  assert _rel_err(np.asarray(got_cfg)[..., :3], np.asarray(got)[..., :3]) > 1e-2


def test_guidance_on_all_channels():
  ref, official, model = _reference(**TINY)
  params = convert.from_official(official, model)
  x = np.random.default_rng(1).standard_normal((2, 4, 8, 8)).astype(np.float32)
  t, y = np.array([10, 10]), np.array([3, model.num_classes])
  with torch.no_grad():
    out = ref(torch.from_numpy(np.concatenate([x[:1], x[:1]])), timestep=torch.from_numpy(t),
              class_labels=torch.from_numpy(y)).sample.numpy()
  guided = out[1:, :4] + 2.5 * (out[:1, :4] - out[1:, :4])
  got = np.asarray(_guided(model, params, _nhwc(x), t, y[:1], 2.5, channels=None))
  got = got.transpose(0, 3, 1, 2)
  assert _rel_err(got[:, :4], np.concatenate([guided, guided])) < 1e-5
  assert _rel_err(got[:, 4:], out[:, 4:]) < 1e-5


def test_torch_tensors_accepted_and_round_trip_exact():
  _, official, model = _reference(**TINY)
  params_np = convert.from_official(official, model)
  params_pt = convert.from_official({k: torch.from_numpy(v) for k, v in official.items()}, model)
  jax.tree_util.tree_map(np.testing.assert_array_equal, params_np, params_pt)
  back = convert.to_official(params_np, model)
  assert set(back) == set(official)
  for k, v in official.items():
    if k == 'pos_embed':  # ours is computed in float64; diffusers' in float32
      np.testing.assert_allclose(back[k], v, atol=1e-6)
    else:
      np.testing.assert_array_equal(back[k], v, err_msg=k)
  again = convert.from_official(back, model)
  jax.tree_util.tree_map(np.testing.assert_array_equal, params_np, again)
  # Boxed params straight from init convert too (unboxed on the way).
  sd = convert.to_official(_init(model), model)
  assert sd['blocks.1.attn.qkv.weight'].shape == (48, 16)


def test_pos_table_matches_independent_implementation():
  for dim, grid in ((16, 4), (1152, 32)):
    want = diffusers_pos_embed(dim, grid, base_size=grid, output_type='pt').numpy()
    got = models.get_2d_sincos_pos_embed(dim, grid)
    np.testing.assert_allclose(got, want, atol=1e-5)


def test_infer_model_from_state_dict():
  _, official, model = _reference(**TINY)
  inferred = convert.infer_model(official, num_heads=2)
  for field in ('input_size', 'patch_size', 'in_channels', 'hidden_size', 'depth', 'num_classes',
                'learn_sigma'):
    assert getattr(inferred, field) == getattr(model, field), field
  shapes = convert.official_shapes(models.get_model('DiT-XL/2'))
  assert len(shapes) == 292 and sum(int(np.prod(s)) for s in shapes.values()) == 675_129_632
  assert shapes['x_embedder.proj.weight'] == (1152, 4, 2, 2)


@pytest.mark.parametrize('edit, message', [
    (lambda sd: sd.update({'blocks.0.attn.extra': np.zeros(3)}), r"'blocks.0.attn.extra'"),
    (lambda sd: sd.pop('blocks.1.mlp.fc2.bias'), r"'blocks.1.mlp.fc2.bias'.*\(16,\)"),
    (lambda sd: sd.update({'final_layer.linear.weight': np.zeros((30, 16))}),
     r"'final_layer.linear.weight'.*\(30, 16\).*\(32, 16\)"),
    (lambda sd: sd.update({'pos_embed': np.zeros((1, 16, 16))}), r"'pos_embed'"),
])
def test_conversion_errors_name_the_key(edit, message):
  _, official, model = _reference(**TINY)
  official = dict(official)
  edit(official)
  with pytest.raises(ValueError, match=message):
    convert.from_official(official, model)


def test_to_official_errors_name_the_param():
  _, official, model = _reference(**TINY)
  params = convert.from_official(official, model)
  params['blocks_0']['mlp']['fc1']['kernel'] = np.zeros((3, 3), np.float32)
  with pytest.raises(ValueError, match=r'blocks_0/mlp/fc1/kernel.*\(16, 64\)'):
    convert.to_official(params, model)


def test_save_and_load_converted(tmp_path):
  _, official, model = _reference(**TINY)
  params = convert.from_official(official, model)
  kwargs = dict(input_size=8, patch_size=2, hidden_size=16, depth=2, num_heads=2, num_classes=10)
  convert.save_converted(str(tmp_path), params, 'DiT-S/8', **kwargs)
  meta = json.loads((tmp_path / 'model.json').read_text())
  assert meta == {'model': 'DiT-S/8', 'kwargs': kwargs}
  loaded_model, loaded = convert.load_converted(str(tmp_path))
  assert loaded_model == model
  jax.tree_util.tree_map(np.testing.assert_array_equal, params, loaded)
  with pytest.raises(FileNotFoundError, match='model.json'):
    convert.load_converted(str(tmp_path / 'params'))


def test_torch_checkpoint_reader_handles_wrapped_files(tmp_path):
  sd = {'a.weight': torch.ones(2, 3)}
  args = argparse.Namespace(model='DiT-XL/2')  # release training checkpoints pickle their args
  for name, content in (('flat', sd), ('ema', {'ema': sd, 'model': {'b': torch.zeros(1)},
                                               'args': args}),
                        ('model', {'model': {'module.' + k: v for k, v in sd.items()}})):
    path = tmp_path / f'{name}.pt'
    torch.save(content, path)
    loaded = convert._load_torch_state_dict(str(path))  # pylint: disable=protected-access
    assert list(loaded) == ['a.weight'] and loaded['a.weight'].dtype == np.float32


def test_scanned_layout_converts_both_ways(tmp_path):
  ref, official, model = _reference(**TINY)
  scanned = model.clone(scan_layers=True)
  params = convert.from_official(official, scanned)
  assert 'blocks_0' not in params
  assert params['blocks']['attn']['qkv']['kernel'].shape == (2, 16, 48)
  np.testing.assert_array_equal(params['blocks']['mlp']['fc2']['bias'][1],
                                official['blocks.1.mlp.fc2.bias'])
  # The scanned model on converted weights is the released model.
  rng = np.random.default_rng(0)
  x = rng.standard_normal((2, 4, 8, 8)).astype(np.float32)
  t, y = np.array([3, 999]), np.array([1, model.num_classes])
  with torch.no_grad():
    want = ref(torch.from_numpy(x), timestep=torch.from_numpy(t),
               class_labels=torch.from_numpy(y)).sample.numpy()
  got = np.asarray(_apply(scanned, params, _nhwc(x), t, y)).transpose(0, 3, 1, 2)
  assert _rel_err(got, want) < 1e-5
  # Back to the released layout, and between the two Flax layouts, exactly.
  back = convert.to_official(params, scanned)
  assert set(back) == set(official)
  for k, v in official.items():
    if k != 'pos_embed':
      np.testing.assert_array_equal(back[k], v, err_msg=k)
  unrolled = convert.from_official(official, model)
  jax.tree_util.tree_map(np.testing.assert_array_equal, convert.unstack_blocks(params), unrolled)
  jax.tree_util.tree_map(np.testing.assert_array_equal, convert.stack_blocks(unrolled), params)
  # Any tree holding params dicts (here an optimizer state) converts; other leaves pass through.
  state = {'count': np.int32(3), 'mu': unrolled, 'nu': (unrolled,)}
  stacked = convert.stack_blocks(state)
  assert stacked['count'] == 3 and 'blocks' in stacked['mu'] and 'blocks' in stacked['nu'][0]
  # Orbax round trip in the scanned layout.
  kwargs = dict(input_size=8, patch_size=2, hidden_size=16, depth=2, num_heads=2, num_classes=10,
                scan_layers=True)
  convert.save_converted(str(tmp_path), params, 'DiT-S/8', **kwargs)
  loaded_model, loaded = convert.load_converted(str(tmp_path))
  assert loaded_model == scanned
  jax.tree_util.tree_map(np.testing.assert_array_equal, params, loaded)
  # to_official takes either layout; a stack of the wrong depth names the extra layer.
  assert all(np.array_equal(v, back[k]) for k, v in convert.to_official(unrolled, scanned).items())
  deeper = jax.tree_util.tree_map(lambda a: np.concatenate([a, a[:1]]), params['blocks'])
  with pytest.raises(ValueError, match=r'Unknown param blocks_2/'):
    convert.to_official({**params, 'blocks': deeper}, scanned)

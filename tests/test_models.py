"""DiT module: release initialization, shapes, validation, label dropout, dtype/remat switches."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dit_jax import models

TINY = dict(input_size=8, patch_size=2, hidden_size=32, depth=2, num_heads=4, num_classes=10)


def _inputs(model, n=2, seed=0):
  rng = np.random.default_rng(seed)
  s = model.input_size
  x = jnp.asarray(rng.standard_normal((n, s, s, model.in_channels)), jnp.float32)
  t = jnp.asarray(rng.integers(0, 1000, n))
  y = jnp.asarray(rng.integers(0, model.num_classes, n))
  return x, t, y


def _init(model, seed=0):
  return jax.jit(model.init)(jax.random.key(seed), *_inputs(model, 1))


def _randomize(params, seed=0):
  """Non-zero weights everywhere (zero-initialised layers included) for non-vacuous comparisons."""
  rng = np.random.default_rng(seed)  # numpy: no per-shape compiles
  return jax.tree_util.tree_map(
      lambda x: jnp.asarray(rng.standard_normal(x.shape, np.float32)
                            / np.sqrt(x.shape[0] if x.ndim == 2 else 4.0)),
      nn.meta.unbox(params))


def _apply(model, params, *args, **kwargs):
  return jax.jit(lambda p, *a: model.apply({'params': p}, *a, **kwargs))(params, *args)


@pytest.fixture(scope='module')
def s_model_params():
  # DiT-S width (384) at a tiny depth/size so the init statistics have enough samples.
  model = models.get_model('DiT-S/2', input_size=8, depth=1, num_classes=1000)
  return model, nn.meta.unbox(_init(model))['params']


def test_init_is_the_release_init(s_model_params):
  model, p = s_model_params
  d, c, ps = model.hidden_size, model.in_channels, model.patch_size
  x, t, y = _inputs(model)
  assert np.all(np.asarray(_apply(model, p, x, t, y)) == 0.0)  # adaLN-Zero: output exactly zero
  for leaf in jax.tree_util.tree_leaves(p['blocks_0']['adaLN_modulation']) + \
      jax.tree_util.tree_leaves(p['final_layer']):
    assert np.all(np.asarray(leaf) == 0.0)

  def check_xavier(w, fan_in, fan_out):
    bound = np.sqrt(6.0 / (fan_in + fan_out))
    w = np.asarray(w)
    assert np.abs(w).max() <= bound
    assert np.abs(w).max() > 0.98 * bound  # uniform, filling the bound
    np.testing.assert_allclose(w.std(), bound / np.sqrt(3.0), rtol=0.05)

  blk = p['blocks_0']
  check_xavier(blk['attn']['qkv']['kernel'], d, 3 * d)  # fused qkv as one matrix
  check_xavier(blk['attn']['proj']['kernel'], d, d)
  check_xavier(blk['mlp']['fc1']['kernel'], d, 4 * d)
  check_xavier(blk['mlp']['fc2']['kernel'], 4 * d, d)
  check_xavier(p['x_embedder']['proj']['kernel'], c * ps * ps, d)  # conv viewed as [D, C*p*p]
  for w in (p['y_embedder']['embedding_table']['embedding'], p['t_embedder']['mlp_0']['kernel'],
            p['t_embedder']['mlp_2']['kernel']):
    np.testing.assert_allclose(np.asarray(w).std(), 0.02, rtol=0.05)
    assert abs(float(np.asarray(w).mean())) < 2e-3
  assert p['y_embedder']['embedding_table']['embedding'].shape == (1001, d)  # + null class
  biases = [v for path, v in jax.tree_util.tree_flatten_with_path(p)[0]
            if path[-1].key == 'bias']
  assert len(biases) == 1 + 2 + 5 + 2 and all(np.all(np.asarray(b) == 0.0) for b in biases)


def test_every_param_has_logical_axes():
  model = models.DiT(**TINY)
  boxed = jax.eval_shape(model.init, jax.random.key(0), *_inputs(model, 1))['params']
  leaves = jax.tree_util.tree_leaves_with_path(
      boxed, is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned))
  assert len(leaves) == 2 + 4 + 1 + 2 * 10 + 4
  for path, leaf in leaves:
    assert isinstance(leaf, nn.LogicallyPartitioned), path
    assert len(leaf.names) == len(leaf.value.shape), path
    assert set(leaf.names) <= set(models.LOGICAL_AXES) | {None}, path
    for name, size in zip(leaf.names, leaf.value.shape):  # 'embed' always means the width D
      assert name != 'embed' or size == model.hidden_size, path
  specs = nn.get_partition_spec(boxed)
  assert tuple(specs['blocks_0']['attn']['qkv']['kernel']) == ('embed', 'qkv')
  assert tuple(specs['t_embedder']['mlp_2']['kernel']) == ('embed', 'hidden')
  assert tuple(specs['x_embedder']['proj']['kernel']) == (None, None, None, 'embed')


def test_position_table_is_a_constant():
  model = models.DiT(**TINY)
  variables = jax.eval_shape(model.init, jax.random.key(0), *_inputs(model, 1))
  assert set(variables) == {'params'}
  paths = [jax.tree_util.keystr(path) for path, _ in jax.tree_util.tree_leaves_with_path(variables)]
  assert len(paths) == 31 and not any('pos' in path for path in paths)
  # Token 1 is (row 0, col 1): the first half encodes the column, sine first, omega_0 = 1.
  table = models.get_2d_sincos_pos_embed(16, 4)
  assert table.dtype == np.float64 and table.shape == (16, 16)
  np.testing.assert_allclose(table[1, 0], np.sin(1.0))
  np.testing.assert_allclose(table[1, 4], np.cos(1.0))
  # Token 4 is (row 1, col 0): column half is sin(0), cos(0); row half starts with sin(1).
  np.testing.assert_allclose(table[4, :8], [0, 0, 0, 0, 1, 1, 1, 1], atol=0)
  np.testing.assert_allclose(table[4, 8], np.sin(1.0))


def test_timestep_features_closed_form():
  t = np.array([0, 1, 250, 999])
  freqs = np.exp(-np.log(10000.0) * np.arange(128) / 128)
  want = np.concatenate([np.cos(t[:, None] * freqs), np.sin(t[:, None] * freqs)], axis=1)
  got = models.timestep_features(jnp.asarray(t))
  assert got.dtype == jnp.float32 and got.shape == (4, 256)
  np.testing.assert_allclose(np.asarray(got), want, atol=2e-4)


@pytest.mark.parametrize('size, out', [(32, 32), (64, 64)])
def test_xl2_shapes_at_256_and_512_px(size, out):
  model = models.get_model('DiT-XL/2', input_size=size)
  x, t, y = (jax.ShapeDtypeStruct((3, size, size, 4), jnp.float32),
             jax.ShapeDtypeStruct((3,), jnp.int32), jax.ShapeDtypeStruct((3,), jnp.int32))
  variables = jax.eval_shape(model.init, jax.random.key(0), x, t, y)
  result = jax.eval_shape(model.apply, variables, x, t, y)
  assert result.shape == (3, out, out, 8) and result.dtype == jnp.float32
  kernel = variables['params']['x_embedder']['proj']['kernel'].value
  assert kernel.shape == (2, 2, 4, 1152)


def test_registry_and_unknown_name():
  assert list(models.DiT_models) == [f'DiT-{s}/{p}' for s in ('XL', 'L', 'B', 'S')
                                     for p in (2, 4, 8)]
  m = models.get_model('DiT-B/4', num_classes=7)
  assert (m.hidden_size, m.depth, m.num_heads, m.patch_size, m.num_classes) == (768, 12, 12, 4, 7)
  with pytest.raises(ValueError, match=r"'DiT-M/2'.*DiT-XL/2.*DiT-S/8"):
    models.get_model('DiT-M/2')


@pytest.mark.parametrize('overrides, message', [
    (dict(patch_size=3), r'patch_size=3.*input_size=8'),
    (dict(num_heads=5), r'hidden_size=32.*num_heads=5'),
    (dict(hidden_size=18, num_heads=2), r'hidden_size=18.*divisible by 4'),
])
def test_invalid_config_errors(overrides, message):
  model = models.DiT(**{**TINY, **overrides})
  with pytest.raises(ValueError, match=message):
    jax.eval_shape(model.init, jax.random.key(0), *_inputs(models.DiT(**TINY), 1))


def test_wrong_input_shape_errors():
  model = models.DiT(**TINY)
  variables = jax.eval_shape(model.init, jax.random.key(0), *_inputs(model, 1))
  x = jax.ShapeDtypeStruct((1, 8, 8, 3), jnp.float32)
  t = jax.ShapeDtypeStruct((1,), jnp.int32)
  with pytest.raises(ValueError, match=r'\[N, 8, 8, 4\].*\(1, 8, 8, 3\)'):
    jax.eval_shape(model.apply, variables, x, t, t)


def test_unconditional_and_custom_channels():
  model = models.DiT(**{**TINY, 'num_classes': 1, 'in_channels': 3, 'learn_sigma': False})
  p = _randomize(_init(model)['params'])
  assert p['y_embedder']['embedding_table']['embedding'].shape == (2, 32)  # class 0 + null
  x, t, _ = _inputs(model)
  y = jnp.zeros((2,), jnp.int32)
  out = _apply(model, p, x, t, y)
  assert out.shape == (2, 8, 8, 3) and model.out_channels == 3
  uncond = models.DiT(**{**TINY, 'num_classes': 1, 'class_dropout_prob': 0.0})
  shapes = jax.eval_shape(uncond.init, jax.random.key(0), *_inputs(uncond, 1))['params']
  assert shapes['y_embedder']['embedding_table']['embedding'].value.shape == (1, 32)


def test_label_dropout():
  embedder = models.LabelEmbedder(num_classes=10, hidden_size=8, dropout_prob=0.3)
  y = jnp.arange(4000) % 10
  variables = embedder.init(jax.random.key(0), y, False)
  table = variables['params']['embedding_table']['embedding'].value
  out = embedder.apply(variables, y, True, rngs={'dropout': jax.random.key(1)})
  dropped = np.all(np.asarray(out) == np.asarray(table[10]), axis=1)
  kept = np.all(np.asarray(out) == np.asarray(table[y]), axis=1)
  assert np.all(dropped | kept) and 0.27 < dropped.mean() < 0.33
  again = embedder.apply(variables, y, True, rngs={'dropout': jax.random.key(2)})
  assert not np.array_equal(np.asarray(out), np.asarray(again))  # fresh mask per key
  np.testing.assert_array_equal(embedder.apply(variables, y, False), table[y])  # eval: no drop
  force = (jnp.arange(4000) % 2).astype(jnp.int32)
  forced = embedder.apply(variables, y, False, force)
  np.testing.assert_array_equal(forced[1::2], jnp.broadcast_to(table[10], (2000, 8)))
  np.testing.assert_array_equal(forced[0::2], table[y[0::2]])
  with pytest.raises(Exception, match='dropout'):
    embedder.apply(variables, y, True)  # training without a dropout rng is an error


def test_bf16_close_to_fp32_and_remat_identical():
  model = models.DiT(**TINY)
  p = _randomize(_init(model)['params'])
  x, t, y = _inputs(model, n=2)
  ref = np.asarray(_apply(model, p, x, t, y))
  bf16 = _apply(model.clone(dtype=jnp.bfloat16), p, x, t, y)
  assert bf16.dtype == jnp.float32
  err = np.abs(np.asarray(bf16) - ref).max() / np.abs(ref).max()
  assert 0 < err < 3e-2, err

  def loss_and_grad(m):
    loss = lambda params: jnp.sum(m.apply({'params': params}, x, t, y) ** 2)
    return jax.jit(jax.value_and_grad(loss))(p)
  (l, g), (l_remat, g_remat) = loss_and_grad(model), loss_and_grad(model.clone(remat=True))
  np.testing.assert_allclose(l, l_remat, rtol=1e-6)
  jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7),
                         g, g_remat)


def test_cfg_scale_is_traced():
  model = models.DiT(**TINY)
  p = _randomize(_init(model)['params'])
  x, t, y = _inputs(model, n=4)
  y = y.at[2:].set(model.num_classes)
  fn = jax.jit(lambda p, s: model.apply({'params': p}, x, t, y, s,
                                        method=models.DiT.forward_with_cfg))
  a, b = fn(p, 1.0), fn(p, 4.0)
  assert fn._cache_size() == 1  # pylint: disable=protected-access
  base = _apply(model, p, jnp.concatenate([x[:2], x[:2]]), t, y)
  a, b, base = np.asarray(a), np.asarray(b), np.asarray(base)
  # Scale 1: guided channels equal the conditional output in both halves.
  np.testing.assert_allclose(a[:2], base[:2], rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(a[2:, ..., :3], base[:2, ..., :3], rtol=1e-5, atol=1e-6)
  # Release quirk: only channels :3 are guided; channel 3 and the variances pass through per half.
  np.testing.assert_array_equal(b[:2, ..., :3], b[2:, ..., :3])
  np.testing.assert_allclose(b[..., 3:], base[..., 3:], rtol=1e-6, atol=1e-6)
  assert np.abs(b[:2, ..., :3] - base[:2, ..., :3]).max() > 1e-2

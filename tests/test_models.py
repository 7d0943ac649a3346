"""DiT module: release initialization, shapes, validation, label dropout, dtype/remat switches."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dit_jax import guidance
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


def _guided(model, params, x, t, labels, scale):
  """dit_jax.guidance's CFG (the release's: 3 channels) on [x[:N]; x[:N]], labels [y; null]."""
  fn = lambda p, x, t, y, s: guidance.cfg_model_fn(
      lambda xx, tt, yy: model.apply({'params': p}, xx, tt, yy), y, model.num_classes, s)(x, t)
  return jax.jit(fn)(params, x, t, labels, scale)


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
  assert list(models.DiT_models)[:12] == [f'DiT-{s}/{p}' for s in ('XL', 'L', 'B', 'S')
                                          for p in (2, 4, 8)]
  assert list(models.DiT_models)[12:] == [  # LightningDiT's sizes
      f'LightningDiT-{n}' for n in ('B/1', 'B/2', 'L/2', 'XL/1', 'XL/2', '1p0B/1', '1p0B/2',
                                    '1p6B/1', '1p6B/2')]
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


# DiT-S's head_dim (64), one head, 3 blocks, 16 tokens.
S_LIKE = dict(input_size=8, patch_size=2, hidden_size=64, depth=3, num_heads=1, num_classes=10)


def _rel_errors(a, ref):
  err = np.abs(np.asarray(a) - np.asarray(ref))
  return err.max() / np.abs(ref).max(), err.mean() / np.abs(ref).mean()


def test_bf16_close_to_fp32():
  model = models.DiT(**S_LIKE)
  p = _randomize(_init(model)['params'])
  x, t, y = _inputs(model, n=4, seed=1)
  ref = np.asarray(_apply(model, p, x, t, y))
  bf16 = _apply(model.clone(dtype=jnp.bfloat16), p, x, t, y)
  assert bf16.dtype == jnp.float32
  max_err, mean_err = _rel_errors(bf16, ref)
  # Measured: 0.44% max, 0.34% mean relative error. With the conditioning (embeddings, adaLN,
  # modulate) and the final layer in bf16 as well, this model gave 0.83% max and 0.66% mean.
  assert 0 < max_err < 6.5e-3 and mean_err < 5e-3, (max_err, mean_err)


def test_small_adaln_scale_survives_bf16():
  model = models.DiT(**S_LIKE)
  p = _randomize(_init(model)['params'])
  x, t, y = _inputs(model, n=2)

  def with_scale(scale):
    """Every block's modulation: gates 1, scale_msa `scale`, the rest 0 (bias only)."""
    q = jax.tree_util.tree_map(lambda a: a, p)
    d = model.hidden_size
    bias = np.zeros(6 * d, np.float32)
    bias[d:2 * d] = scale
    bias[2 * d:3 * d] = bias[5 * d:] = 1.0
    for i in range(model.depth):
      q[f'blocks_{i}']['adaLN_modulation'] = {'kernel': jnp.zeros((d, 6 * d)),
                                              'bias': jnp.asarray(bias)}
    return q

  def diff(dtype):
    m = model.clone(dtype=dtype)
    return np.asarray(_apply(m, with_scale(0.003), x, t, y) - _apply(m, with_scale(0.0), x, t, y))

  want, got = diff(jnp.float32), diff(jnp.bfloat16)
  assert np.abs(want).max() > 1e-3  # the scale matters in float32
  # In bf16 1 + 0.003 rounds to 1: with bf16 modulation the difference would be exactly 0.
  # The bf16 qkv matmul rounds its input again (to 0.4%), so per element the effect is noisy
  # (the output is ~5, its bf16 noise ~0.02, the effect ~0.008), but it survives on average:
  # measured slope 1.16 and correlation 0.53 over the 1,024 outputs.
  slope = np.sum(got * want) / np.sum(want * want)
  assert 0.7 < slope < 1.4 and np.corrcoef(got.ravel(), want.ravel())[0, 1] > 0.3


def _loss_and_grads(model, params, x, t, y):
  loss = lambda q: jnp.mean(model.apply({'params': q}, x, t, y) ** 2)
  return jax.jit(jax.value_and_grad(loss))(params)


def _assert_close_trees(a, b, rtol):
  for (path, u), w in zip(jax.tree_util.tree_leaves_with_path(a), jax.tree_util.tree_leaves(b)):
    u, w = np.asarray(u), np.asarray(w)
    assert np.abs(u - w).max() <= rtol * np.abs(u).max() + 1e-12, jax.tree_util.keystr(path)


@pytest.mark.parametrize('remat', ['full', 'dots_saveable', 'dots_with_no_batch_dims_saveable'])
def test_remat_policies_keep_loss_and_grads(remat):
  model = models.DiT(**TINY)
  p = _randomize(_init(model)['params'])
  x, t, y = _inputs(model, n=2)
  loss, grads = _loss_and_grads(model, p, x, t, y)
  loss_remat, grads_remat = _loss_and_grads(model.clone(remat=remat), p, x, t, y)
  np.testing.assert_allclose(loss_remat, loss, rtol=1e-6)
  _assert_close_trees(grads, grads_remat, rtol=1e-5)


def test_unknown_remat_policy_names_the_choices():
  assert models.remat_policy(True) is models.REMAT_POLICIES['full']  # bools as before
  assert models.remat_policy(False) is None and models.remat_policy('none') is None
  model = models.DiT(**{**TINY, 'remat': 'dots'})
  with pytest.raises(ValueError, match=r"remat='dots'.*none, full, dots_saveable, "
                     r'dots_with_no_batch_dims_saveable'):
    jax.eval_shape(model.init, jax.random.key(0), *_inputs(model, 1))
  with pytest.raises(ValueError, match=r"attention_impl='flash'.*splash"):
    models.DiT(**{**TINY, 'attention_impl': 'flash'}).validate()


def test_scanned_blocks_match_unrolled():
  from dit_jax import convert  # pylint: disable=g-import-not-at-top
  model = models.DiT(**{**TINY, 'depth': 3})
  scanned = model.clone(scan_layers=True)
  p = _randomize(_init(model)['params'])
  ps = convert.stack_blocks(p)
  assert 'blocks_0' not in ps and ps['blocks']['attn']['qkv']['kernel'].shape == (3, 32, 96)
  assert jax.tree.map(np.shape, ps) == jax.tree.map(np.shape, models.param_shapes(scanned))
  x, t, y = _inputs(model, n=4)
  y = y.at[2:].set(model.num_classes)
  ref, got = _apply(model, p, x, t, y), _apply(scanned, ps, x, t, y)
  assert _rel_errors(got, ref)[0] < 1e-6
  ref, got = (_guided(m, q, x, t, y[:2], 4.0) for m, q in ((model, p), (scanned, ps)))
  assert _rel_errors(got, ref)[0] < 1e-6
  # Training: remat inside the scan, gradients back in the per-block layout.
  loss, grads = _loss_and_grads(model, p, x, t, y)
  loss_s, grads_s = _loss_and_grads(scanned.clone(remat='dots_with_no_batch_dims_saveable'), ps,
                                    x, t, y)
  np.testing.assert_allclose(loss_s, loss, rtol=1e-6)
  _assert_close_trees(grads, convert.unstack_blocks(grads_s), rtol=1e-5)


def test_scanned_layers_axis_is_named_and_never_sharded():
  from dit_jax import sharding  # pylint: disable=g-import-not-at-top
  # depth 8 divides the 8 devices; the width 36 does not, so only the fallback could shard.
  model = models.DiT(**{**TINY, 'depth': 8, 'hidden_size': 36, 'num_heads': 3,
                        'scan_layers': True})
  boxed = jax.eval_shape(model.init, jax.random.key(0), *_inputs(model, 1))
  specs = nn.get_partition_spec(boxed)['params']
  assert tuple(specs['blocks']['attn']['qkv']['kernel']) == ('layers', 'embed', 'qkv')
  assert tuple(specs['blocks']['adaLN_modulation']['bias']) == ('layers', 'adaln')
  mesh = sharding.create_mesh(1, 8)
  sh = sharding.state_shardings(boxed, mesh)['params']
  for leaf in jax.tree.leaves(sh['blocks']):
    assert leaf.spec[0] is None, leaf.spec
  assert tuple(sh['blocks']['mlp']['fc1']['kernel'].spec) == (None, None, 'fsdp')  # 144 = 4 x 36


def test_cfg_scale_is_traced():
  model = models.DiT(**TINY)
  p = _randomize(_init(model)['params'])
  x, t, y = _inputs(model, n=4)
  y = y.at[2:].set(model.num_classes)
  fn = jax.jit(lambda p, s: guidance.cfg_model_fn(
      lambda xx, tt, yy: model.apply({'params': p}, xx, tt, yy), y[:2], model.num_classes,
      s)(x, t))
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

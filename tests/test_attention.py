"""Attention implementations: 'auto' selection, Pallas splash attention (interpret mode on CPU,
compiled for a TPU topology) against the XLA path."""

import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from dit_jax import attention, models


def _qkv(shape, seed=0, dtype=jnp.float32):
  rng = np.random.default_rng(seed)
  return tuple(jnp.asarray(rng.standard_normal(shape), dtype) for _ in range(3))


def _grads(impl, q, k, v):
  # A loss with a non-uniform cotangent, so every output element matters.
  w = jnp.asarray(np.random.default_rng(9).standard_normal(q.shape), jnp.float32)
  loss = lambda *a: jnp.sum(w * attention.dot_product_attention(*a, impl).astype(jnp.float32))
  return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)))(q, k, v)


def _rel(a, b):
  a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
  return np.abs(a - b).max() / np.abs(b).max()


def test_auto_picks_cudnn_only_for_half_precision_on_gpu():
  assert attention.resolve_auto(jnp.bfloat16, 'gpu') == 'cudnn'
  assert attention.resolve_auto(jnp.float16, 'gpu') == 'cudnn'
  assert attention.resolve_auto(jnp.float32, 'gpu') == 'xla'
  assert attention.resolve_auto(jnp.bfloat16, 'tpu') == 'xla'
  assert attention.resolve_auto(jnp.bfloat16, 'cpu') == 'xla'
  q, k, v = _qkv((2, 16, 2, 8), dtype=jnp.bfloat16)
  auto = attention.dot_product_attention(q, k, v, 'auto')  # CPU: the XLA path, bit for bit
  np.testing.assert_array_equal(auto, attention.dot_product_attention(q, k, v, None))
  with pytest.raises(ValueError, match=r"attention_impl='flash'"):
    attention.dot_product_attention(q, k, v, 'flash')


# 16 tokens (DiT-*/4 at 256 px: padded to 128 with segment ids), 128 tokens (no padding);
# head_dims 64 (S, B) and 72 (XL).
@pytest.mark.parametrize('shape', [(2, 16, 2, 72), (1, 128, 2, 64)])
def test_splash_interpret_matches_xla(shape):
  q, k, v = _qkv(shape)
  (loss, grads), (loss_ref, grads_ref) = _grads('splash_interpret', q, k, v), _grads(None, q, k, v)
  np.testing.assert_allclose(loss, loss_ref, rtol=1e-5)
  for g, g_ref in zip(grads, grads_ref):
    assert _rel(g, g_ref) < 1e-5
  # bf16 inputs: the kernel's float32 softmax and accumulation; within bf16 rounding.
  qb, kb, vb = (a.astype(jnp.bfloat16) for a in (q, k, v))
  out = attention.dot_product_attention(qb, kb, vb, 'splash_interpret')
  assert out.dtype == jnp.bfloat16
  assert _rel(out, attention.dot_product_attention(qb, kb, vb, None)) < 1e-2


def test_dit_with_splash_interpret_under_a_mesh_matches_xla():
  """The whole DiT, batch sharded over 8 devices (splash runs in a shard_map), loss and grads."""
  model = models.DiT(input_size=8, patch_size=2, hidden_size=32, depth=2, num_heads=2,
                     num_classes=10)
  rng = np.random.default_rng(0)
  # Weights of std 0.1: at 0.3 this model is so ill-conditioned that a 1e-7 relative change
  # of x moves the XLA path's own gradients by 2e-4.
  params = jax.tree.map(lambda a: jnp.asarray(rng.standard_normal(a.shape, np.float32) * 0.1),
                        models.param_shapes(model))
  x = jnp.asarray(rng.standard_normal((8, 8, 8, 4)), jnp.float32)
  t, y = jnp.arange(8) * 100, jnp.arange(8)

  def loss_and_grads(m):
    loss = lambda p, x: jnp.mean(m.apply({'params': p}, x, t, y) ** 2)
    return jax.jit(jax.value_and_grad(loss))(params, x)

  mesh = jax.make_mesh((2, 4), ('data', 'fsdp'), axis_types=(jax.sharding.AxisType.Auto,) * 2)
  x = jax.device_put(x, NamedSharding(mesh, P(('data', 'fsdp'))))
  with jax.set_mesh(mesh):
    loss, grads = loss_and_grads(model.clone(attention_impl='splash_interpret'))
  loss_ref, grads_ref = loss_and_grads(model)
  np.testing.assert_allclose(loss, loss_ref, rtol=1e-5)
  for g, g_ref in zip(jax.tree.leaves(grads), jax.tree.leaves(grads_ref)):
    assert _rel(g, g_ref) < 1e-5


def test_splash_compiles_for_a_tpu_topology():
  """The Mosaic kernel lowers and compiles for v5p (4 chips, batch sharded), forward and
  backward, at XL's head_dim 72 and 16 tokens (padded), with no all-gather of the batch."""
  os.environ.setdefault('TPU_ACCELERATOR_TYPE', 'v5p-8')
  from jax.experimental import topologies  # pylint: disable=g-import-not-at-top
  devices = topologies.get_topology_desc(platform='tpu', topology_name='v5p:2x2x1').devices
  mesh = jax.make_mesh((1, 4), ('data', 'fsdp'), devices=devices,
                       axis_types=(jax.sharding.AxisType.Auto,) * 2)
  model = models.DiT(input_size=8, patch_size=2, hidden_size=144, depth=2, num_heads=2,
                     num_classes=10, dtype=jnp.bfloat16, attention_impl='splash')
  batch = NamedSharding(mesh, P(('data', 'fsdp')))
  x = jax.ShapeDtypeStruct((8, 8, 8, 4), jnp.float32, sharding=batch)
  t = jax.ShapeDtypeStruct((8,), jnp.int32, sharding=batch)
  params = jax.tree.map(
      lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=NamedSharding(mesh, P())),
      nn.meta.unbox(models.param_shapes(model)))
  step = jax.jit(jax.value_and_grad(lambda p, x, t: jnp.mean(model.apply({'params': p}, x, t, t)
                                                             ** 2)))
  with jax.set_mesh(mesh):
    hlo = step.lower(params, x, t).compile().as_text()
  assert hlo.count('tpu_custom_call') == 2 * 3  # per block: forward, dq and dkv kernels
  assert 'all-gather' not in hlo


def test_auto_is_decided_for_the_target_when_compiling_for_other_hardware():
  xl2_256, xl2_512 = 256, 1024  # tokens
  # AOT for other hardware (and TPUs): decided by the target's platform and the tokens.
  assert attention.resolve_for('auto', jnp.bfloat16, 'tpu', xl2_256) == 'xla'
  assert attention.resolve_for('auto', jnp.bfloat16, 'tpu', xl2_512) == 'splash'
  assert attention.resolve_for('auto', jnp.float32, 'tpu', xl2_512) == 'xla'  # fp32 sampling
  assert attention.resolve_for('auto', jnp.bfloat16, 'cpu', xl2_512) == 'xla'
  assert attention.resolve_for('splash', jnp.bfloat16, 'tpu', xl2_256) == 'splash'
  assert attention.resolve_for(None, jnp.bfloat16, 'tpu', xl2_512) is None
  if jax.default_backend() != 'gpu':  # compiled from this CPU for a GPU: no trace-time fallback
    assert attention.resolve_for('auto', jnp.bfloat16, 'gpu', xl2_256) == 'cudnn'
    assert attention.resolve_for('auto', jnp.float32, 'gpu', xl2_256) == 'xla'


@pytest.mark.parametrize('dtype', [jnp.float32, jnp.bfloat16])
def test_head_major_xla_path_equals_jax_reference_layout(dtype):
  # models.Attention's XLA path (q, k, v head-major from one einsum on the fused kernel) against
  # the reference layout: the qkv Linear reshaped to [N, T, heads, head_dim] and
  # jax.nn.dot_product_attention ('xla_tokens'). Same parameters; outputs and gradients equal up
  # to float32 summation order (bf16: the same bf16 products).
  x = jnp.asarray(np.random.default_rng(3).standard_normal((2, 16, 48)), jnp.float32)
  heads = models.Attention(48, 3, dtype, 'xla')
  tokens = heads.clone(attention_impl='xla_tokens')
  params = nn.meta.unbox(heads.init(jax.random.key(0), x)['params'])
  params = jax.tree.map(lambda p: p + 0.1 * jax.random.normal(jax.random.key(1), p.shape), params)
  assert (jax.tree.map(jnp.shape, params) ==
          jax.tree.map(jnp.shape, nn.meta.unbox(tokens.init(jax.random.key(0), x)['params'])))
  w = jnp.asarray(np.random.default_rng(4).standard_normal(x.shape), jnp.float32)

  def loss_and_grads(model):
    loss = lambda p, x: jnp.sum(w * model.apply({'params': p}, x).astype(jnp.float32))
    return jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))(params, x)

  (loss, grads), (loss_ref, grads_ref) = loss_and_grads(heads), loss_and_grads(tokens)
  out, out_ref = heads.apply({'params': params}, x), tokens.apply({'params': params}, x)
  assert out.dtype == out_ref.dtype == dtype
  tol = 1e-5 if dtype == jnp.float32 else 2e-2
  assert _rel(out, out_ref) < tol
  np.testing.assert_allclose(loss, loss_ref, rtol=tol)
  for g, g_ref in zip(jax.tree.leaves(grads), jax.tree.leaves(grads_ref)):
    assert _rel(g, g_ref) < tol

"""Multi-head self-attention kernels for DiT: q, k, v [N, T, heads, head_dim] -> [N, T, heads, head_dim].

Non-causal, no mask, scale head_dim**-0.5. The implementation is `DiT.attention_impl`
(`config.model.attention_impl`):

  None, 'xla'        the XLA path: two einsums, float32 softmax. `models.Attention` runs it
                     head-major ([N, heads, T, head_dim] straight from the qkv kernel,
                     `xla_heads_major`).
  'xla_tokens'       the same math in the token-major layout: the qkv Linear reshaped to
                     [N, T, heads, head_dim] and jax.nn.dot_product_attention's XLA path (by
                     XLA's TPU cost model XL/2's step on v5p-64 takes 35.5 ms with it, 33.6
                     head-major; docs/performance.md compares the two for every grid config);
                     the planner table's token-major rows compile with it (planner_table).
  'cudnn'            cuDNN fused attention through jax.nn.dot_product_attention (GPUs, bf16/fp16).
  'auto'             cuDNN on GPUs when q is bf16/fp16 (decided when tracing, with the XLA path as
                     fallback where cuDNN rejects the call: old cuDNN or GPU); splash on TPUs from
                     SPLASH_MIN_TOKENS tokens (DiT-XL/2 at 512 px) in bf16/fp16; else the XLA path. `step.build`
                     decides it for the devices it compiles for (AOT TPU topologies included).
  'splash'           Pallas splash attention, the TPU flash-attention kernel (Mosaic; TPU only).
  'splash_interpret' the same kernel run by the Pallas interpreter: any backend, slow; it checks
                     the kernel's numerics on a CPU.

Splash works on [heads, T, head_dim] per example with T a multiple of 128 (the TPU lane width):
shorter or odd token counts (16 and 64 tokens of the /8 and /4 models) are padded, and segment
ids keep real and padded tokens apart. Under a context mesh (`jax.set_mesh`; `step.build` lowers
the step under its mesh) the kernel runs in a shard_map over the batch, so XLA's partitioner never
has to gather the batch around the custom call.
"""

import functools
import logging

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

IMPLEMENTATIONS = (None, 'xla', 'cudnn', 'auto', 'splash', 'splash_interpret', 'xla_tokens')

_LANES = 128  # splash's block sizes are multiples of the TPU lane width


def check_implementation(impl: str | None) -> None:
  if impl not in IMPLEMENTATIONS:
    raise ValueError(f'attention_impl={impl!r} is not one of: '
                     + ', '.join(str(i) for i in IMPLEMENTATIONS))


# 'auto' picks splash on TPUs from this many tokens (DiT-XL/2 at 512 px has 1,024). There the
# XLA path's [N, heads, T, T] float32 logits dominate memory traffic: on v5p-64 the XL/2 512 px
# step's roofline halves and XLA's own estimate drops 40% (docs/performance.md). Both estimates
# leave the Pallas kernel's own cost out; at 256 tokens their gain (6%, 0.8 GiB) is within what
# the kernel may cost (head_dim 72 pads to its 128 lanes), so the XLA path stays there until a
# TPU measures it.
SPLASH_MIN_TOKENS = 1024


def resolve_auto(dtype, platform: str, tokens: int | None = None) -> str:
  """'auto' -> for bf16/fp16 inputs, 'cudnn' on GPUs and 'splash' on TPUs for sequences of at
  least SPLASH_MIN_TOKENS; else (float32 included: the release's sampling) 'xla'."""
  half = jnp.dtype(dtype) in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
  if platform == 'gpu' and half:
    return 'cudnn'
  if platform == 'tpu' and half and tokens is not None and tokens >= SPLASH_MIN_TOKENS:
    return 'splash'
  return 'xla'


def resolve_for(impl: str | None, dtype, platform: str, tokens: int) -> str | None:
  """The implementation a model compiled for `platform` uses. 'auto' is decided here, except
  on a GPU that is the default backend, where it is left to trace time so that a cuDNN
  rejection falls back to the XLA path."""
  if impl != 'auto' or (platform == 'gpu' and jax.default_backend() == 'gpu'):
    return impl
  return resolve_auto(dtype, platform, tokens)


def dot_product_attention(q: jax.Array, k: jax.Array, v: jax.Array,
                          impl: str | None = None) -> jax.Array:
  """q, k, v [N, T, heads, head_dim] -> [N, T, heads, head_dim] in q's dtype."""
  check_implementation(impl)
  if impl in ('splash', 'splash_interpret'):
    return splash_attention(q, k, v, interpret=impl == 'splash_interpret')
  if impl == 'auto':
    impl = resolve_auto(q.dtype, jax.default_backend(), q.shape[1])
    if impl in ('splash', 'splash_interpret'):
      return splash_attention(q, k, v)
    if impl == 'cudnn':
      try:
        return jax.nn.dot_product_attention(q, k, v, implementation='cudnn')
      except Exception as e:  # pylint: disable=broad-except
        logging.warning('cuDNN attention is unavailable here (%s): using the XLA path', e)
      impl = 'xla'
  if impl == 'xla_tokens':
    impl = 'xla'
  return jax.nn.dot_product_attention(q, k, v, implementation=impl)


def xla_heads_major(q: jax.Array, k: jax.Array, v: jax.Array) -> jax.Array:
  """The XLA path in the head-major layout: q, k, v [N, heads, T, head_dim] -> the same shape.

  The math of jax.nn.dot_product_attention's XLA path element for element (logits accumulated
  in float32, with bf16 x bf16 -> f32 products for bf16 inputs; float32 softmax; probabilities
  cast to v's dtype); only the layout differs. `models.Attention` produces q, k and v in this
  layout straight from the fused qkv kernel, so XLA is given no [N, T, heads, head_dim] slices
  to transpose around the two einsums (by XLA's TPU cost model ~9% of XL/2's train step on
  v5p-64, docs/performance.md).
  """
  if q.dtype == jnp.bfloat16:
    precision = jax.lax.DotAlgorithmPreset.BF16_BF16_F32
  elif q.dtype == jnp.float16:
    precision = jax.lax.DotAlgorithmPreset.F16_F16_F32
  else:
    precision = None
  logits = jnp.einsum('bnth,bnsh->bnts', q, k, precision=precision,
                      preferred_element_type=jnp.promote_types(q.dtype, jnp.float32))
  logits = logits * jnp.float32(q.shape[-1] ** -0.5)
  probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1).astype(v.dtype)
  return jnp.einsum('bnts,bnsh->bnth', probs, v)


def _block(tokens: int) -> int:
  return next(b for b in (512, 256, _LANES) if tokens % b == 0)


@functools.lru_cache(maxsize=None)
def _splash_kernel(heads: int, tokens: int, interpret: bool):
  # pylint: disable=g-import-not-at-top
  from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as sk
  from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as sm
  b = _block(tokens)
  sizes = sk.BlockSizes(block_q=b, block_kv=b, block_kv_compute=b, block_q_dkv=b,
                        block_kv_dkv=b, block_kv_dkv_compute=b, block_q_dq=b, block_kv_dq=b)
  mask = sm.MultiHeadMask([sm.FullMask((tokens, tokens)) for _ in range(heads)])
  # Concrete mask-info arrays even when first built inside a trace, so the cache is safe.
  with jax.ensure_compile_time_eval():
    return sk.make_splash_mha(mask, block_sizes=sizes, head_shards=1, q_seq_shards=1,
                              interpret=interpret)


def _splash_local(q: jax.Array, k: jax.Array, v: jax.Array, interpret: bool) -> jax.Array:
  """Splash on one shard: q, k, v [n, T, heads, head_dim] (q already scaled)."""
  from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as sk  # pylint: disable=g-import-not-at-top
  _, t, h, _ = q.shape
  tp = -(-t // _LANES) * _LANES
  q, k, v = (jnp.swapaxes(a, 1, 2) for a in (q, k, v))  # [n, heads, T, head_dim]
  kernel = _splash_kernel(h, tp, interpret)
  if tp == t:
    out = jax.vmap(kernel)(q, k, v)
  else:
    pad = ((0, 0), (0, 0), (0, tp - t), (0, 0))
    q, k, v = (jnp.pad(a, pad) for a in (q, k, v))
    ids = (jnp.arange(tp) >= t).astype(jnp.int32)  # 0: real tokens, 1: padding
    out = jax.vmap(kernel, in_axes=(0, 0, 0, None))(q, k, v, sk.SegmentIds(q=ids, kv=ids))
    out = out[:, :, :t]
  return jnp.swapaxes(out, 1, 2)


def _with_default_precision(fn):
  def wrapped(*args):
    with jax.default_matmul_precision('default'):
      return fn(*args)
  return wrapped


def splash_attention(q: jax.Array, k: jax.Array, v: jax.Array,
                     interpret: bool = False) -> jax.Array:
  """Pallas splash attention: q, k, v [N, T, heads, head_dim] -> [N, T, heads, head_dim]."""
  scale = np.float32(q.shape[-1] ** -0.5)
  q = (q.astype(jnp.float32) * scale).astype(q.dtype)  # splash does not scale the logits
  local = functools.partial(_splash_local, interpret=interpret)
  if q.dtype != jnp.float32:
    # bf16 x bf16 products are exact with float32 accumulation whatever the precision, and
    # Mosaic rejects an fp32 contract precision on bf16 operands (e.g. sampling under
    # jax.default_matmul_precision('highest')).
    local = _with_default_precision(local)
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty:
    return local(q, k, v)
  if set(mesh.manual_axes) == set(mesh.axis_names):
    return local(q, k, v)  # inside the explicit step's shard_map: q is one device's block
  # The batch over every mesh axis that divides it (step.build's mesh), except manual ones.
  axes, size = [], 1
  for name in mesh.axis_names:
    if name not in mesh.manual_axes and q.shape[0] % (size * mesh.shape[name]) == 0:
      axes.append(name)
      size *= mesh.shape[name]
  spec = P(tuple(axes) if axes else None)
  return jax.shard_map(local, mesh=mesh, in_specs=(spec, spec, spec), out_specs=spec,
                       check_vma=False)(q, k, v)

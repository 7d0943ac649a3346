"""DiT: diffusion transformer with adaLN-Zero blocks (Peebles & Xie, 2023), in flax.linen.

Faithful to the released PyTorch model (facebookresearch/DiT) so that its checkpoints load through
`dit_jax.convert` and give the same outputs, but NHWC throughout:

  x [N, H, W, C] latents, t [N] timesteps (0..999), y [N] int labels -> [N, H, W, out_channels].

Parameter tree (mirrors the released state_dict names, see `dit_jax.convert`):
  x_embedder/proj, t_embedder/{mlp_0, mlp_2}, y_embedder/embedding_table,
  blocks_{i}/{adaLN_modulation, attn/{qkv, proj}, mlp/{fc1, fc2}}, final_layer/{adaLN_modulation, linear}.
With scan_layers=True the blocks are one subtree `blocks/...` whose arrays carry a leading [depth]
axis (`dit_jax.convert.stack_blocks` / `unstack_blocks` go between the layouts).

Every parameter carries logical axis names (`LOGICAL_AXES`) for sharding rules; params come boxed as
`nn.LogicallyPartitioned` from `init` (use `flax.linen.meta.unbox` or `nn.get_partition_spec`).
"""

import dataclasses
import functools
from typing import Any, Callable, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from dit_jax import attention

# Logical axis names used by the parameters; a sharding rule table maps them to mesh axes.
#   'embed'  - the hidden width D (every D-sized dimension that is a Dense input or output).
#   'hidden' - the output D of a [D, D] kernel whose input is also D (timestep MLP's second layer),
#              so that a rule table can shard the two sides of a square kernel differently.
#   'mlp'    - the 4D hidden width of the block MLP.
#   'qkv'    - the 3D output of the fused q/k/v projection.
#   'heads'  - the D input of the attention output projection (heads x head_dim).
#   'adaln'  - the k*D adaLN-modulation outputs (6D in blocks, 2D in the final layer).
#   'vocab'  - rows of the label table (num_classes [+ 1 null class]).
#   'freq'   - the 256 timestep frequency features.
#   'out'    - the p*p*out_channels output of the final linear layer.
#   'layers' - the leading [depth] axis of the stacked blocks with scan_layers=True (never sharded).
# Convolution input channels and kernel spatial dims are None (replicated).
LOGICAL_AXES = ('embed', 'hidden', 'mlp', 'qkv', 'heads', 'adaln', 'vocab', 'freq', 'out',
                'layers')

FREQ_DIM = 256  # timestep frequency features, as the release
MAX_PERIOD = 10000

_xavier = nn.initializers.xavier_uniform()
_zeros = nn.initializers.zeros_init()
_normal02 = nn.initializers.normal(stddev=0.02)
# The release applies xavier to the patch conv weight viewed as [D, C*p*p]: fan_in C*p*p, fan_out D.
# Flax's kernel is [p, p, C, D]; fold the spatial dims into fan_in instead of the receptive field.
_patch_init = nn.initializers.variance_scaling(1.0, 'fan_avg', 'uniform', in_axis=(0, 1, 2),
                                               out_axis=-1)


def _part(init: Callable, names: tuple) -> Callable:
  return nn.with_logical_partitioning(init, names)


def _dense(features: int, in_name: str | None, out_name: str, dtype: Any, name: str,
           kernel_init: Callable = _xavier) -> nn.Dense:
  return nn.Dense(features, dtype=dtype, param_dtype=jnp.float32, name=name,
                  kernel_init=_part(kernel_init, (in_name, out_name)),
                  bias_init=_part(_zeros, (out_name,)))


def get_1d_sincos_pos_embed(embed_dim: int, pos: np.ndarray) -> np.ndarray:
  """MAE-style 1-D table in float64: [M] positions -> [M, embed_dim], sine half first."""
  omega = np.arange(embed_dim // 2, dtype=np.float64) / (embed_dim / 2.0)
  omega = 1.0 / 10000**omega
  out = np.einsum('m,d->md', pos.reshape(-1).astype(np.float64), omega)
  return np.concatenate([np.sin(out), np.cos(out)], axis=1)


def get_2d_sincos_pos_embed(embed_dim: int, grid_size: int) -> np.ndarray:
  """Fixed 2-D sin-cos table [grid_size**2, embed_dim] (float64), tokens row-major.

  The first half of the channels encodes the column index, the second half the row index (the
  release builds its grid as meshgrid(w, h), hence the column first).
  """
  if embed_dim % 4:
    raise ValueError(f'hidden_size must be divisible by 4 for the 2-D sin-cos table, got {embed_dim}')
  rows, cols = np.meshgrid(np.arange(grid_size), np.arange(grid_size), indexing='ij')
  emb_col = get_1d_sincos_pos_embed(embed_dim // 2, cols)
  emb_row = get_1d_sincos_pos_embed(embed_dim // 2, rows)
  return np.concatenate([emb_col, emb_row], axis=1)


# pos_embedding: name -> (hidden_size, grid_size) -> a fixed [grid_size**2, hidden_size] table.
POS_EMBEDDINGS: dict[str, Callable[[int, int], np.ndarray]] = {'sincos': get_2d_sincos_pos_embed}


def timestep_features(t: jnp.ndarray, dim: int = FREQ_DIM) -> jnp.ndarray:
  """[N] timesteps -> [N, dim] float32 features [cos(t f), sin(t f)], f = exp(-ln(1e4) k / half)."""
  half = dim // 2
  freqs = jnp.exp(-np.log(MAX_PERIOD) * jnp.arange(half, dtype=jnp.float32) / half)
  args = t.astype(jnp.float32)[:, None] * freqs[None]
  emb = jnp.concatenate([jnp.cos(args), jnp.sin(args)], axis=-1)
  if dim % 2:
    emb = jnp.concatenate([emb, jnp.zeros_like(emb[:, :1])], axis=-1)
  return emb


def modulate(x: jnp.ndarray, shift: jnp.ndarray | None, scale: jnp.ndarray) -> jnp.ndarray:
  """x [N, T, D], shift/scale [N, D] -> x * (1 + scale) + shift (no shift: None)."""
  x = x * (1 + scale[:, None])
  return x if shift is None else x + shift[:, None]


def _layer_norm(name: str) -> nn.LayerNorm:
  # No affine; float32 in and out (the residual stream), whatever the matmul dtype.
  return nn.LayerNorm(epsilon=1e-6, use_bias=False, use_scale=False, dtype=jnp.float32,
                      name=name)


def _rms_norm(name: str, axis_name: str | None = 'embed') -> nn.Module:
  # LightningDiT's RMSNorm: x / sqrt(mean(x^2) + 1e-6) * weight, in float32; weight starts at 1.
  return nn.RMSNorm(epsilon=1e-6, dtype=jnp.float32, param_dtype=jnp.float32,
                    scale_init=_part(nn.initializers.ones_init(), (axis_name,)), name=name)


# The block's parts by name (DiT.norm, mlp, pos_embedding, attention): a variant of the model is an
# entry here and a field value, and every default is the released DiT's.
#   norm: name -> a float32 norm module over the last axis.
NORMS: dict[str, Callable[[str], nn.Module]] = {'layernorm': _layer_norm, 'rmsnorm': _rms_norm}


def _qk_norm(kind: str, name: str) -> nn.Module:
  """LightningDiT's q_norm/k_norm over head_dim: its RMSNorm under rmsnorm blocks, else
  torch's LayerNorm(head_dim) (affine, eps 1e-5); float32."""
  if kind == 'rmsnorm':
    return _rms_norm(name, None)
  return nn.LayerNorm(epsilon=1e-5, dtype=jnp.float32, param_dtype=jnp.float32, name=name,
                      scale_init=_part(nn.initializers.ones_init(), (None,)),
                      bias_init=_part(_zeros, (None,)))


def rope_tables(head_dim: int, grid_size: int) -> tuple[np.ndarray, np.ndarray]:
  """2-D rotary tables (cos, sin), [grid_size**2, head_dim] float32, as LightningDiT's
  VisionRotaryEmbeddingFast(dim=head_dim/2, pt_seq_len=grid_size) (EVA-02): the first half of
  the head dimension rotates with the token's row, the second half with its column; each
  frequency 1/10000^(2i/dim) serves one interleaved pair. Computed in float32 as there."""
  if head_dim % 4:
    raise ValueError(f'rope: head_dim={head_dim} must be divisible by 4 (two halves of pairs)')
  dim = head_dim // 2
  freqs = np.float32(1.0) / (np.float32(10000.0) ** (
      np.arange(0, dim, 2, dtype=np.float32)[:dim // 2] / np.float32(dim)))
  pos = np.arange(grid_size, dtype=np.float32) / np.float32(grid_size) * np.float32(grid_size)
  angles = np.repeat(pos[:, None] * freqs[None], 2, axis=-1)  # [S, dim], pairs interleaved
  rows = np.broadcast_to(angles[:, None, :], (grid_size, grid_size, dim))
  cols = np.broadcast_to(angles[None, :, :], (grid_size, grid_size, dim))
  table = np.concatenate([rows, cols], axis=-1).reshape(grid_size * grid_size, head_dim)
  return np.cos(table).astype(np.float32), np.sin(table).astype(np.float32)


def apply_rope(x: jnp.ndarray, cos: jnp.ndarray, sin: jnp.ndarray) -> jnp.ndarray:
  """x * cos + rotate_half(x) * sin over the last axis, rotate_half mapping each pair
  (x[2i], x[2i+1]) to (-x[2i+1], x[2i]); float32, returned in x's dtype. cos/sin broadcast
  against x (tokens on the axis before heads or before head_dim)."""
  xf = x.astype(jnp.float32)
  pairs = xf.reshape(*xf.shape[:-1], -1, 2)
  rotated = jnp.stack([-pairs[..., 1], pairs[..., 0]], axis=-1).reshape(xf.shape)
  return (xf * cos + rotated * sin).astype(x.dtype)


class TimestepEmbedder(nn.Module):
  """[N] timesteps -> [N, D]: frequency features, Linear(256, D), SiLU, Linear(D, D)."""
  hidden_size: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, t: jnp.ndarray) -> jnp.ndarray:
    h = timestep_features(t)
    h = _dense(self.hidden_size, 'freq', 'embed', self.dtype, 'mlp_0', _normal02)(h)
    h = nn.silu(h)
    return _dense(self.hidden_size, 'embed', 'hidden', self.dtype, 'mlp_2', _normal02)(h)


class LabelEmbedder(nn.Module):
  """[N] labels -> [N, D], with label dropout to the null class (row num_classes) for guidance."""
  num_classes: int
  hidden_size: int
  dropout_prob: float
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, y: jnp.ndarray, train: bool, force_drop_ids: jnp.ndarray | None = None):
    use_cfg = self.dropout_prob > 0
    table = nn.Embed(self.num_classes + int(use_cfg), self.hidden_size, dtype=self.dtype,
                     param_dtype=jnp.float32, embedding_init=_part(_normal02, ('vocab', 'embed')),
                     name='embedding_table')
    if force_drop_ids is not None:
      drop = jnp.asarray(force_drop_ids) == 1
    elif train and use_cfg:
      drop = jax.random.uniform(self.make_rng('dropout'), y.shape) < self.dropout_prob
    else:
      drop = None
    if drop is not None:
      y = jnp.where(drop, self.num_classes, y)
    return table(y)


class Attention(nn.Module):
  """Multi-head self-attention, fused qkv (output ordered [q | k | v], each head-major).

  Parameters: the release's `qkv` Linear(D, 3D) and `proj` Linear(D, D) (kernel [in, out], bias
  [out]), whatever the implementation. On the XLA path (`attention_impl` None, 'xla', or 'auto'
  where it resolves to XLA) q, k and v come out of one einsum head-major, [N, heads, T,
  head_dim], attention runs in that layout, and the output projection contracts (heads,
  head_dim) directly: the same math as the Linear, reshape and [N, T, heads, head_dim] path that
  the other kernels take ('xla_tokens' is the XLA path in that layout), in layouts XLA fuses
  better (benchmarks/heads_major_attention.py).
  """
  hidden_size: int
  num_heads: int
  dtype: Any = jnp.float32
  attention_impl: str | None = None
  # LightningDiT's options: q_norm/k_norm over head_dim ('' off, else the block's norm name:
  # 'rmsnorm' -> RMSNorm, otherwise LayerNorm with affine), then 2-D RoPE on q and k for a
  # grid of rope_grid x rope_grid tokens (0: off).
  qk_norm: str = ''
  rope_grid: int = 0

  def _xla_path(self, tokens: int) -> bool:
    impl = self.attention_impl
    if impl == 'auto':
      # cuDNN stays with attention.dot_product_attention, which falls back where cuDNN refuses.
      impl = attention.resolve_auto(self.dtype, jax.default_backend(), tokens)
    return impl in (None, 'xla')

  def _q_k(self, q: jnp.ndarray, k: jnp.ndarray, token_axis: int):
    """q_norm/k_norm and RoPE (both over head_dim; tokens on `token_axis`)."""
    if self.qk_norm:
      q = _qk_norm(self.qk_norm, 'q_norm')(q).astype(self.dtype)
      k = _qk_norm(self.qk_norm, 'k_norm')(k).astype(self.dtype)
    if self.rope_grid:
      cos, sin = rope_tables(q.shape[-1], self.rope_grid)
      shape = (-1, 1, q.shape[-1]) if token_axis == 1 else (-1, q.shape[-1])
      cos, sin = jnp.asarray(cos).reshape(shape), jnp.asarray(sin).reshape(shape)
      q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
    return q, k

  def _sow_weights(self, q: jnp.ndarray, k: jnp.ndarray) -> None:
    """With the 'intermediates' collection mutable (dit_jax.inspection): the attention
    probabilities [N, heads, T, T] (float32, recomputed from q and k [N, heads, T, head_dim]);
    nothing otherwise, so training and sampling are unchanged."""
    if self.is_mutable_collection('intermediates'):
      logits = jnp.einsum('bnth,bnsh->bnts', q.astype(jnp.float32), k.astype(jnp.float32))
      self.sow('intermediates', 'attention_weights',
               jax.nn.softmax(logits * (q.shape[-1] ** -0.5), axis=-1))

  @nn.compact
  def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
    n, t, d = x.shape
    nh = self.num_heads
    hd = d // nh
    if self.rope_grid and self.rope_grid**2 != t:
      raise ValueError(f'rope: {t} tokens are not a {self.rope_grid}x{self.rope_grid} grid')
    if not self._xla_path(t):
      qkv = _dense(3 * d, 'embed', 'qkv', self.dtype, 'qkv')(x)
      qkv = qkv.reshape(n, t, 3, nh, hd)
      q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]  # [N, T, heads, head_dim]
      q, k = self._q_k(q, k, token_axis=1)
      self._sow_weights(q.swapaxes(1, 2), k.swapaxes(1, 2))
      out = attention.dot_product_attention(q, k, v, self.attention_impl)
      return _dense(d, 'heads', 'embed', self.dtype, 'proj')(out.reshape(n, t, d))
    wqkv, bqkv = _LinearParams(d, 3 * d, 'embed', 'qkv', self.dtype, name='qkv')()
    wo, bo = _LinearParams(d, d, 'heads', 'embed', self.dtype, name='proj')()
    qkv = jnp.einsum('btd,dknh->bknth', x.astype(self.dtype), wqkv.reshape(d, 3, nh, hd))
    qkv = qkv + bqkv.reshape(1, 3, nh, 1, hd)
    q, k, v = qkv[:, 0], qkv[:, 1], qkv[:, 2]  # [N, heads, T, head_dim]
    q, k = self._q_k(q, k, token_axis=2)
    self._sow_weights(q, k)
    out = attention.xla_heads_major(q, k, v)
    return jnp.einsum('bnth,nhd->btd', out, wo.reshape(nh, hd, d)) + bo


class _LinearParams(nn.Module):
  """nn.Dense's parameters as `_dense` makes them (kernel [in, out], bias [out]: same names,
  initialisers, logical axes, float32), returned cast to the compute dtype for a layer that
  contracts them in another shape."""
  in_features: int
  features: int
  in_name: str
  out_name: str
  dtype: Any

  @nn.compact
  def __call__(self) -> tuple[jnp.ndarray, jnp.ndarray]:
    kernel = self.param('kernel', _part(_xavier, (self.in_name, self.out_name)),
                        (self.in_features, self.features), jnp.float32)
    bias = self.param('bias', _part(_zeros, (self.out_name,)), (self.features,), jnp.float32)
    return kernel.astype(self.dtype), bias.astype(self.dtype)


class Mlp(nn.Module):
  hidden_size: int
  mlp_dim: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
    x = _dense(self.mlp_dim, 'embed', 'mlp', self.dtype, 'fc1')(x)
    x = nn.gelu(x, approximate=True)
    return _dense(self.hidden_size, 'mlp', 'embed', self.dtype, 'fc2')(x)


class SwiGLU(nn.Module):
  """LightningDiT's SwiGLUFFN(D, int(2/3 mlp_dim)): one fused w12 projection to 2h, silu(x1) x2
  (x1 its first half), then w3 back to D."""
  hidden_size: int
  mlp_dim: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
    h = int(2 / 3 * self.mlp_dim)
    x1, x2 = jnp.split(_dense(2 * h, 'embed', 'mlp', self.dtype, 'w12')(x), 2, axis=-1)
    return _dense(self.hidden_size, 'mlp', 'embed', self.dtype, 'w3')(nn.silu(x1) * x2)


# mlp: name -> module(hidden_size, mlp_dim, dtype, name=...) mapping [N, T, D] -> [N, T, D].
MLPS: dict[str, Callable[..., nn.Module]] = {'gelu': Mlp, 'swiglu': SwiGLU}
# attention: name -> module(hidden_size, num_heads, dtype, attention_impl, qk_norm=, rope_grid=,
# name=...) mapping [N, T, D] -> [N, T, D]; attention_impl picks its kernel (a runtime choice,
# not a variant).
ATTENTIONS: dict[str, Callable[..., nn.Module]] = {'mha': Attention}


class Modulation(nn.Module):
  """adaLN modulation: c [N, D] -> Linear(D, features)(SiLU(c)) [N, features], float32.

  The parameters are those of the release's `adaLN_modulation.1` Linear (kernel [D, features],
  bias [features]). Their activations are one vector per image while the kernels hold a third
  of XL's parameters, so the data-parallel step may keep them where they are stored:
  `adaln_matmul(x, kernel, bias)`, given, computes the Linear from the parameters as the module
  receives them (in the explicit step: this device's columns of them, the rows of its group
  gathered and the results sent back, `dit_jax.sharding.stationary_matmul`).
  """
  features: int
  adaln_matmul: Callable | None = None

  @nn.compact
  def __call__(self, c: jnp.ndarray) -> jnp.ndarray:
    x = nn.silu(c.astype(jnp.float32))
    if self.adaln_matmul is not None and not self.is_initializing():
      # The stored block, whatever its shape (self.param would check it against the whole).
      return self.adaln_matmul(x, self.get_variable('params', 'kernel'),
                               self.get_variable('params', 'bias'))
    kernel = self.param('kernel', _part(_zeros, ('embed', 'adaln')), (x.shape[-1], self.features),
                        jnp.float32)
    bias = self.param('bias', _part(_zeros, ('adaln',)), (self.features,), jnp.float32)
    out = jnp.dot(x, kernel) + bias
    if self.is_mutable_collection('intermediates'):  # dit_jax.inspection's adaLN statistics
      self.sow('intermediates', 'modulation', out)
    return out


class DiTBlock(nn.Module):
  """adaLN-Zero transformer block: x [N, T, D] float32, c [N, D] float32 -> [N, T, D] float32.

  `dtype` is the compute dtype of the token matmuls (qkv, proj, fc1, fc2) and attention only. The
  [N, D]-sized conditioning path (adaLN Linear, `1 + scale`, modulate) and the LayerNorms stay
  float32: in bfloat16, 1 + 0.003 rounds to 1, so small adaLN-Zero scales would vanish.
  """
  hidden_size: int
  num_heads: int
  mlp_ratio: float = 4.0
  dtype: Any = jnp.float32
  attention_impl: str | None = None
  adaln_matmul: Callable | None = None  # see Modulation
  norm: str = 'layernorm'  # a NORMS name
  mlp: str = 'gelu'  # an MLPS name
  attention: str = 'mha'  # an ATTENTIONS name
  qk_norm: bool = False  # q_norm/k_norm (of the block's norm kind) over head_dim
  rope_grid: int = 0  # 2-D RoPE on q and k over a rope_grid x rope_grid token grid (0: off)
  adaln_shift: bool = True  # False: 4 modulations (scale, gate per branch), no shifts

  @nn.compact
  def __call__(self, x: jnp.ndarray, c: jnp.ndarray) -> jnp.ndarray:
    d = self.hidden_size
    norm = NORMS[self.norm]
    if self.adaln_shift:
      mod = Modulation(6 * d, self.adaln_matmul, name='adaLN_modulation')(c)
      shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = jnp.split(mod, 6, axis=-1)
    else:  # LightningDiT's wo_shift: (scale_msa, gate_msa, scale_mlp, gate_mlp)
      mod = Modulation(4 * d, self.adaln_matmul, name='adaLN_modulation')(c)
      scale_msa, gate_msa, scale_mlp, gate_mlp = jnp.split(mod, 4, axis=-1)
      shift_msa = shift_mlp = None
    h = modulate(norm('norm1')(x), shift_msa, scale_msa)
    h = ATTENTIONS[self.attention](d, self.num_heads, self.dtype, self.attention_impl,
                                   qk_norm=self.norm if self.qk_norm else '',
                                   rope_grid=self.rope_grid, name='attn')(h)
    # The residual stream stays float32: bf16 branch outputs promote on the gated add.
    x = x + gate_msa[:, None] * h
    h = modulate(norm('norm2')(x), shift_mlp, scale_mlp)
    h = MLPS[self.mlp](d, int(d * self.mlp_ratio), self.dtype, name='mlp')(h)
    return x + gate_mlp[:, None] * h


class FinalLayer(nn.Module):
  """x [N, T, D], c [N, D] -> [N, T, p*p*out_channels] float32 (zero-initialised).

  Always float32: its matmul is small (p*p*out_channels outputs per token) and its output is
  the prediction itself.
  """
  hidden_size: int
  out_dim: int
  adaln_matmul: Callable | None = None  # see Modulation
  norm: str = 'layernorm'  # a NORMS name

  @nn.compact
  def __call__(self, x: jnp.ndarray, c: jnp.ndarray) -> jnp.ndarray:
    mod = Modulation(2 * self.hidden_size, self.adaln_matmul, name='adaLN_modulation')(c)
    shift, scale = jnp.split(mod, 2, axis=-1)
    x = modulate(NORMS[self.norm]('norm_final')(x), shift, scale)
    return _dense(self.out_dim, 'embed', 'out', jnp.float32, 'linear', _zeros)(x)


class PatchEmbed(nn.Module):
  """[N, H, W, C] -> [N, (H/p)*(W/p), D] tokens, row-major over patches."""
  patch_size: int
  hidden_size: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
    p = self.patch_size
    x = nn.Conv(self.hidden_size, (p, p), strides=(p, p), padding='VALID', dtype=self.dtype,
                param_dtype=jnp.float32, name='proj',
                kernel_init=_part(_patch_init, (None, None, None, 'embed')),
                bias_init=_part(_zeros, ('embed',)))(x)
    return x.reshape(x.shape[0], -1, self.hidden_size)


# Remat policies by name: what each block keeps from its forward pass for the backward pass.
#   'none'  keep everything (no rematerialisation).
#   'full'  keep only the block's inputs and recompute the whole block
#           (= jax.checkpoint_policies.nothing_saveable).
#   'dots_saveable'  keep every matmul output, attention's [N, heads, T, T] logits included;
#           recompute the elementwise work.
#   'dots_with_no_batch_dims_saveable'  keep the token matmuls' outputs (qkv, proj, fc1, fc2:
#           no batch dimension in the dot), recompute attention and the elementwise work.
REMAT_POLICIES = {
    'none': None,
    'full': jax.checkpoint_policies.nothing_saveable,
    'dots_saveable': jax.checkpoint_policies.dots_saveable,
    'dots_with_no_batch_dims_saveable': jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


def remat_policy(remat: bool | str) -> Callable | None:
  """A `DiT.remat` value -> jax.checkpoint policy, or None for no remat; ValueError if unknown."""
  if isinstance(remat, (bool, np.bool_)):
    remat = 'full' if remat else 'none'
  if remat not in REMAT_POLICIES:
    raise ValueError(f'remat={remat!r} is not a remat policy; choose one of: '
                     + ', '.join(REMAT_POLICIES) + ' (or True/False for full/none)')
  return REMAT_POLICIES[remat]


def _scan_body(block: nn.Module, h: jnp.ndarray, c: jnp.ndarray) -> tuple[jnp.ndarray, None]:
  return block(h, c), None


class Projector(nn.Module):
  """REPA's build_mlp: Linear(D, hidden), SiLU, Linear(hidden, hidden), SiLU, Linear(hidden,
  out) per token (matmuls in `dtype`, output float32)."""
  hidden: int
  features: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
    x = nn.silu(_dense(self.hidden, 'embed', 'mlp', self.dtype, 'fc1')(x.astype(self.dtype)))
    x = nn.silu(_dense(self.hidden, 'mlp', 'mlp', self.dtype, 'fc2')(x))
    return _dense(self.features, 'mlp', None, self.dtype, 'fc3')(x).astype(jnp.float32)


class DiT(nn.Module):
  """Diffusion transformer with adaLN-Zero conditioning; see the module docstring for layouts."""
  input_size: int = 32
  patch_size: int = 2
  in_channels: int = 4
  hidden_size: int = 1152
  depth: int = 28
  num_heads: int = 16
  mlp_ratio: float = 4.0
  class_dropout_prob: float = 0.1
  num_classes: int = 1000
  learn_sigma: bool = True
  # Compute dtype of the token matmuls (patch embed, qkv, proj, fc1, fc2) and attention; the
  # conditioning path, LayerNorms, residual stream and final layer stay float32, and params are
  # always float32.
  dtype: Any = jnp.float32
  # dit_jax.attention.IMPLEMENTATIONS: None/'xla', 'cudnn', 'auto', 'splash', 'splash_interpret'.
  attention_impl: str | None = None
  # Rematerialisation of each block in the backward pass: a REMAT_POLICIES name, or a bool
  # (True = 'full', False = 'none').
  remat: bool | str = 'none'
  # nn.scan over the blocks: one stacked 'blocks' subtree with a leading [depth] axis (logical
  # name 'layers') instead of blocks_0 ... blocks_{depth-1}; dit_jax.convert.stack_blocks and
  # unstack_blocks convert between the two layouts.
  scan_layers: bool = False
  # How the adaLN modulations are computed from their parameters (`Modulation`); None: as a
  # plain Linear. Set by the explicit data-parallel step only (dit_jax.step.explicit_grads).
  adaln_matmul: Callable | None = None
  # The block's parts by name (NORMS, MLPS, POS_EMBEDDINGS, ATTENTIONS); the defaults are the
  # release's. A checkpoint whose meta predates a field reads it as its default
  # (`from_architecture`).
  norm: str = 'layernorm'
  mlp: str = 'gelu'
  pos_embedding: str = 'sincos'
  attention: str = 'mha'
  # LightningDiT's options (off in the release): q_norm/k_norm over head_dim, 2-D rotary
  # position embedding on q and k (beside the sin-cos table, which is still added), and
  # adaLN without shifts (4 modulations per block instead of 6).
  qk_norm: bool = False
  rope: bool = False
  adaln_shift: bool = True
  # A second time input h (MeanFlow's interval length t - r): its own TimestepEmbedder
  # 'h_embedder', summed into the conditioning (c = t_emb + h_emb + y_emb).
  h_embedder: bool = False
  # REPA's projector (dit_jax.repa): an MLP D -> projector_hidden -> projector_hidden ->
  # projector_dim (SiLU between) on the hidden states after block projector_depth (1-based,
  # REPA's encoder_depth), trained to align them with a frozen encoder's patch features;
  # projector_dim 0: none. Only `project=True` runs it; sampling and the release formats leave
  # it out (`without_projector`).
  projector_dim: int = 0
  projector_hidden: int = 2048
  projector_depth: int = 0

  @property
  def out_channels(self) -> int:
    return self.in_channels * 2 if self.learn_sigma else self.in_channels

  @property
  def grid_size(self) -> int:
    return self.input_size // self.patch_size

  def validate(self) -> None:
    """Raises ValueError for inconsistent configuration fields."""
    if self.input_size % self.patch_size:
      raise ValueError(f'patch_size={self.patch_size} does not divide input_size={self.input_size}')
    if self.hidden_size % self.num_heads:
      raise ValueError(
          f'hidden_size={self.hidden_size} is not divisible by num_heads={self.num_heads}')
    if self.hidden_size % 4:
      raise ValueError(
          f'hidden_size={self.hidden_size} must be divisible by 4 for the 2-D sin-cos position table')
    if self.num_classes < 1:
      raise ValueError(f'num_classes={self.num_classes} must be >= 1')
    for field, table in (('norm', NORMS), ('mlp', MLPS), ('pos_embedding', POS_EMBEDDINGS),
                         ('attention', ATTENTIONS)):
      if getattr(self, field) not in table:
        raise ValueError(f'{field}={getattr(self, field)!r} is not one of {sorted(table)}')
    if self.rope and (self.hidden_size // self.num_heads) % 4:
      raise ValueError(f'rope: head_dim={self.hidden_size // self.num_heads} must be divisible '
                       'by 4 (half rotates with the row, half with the column, in pairs)')
    remat_policy(self.remat)
    attention.check_implementation(self.attention_impl)

  def pos_embed(self) -> np.ndarray:
    """The fixed position table [grid_size**2, hidden_size], float32 (computed in float64)."""
    return POS_EMBEDDINGS[self.pos_embedding](self.hidden_size, self.grid_size).astype(np.float32)

  def unpatchify(self, x: jnp.ndarray) -> jnp.ndarray:
    """[N, T, p*p*C] (each token ordered row-in-patch, col-in-patch, channel) -> [N, H, W, C]."""
    p, g, c = self.patch_size, self.grid_size, self.out_channels
    x = x.reshape(x.shape[0], g, g, p, p, c)
    x = jnp.einsum('nhwpqc->nhpwqc', x)
    return x.reshape(x.shape[0], g * p, g * p, c)

  @nn.compact
  def __call__(self, x: jnp.ndarray, t: jnp.ndarray, y: jnp.ndarray, train: bool = False,
               force_drop_ids: jnp.ndarray | None = None, capture: int | None = None,
               h: jnp.ndarray | None = None,
               project: bool = False) -> jnp.ndarray | tuple[jnp.ndarray, jnp.ndarray]:
    """x [N, H, W, C] float, t [N] int/float timesteps, y [N] int labels -> [N, H, W, out] float32.

    With train=True and class_dropout_prob > 0, labels are dropped to the null class using the
    'dropout' rng; force_drop_ids [N] (1 = drop) overrides that, as in the release. capture=i
    also returns the hidden states [N, T, D] float32 after blocks_i: (output, hidden). h [N]:
    the second time input of a DiT with h_embedder (required there, refused elsewhere).
    project=True (a DiT with a projector): (output, the projector's [N, T, projector_dim]
    float32 of the hidden states after block projector_depth) instead.
    """
    self.validate()
    expected = (self.input_size, self.input_size, self.in_channels)
    if x.ndim != 4 or tuple(x.shape[1:]) != expected:
      raise ValueError(f'DiT expects x of shape [N, {expected[0]}, {expected[1]}, {expected[2]}] '
                       f'(NHWC), got {tuple(x.shape)}')
    n = x.shape[0]
    if tuple(jnp.shape(t)) != (n,) or tuple(jnp.shape(y)) != (n,):
      raise ValueError(f'DiT expects t and y of shape [{n}], got t {tuple(jnp.shape(t))}, '
                       f'y {tuple(jnp.shape(y))}')
    if self.h_embedder != (h is not None):
      raise ValueError('h: this DiT has a second time input (h_embedder): pass h [N]'
                       if self.h_embedder else
                       'h: this DiT has no second time input (h_embedder=False)')
    if h is not None and tuple(jnp.shape(h)) != (n,):
      raise ValueError(f'DiT expects h of shape [{n}], got {tuple(jnp.shape(h))}')
    if project:
      if not self.projector_dim or not 1 <= self.projector_depth <= self.depth:
        raise ValueError(f'project=True needs a projector (projector_dim={self.projector_dim}) '
                         f'after a block 1 .. {self.depth} (projector_depth='
                         f'{self.projector_depth})')
      if capture is not None:
        raise ValueError('project=True captures block projector_depth itself: no capture')
      capture = self.projector_depth - 1
    if capture is not None and not 0 <= capture < self.depth:
      raise ValueError(f'capture={capture}: the blocks are 0 .. {self.depth - 1}')
    second_time, h = h, None  # h names the tokens below

    h = PatchEmbed(self.patch_size, self.hidden_size, self.dtype, name='x_embedder')(x)
    h = h.astype(jnp.float32) + jnp.asarray(self.pos_embed())[None]
    # The conditioning is [N, D]-sized: float32 whatever the matmul dtype.
    c = TimestepEmbedder(self.hidden_size, name='t_embedder')(t)
    if self.h_embedder:
      c = c + TimestepEmbedder(self.hidden_size, name='h_embedder')(second_time)
    c = c + LabelEmbedder(self.num_classes, self.hidden_size, self.class_dropout_prob,
                          name='y_embedder')(y, train, force_drop_ids)
    h, hidden = self._blocks(h, c, capture)
    if self.projector_dim and (project or self.is_initializing()):
      projector = Projector(self.projector_hidden, self.projector_dim, self.dtype,
                            name='projector')
      # init (which calls without capture) makes its parameters from the last block's states.
      hidden = projector(h if hidden is None else hidden)
    h = FinalLayer(self.hidden_size, self.patch_size**2 * self.out_channels,
                   self.adaln_matmul, self.norm, name='final_layer')(h, c)
    out = self.unpatchify(h)
    return out if capture is None else (out, hidden)

  def _block_args(self) -> tuple:
    return (self.hidden_size, self.num_heads, self.mlp_ratio, self.dtype, self.attention_impl,
            self.adaln_matmul, self.norm, self.mlp, self.attention, self.qk_norm,
            self.grid_size if self.rope else 0, self.adaln_shift)

  def _blocks(self, h: jnp.ndarray, c: jnp.ndarray,
              capture: int | None) -> tuple[jnp.ndarray, jnp.ndarray | None]:
    """The depth DiT blocks, unrolled (blocks_0 ... blocks_{depth-1}) or one scanned stack;
    and the hidden states after blocks_{capture} (None without capture)."""
    block_cls = DiTBlock
    policy = remat_policy(self.remat)
    if policy is not None:
      # Inside a scan the loop boundary already keeps XLA from merging the recomputation
      # with the forward pass, so prevent_cse is not needed (and costs fusion).
      block_cls = nn.remat(DiTBlock, policy=policy, prevent_cse=not self.scan_layers)
    hidden = None
    if not self.scan_layers:
      for i in range(self.depth):
        h = block_cls(*self._block_args(), name=f'blocks_{i}')(h, c)
        hidden = h if i == capture else hidden
      return h, hidden
    if capture is not None:
      if self.is_initializing():
        raise ValueError('capture: initialise the scanned blocks without it (init makes the '
                         'stacked parameters that the split scan reads)')
      return self._split_scan(h, c, capture, policy)
    stack = nn.scan(_scan_body, variable_axes={'params': 0}, split_rngs={'params': True},
                    in_axes=nn.broadcast, length=self.depth,
                    metadata_params={nn.PARTITION_NAME: 'layers'})
    h, _ = stack(block_cls(*self._block_args(), name='blocks'), h, c)
    return h, None

  def _split_scan(self, h: jnp.ndarray, c: jnp.ndarray, capture: int,
                  policy: Callable | None) -> tuple[jnp.ndarray, jnp.ndarray]:
    """The scanned stack as two scans, blocks 0 .. capture and the rest, over the stored
    [depth, ...] parameters (the same layout): the hidden states between them come out."""
    stacked = self.variables['params']['blocks']
    block = DiTBlock(*self._block_args(), parent=None)

    def body(x, p):
      return block.apply({'params': p}, x, c), None
    if policy is not None:
      body = jax.checkpoint(body, policy=policy, prevent_cse=False)

    def run(x, start, stop):
      if start == stop:
        return x
      return jax.lax.scan(body, x, jax.tree.map(lambda p: p[start:stop], stacked))[0]
    hidden = run(h, 0, capture + 1)
    return run(hidden, capture + 1, self.depth), hidden


_CONFIGS = {
    'XL': dict(depth=28, hidden_size=1152, num_heads=16),
    'L': dict(depth=24, hidden_size=1024, num_heads=16),
    'B': dict(depth=12, hidden_size=768, num_heads=12),
    'S': dict(depth=12, hidden_size=384, num_heads=6),
}

# 'DiT-XL/2' -> functools.partial(DiT, ...); keyword arguments override (input_size, num_classes, ...).
DiT_models: dict[str, Callable[..., DiT]] = {
    f'DiT-{size}/{p}': functools.partial(DiT, patch_size=p, **cfg)
    for size, cfg in _CONFIGS.items() for p in (2, 4, 8)
}


# LightningDiT (hustvl/LightningDiT, models/lightningdit.py): the DiT backbone at its sizes with
# its default parts: SwiGLU, RoPE and RMSNorm on, qk-norm off, adaLN shift on.
_LIGHTNING_CONFIGS = {
    'B': dict(depth=12, hidden_size=768, num_heads=12),
    'L': dict(depth=24, hidden_size=1024, num_heads=16),
    'XL': dict(depth=28, hidden_size=1152, num_heads=16),
    '1p0B': dict(depth=24, hidden_size=1536, num_heads=24),
    '1p6B': dict(depth=28, hidden_size=1792, num_heads=28),
}
LIGHTNING_PARTS = dict(norm='rmsnorm', mlp='swiglu', rope=True, qk_norm=False, adaln_shift=True)
DiT_models.update({
    f'LightningDiT-{size}/{p}': functools.partial(DiT, patch_size=p, **cfg, **LIGHTNING_PARTS)
    for size, cfg in _LIGHTNING_CONFIGS.items() for p in (1, 2) if (size, p) != ('L', 1)
})


def has_null_class(model: DiT) -> bool:
  """Whether the label table has the null class that classifier-free guidance needs."""
  return model.num_classes > 1 and model.class_dropout_prob > 0


def get_model(name: str, **kwargs: Any) -> DiT:
  """Builds a configured DiT by release name, e.g. get_model('DiT-XL/2', input_size=64)."""
  if name not in DiT_models:
    raise ValueError(f'Unknown model {name!r}; valid names: {", ".join(DiT_models)}')
  return DiT_models[name](**kwargs)


# DiT fields that choose how the forward runs, not what it computes (and flax's own): every
# other field is the architecture, recorded with each checkpoint as its meta's model_kwargs.
RUNTIME_FIELDS = ('dtype', 'attention_impl', 'remat', 'adaln_matmul', 'parent', 'name')


def architecture_fields() -> dict[str, Any]:
  """The architecture fields of DiT and their defaults."""
  return {f.name: f.default for f in dataclasses.fields(DiT) if f.name not in RUNTIME_FIELDS}


def architecture(model: DiT) -> dict[str, Any]:
  """The architecture and parameter layout of `model` (checkpoint meta's model_kwargs)."""
  return {k: getattr(model, k) for k in architecture_fields()}


def from_architecture(kwargs: Mapping[str, Any], where: str = 'model_kwargs',
                      **runtime: Any) -> DiT:
  """The DiT of recorded model_kwargs: a field they lack (a checkpoint older than the field)
  takes its default; one DiT does not have (a newer dit_jax) is an error naming it."""
  fields = architecture_fields()
  unknown = sorted(set(kwargs) - set(fields))
  if unknown:
    raise ValueError(f'{where}: unknown DiT fields {unknown} (written by a newer dit_jax?)')
  return DiT(**{**fields, **kwargs}, **runtime)


# Modules whose parameters the forward uses in `DiT.dtype` (the token matmuls: patch embedding,
# qkv, attention output, MLP); every other parameter is used in float32.
TOKEN_MATMUL_MODULES = ('x_embedder', 'attn', 'mlp', 'projector')


def compute_dtypes(model: DiT, params: Any) -> Any:
  """The dtype the forward computes with each parameter in (a tree shaped like `params`).

  Casting a parameter to it before the forward changes nothing (the layers cast to it anyway),
  so parameters can be gathered across devices in that dtype: bfloat16 for the token-matmul
  kernels under dtype=bfloat16, float32 for the conditioning path and the final layer.
  """
  def one(path, _):
    names = {getattr(k, 'key', getattr(k, 'name', None)) for k in path}
    return jnp.dtype(model.dtype) if names & set(TOKEN_MATMUL_MODULES) else jnp.dtype(jnp.float32)
  return jax.tree_util.tree_map_with_path(one, params)


def without_projector(model: DiT, params: Any) -> tuple[DiT, Any]:
  """(model, params) without REPA's projector: what sampling and the release formats use."""
  if not model.projector_dim and 'projector' not in params:
    return model, params
  return (model.clone(projector_dim=0, projector_depth=0),
          {k: v for k, v in params.items() if k != 'projector'})


def init_kwargs(model: DiT) -> dict:
  """The extra inputs `model.init` needs: h for a DiT with h_embedder."""
  return {'h': jnp.zeros((1,), jnp.float32)} if model.h_embedder else {}


def param_shapes(model: DiT) -> dict:
  """Abstract, unboxed 'params' tree (ShapeDtypeStructs) of `model`; allocates and computes nothing."""
  model.validate()
  x = jnp.zeros((1, model.input_size, model.input_size, model.in_channels), jnp.float32)
  t = jnp.zeros((1,), jnp.int32)
  shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), x, t, t, **init_kwargs(model)))
  return nn.meta.unbox(shapes)['params']

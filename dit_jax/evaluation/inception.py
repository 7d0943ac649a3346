"""The FID Inception-v3 in Flax: the 2015-12-05 TensorFlow graph behind ADM's evaluator.

This is not torchvision's Inception-v3. The graph that ADM (guided-diffusion `evaluations/`),
TTUR, pytorch-fid and torch-fidelity use for FID differs from it in ways that move FID:
  * input: any size, resized to 299x299 by TF1 `ResizeBilinear(align_corners=False)`, which samples
    source pixel `i * in / out` (no half-pixel centres), then (x - 128) / 128;
  * average pools inside the A, C and first E blocks exclude the zero padding from the mean;
  * the last E block (Mixed_7c, `mixed_10` in the graph) max-pools where the paper average-pools;
  * 1008 classes (1000 ImageNet + 8 unused), batch norm epsilon 1e-3, convs without bias.
Module names follow torch-fidelity's `FeatureExtractorInceptionV3` (= pytorch-fid's FID model), so
its state dict converts name by name (see `convert.py`). The graph's `mixed_N` is the (N+1)-th
Mixed block here: `mixed_6` = Mixed_6d, and its `mixed_6/conv` (the ReLU output of the 1x1
branch, 17x17x192) gives ADM's sFID features.
"""
from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

INPUT_SIZE = 299
NUM_CLASSES = 1008
POOL_DIM = 2048
SPATIAL_CHANNELS = 7  # ADM keeps mixed_6/conv[..., :7]
SPATIAL_DIM = 17 * 17 * SPATIAL_CHANNELS

_Padding = tuple[tuple[int, int], tuple[int, int]]


def _tf1_axis_weights(in_size: int, out_size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """Source indices (lo, hi) and fractions of TF1 legacy bilinear resize along one axis.

  TF1 with align_corners=False maps output i to source i * in / out, the scale and product in
  float32 as the TF kernel computes them, so the fractions match the graph bit for bit.
  """
  scale = np.float32(in_size / out_size)
  src = np.arange(out_size, dtype=np.float32) * scale
  lo = np.floor(src).astype(np.int32)
  hi = np.minimum(lo + 1, in_size - 1)
  return lo, hi, (src - lo.astype(np.float32)).astype(np.float32)


def resize_bilinear_tf1(images: jax.Array, size: int = INPUT_SIZE) -> jax.Array:
  """TF1 `ResizeBilinear(align_corners=False, half_pixel_centers=False)` of NHWC float images.

  Args:
    images: float [N, H, W, C].
    size: output height and width.
  Returns:
    float [N, size, size, C], interpolated as top + (bottom - top) * dy with
    top = tl + (tr - tl) * dx (the TF kernel's order of operations).
  """
  _, h, w, _ = images.shape
  ylo, yhi, dy = _tf1_axis_weights(h, size)
  xlo, xhi, dx = _tf1_axis_weights(w, size)
  rows_lo, rows_hi = jnp.take(images, ylo, axis=1), jnp.take(images, yhi, axis=1)
  dx = jnp.asarray(dx)[None, None, :, None]
  top = rows_lo[:, :, xlo] + (rows_lo[:, :, xhi] - rows_lo[:, :, xlo]) * dx
  bottom = rows_hi[:, :, xlo] + (rows_hi[:, :, xhi] - rows_hi[:, :, xlo]) * dx
  return top + (bottom - top) * jnp.asarray(dy)[None, :, None, None]


def _avg_pool_same(x: jax.Array) -> jax.Array:
  # TF's AvgPool with SAME padding divides by the number of real pixels in the window.
  return nn.avg_pool(x, (3, 3), (1, 1), padding=((1, 1), (1, 1)), count_include_pad=False)


def _max_pool(x: jax.Array, stride: int, pad: int = 0) -> jax.Array:
  return nn.max_pool(x, (3, 3), (stride, stride), padding=((pad, pad), (pad, pad)))


class ConvBN(nn.Module):
  """Conv (no bias) -> batch norm with frozen statistics (eps 1e-3) -> ReLU, NHWC."""
  features: int
  kernel: tuple[int, int] = (1, 1)
  stride: int = 1
  padding: tuple[int, int] = (0, 0)
  precision: jax.lax.Precision = jax.lax.Precision.HIGHEST

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    pads: _Padding = ((self.padding[0],) * 2, (self.padding[1],) * 2)
    x = nn.Conv(self.features, self.kernel, (self.stride, self.stride), padding=pads,
                use_bias=False, precision=self.precision, name="conv")(x)
    x = nn.BatchNorm(use_running_average=True, epsilon=1e-3, name="bn")(x)
    return nn.relu(x)


class InceptionA(nn.Module):
  """35x35 block (Mixed_5b/5c/5d; graph `mixed`, `mixed_1`, `mixed_2`)."""
  pool_features: int
  precision: jax.lax.Precision = jax.lax.Precision.HIGHEST

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    cb = lambda *a, **k: ConvBN(*a, precision=self.precision, **k)
    b1 = cb(64, name="branch1x1")(x)
    b5 = cb(48, name="branch5x5_1")(x)
    b5 = cb(64, (5, 5), padding=(2, 2), name="branch5x5_2")(b5)
    b3 = cb(64, name="branch3x3dbl_1")(x)
    b3 = cb(96, (3, 3), padding=(1, 1), name="branch3x3dbl_2")(b3)
    b3 = cb(96, (3, 3), padding=(1, 1), name="branch3x3dbl_3")(b3)
    bp = cb(self.pool_features, name="branch_pool")(_avg_pool_same(x))
    return jnp.concatenate([b1, b5, b3, bp], axis=-1)


class InceptionB(nn.Module):
  """35 -> 17 reduction (Mixed_6a; graph `mixed_3`)."""
  precision: jax.lax.Precision = jax.lax.Precision.HIGHEST

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    cb = lambda *a, **k: ConvBN(*a, precision=self.precision, **k)
    b3 = cb(384, (3, 3), stride=2, name="branch3x3")(x)
    bd = cb(64, name="branch3x3dbl_1")(x)
    bd = cb(96, (3, 3), padding=(1, 1), name="branch3x3dbl_2")(bd)
    bd = cb(96, (3, 3), stride=2, name="branch3x3dbl_3")(bd)
    return jnp.concatenate([b3, bd, _max_pool(x, 2)], axis=-1)


class InceptionC(nn.Module):
  """17x17 block with factorized 7x7 convs (Mixed_6b..6e; graph `mixed_4`..`mixed_7`).

  Returns (block output, the 1x1 branch): the 1x1 branch of Mixed_6d is ADM's `mixed_6/conv`.
  """
  channels_7x7: int
  precision: jax.lax.Precision = jax.lax.Precision.HIGHEST

  @nn.compact
  def __call__(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
    cb = lambda *a, **k: ConvBN(*a, precision=self.precision, **k)
    c7 = self.channels_7x7
    b1 = cb(192, name="branch1x1")(x)
    b7 = cb(c7, name="branch7x7_1")(x)
    b7 = cb(c7, (1, 7), padding=(0, 3), name="branch7x7_2")(b7)
    b7 = cb(192, (7, 1), padding=(3, 0), name="branch7x7_3")(b7)
    bd = cb(c7, name="branch7x7dbl_1")(x)
    bd = cb(c7, (7, 1), padding=(3, 0), name="branch7x7dbl_2")(bd)
    bd = cb(c7, (1, 7), padding=(0, 3), name="branch7x7dbl_3")(bd)
    bd = cb(c7, (7, 1), padding=(3, 0), name="branch7x7dbl_4")(bd)
    bd = cb(192, (1, 7), padding=(0, 3), name="branch7x7dbl_5")(bd)
    bp = cb(192, name="branch_pool")(_avg_pool_same(x))
    return jnp.concatenate([b1, b7, bd, bp], axis=-1), b1


class InceptionD(nn.Module):
  """17 -> 8 reduction (Mixed_7a; graph `mixed_8`)."""
  precision: jax.lax.Precision = jax.lax.Precision.HIGHEST

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    cb = lambda *a, **k: ConvBN(*a, precision=self.precision, **k)
    b3 = cb(192, name="branch3x3_1")(x)
    b3 = cb(320, (3, 3), stride=2, name="branch3x3_2")(b3)
    b7 = cb(192, name="branch7x7x3_1")(x)
    b7 = cb(192, (1, 7), padding=(0, 3), name="branch7x7x3_2")(b7)
    b7 = cb(192, (7, 1), padding=(3, 0), name="branch7x7x3_3")(b7)
    b7 = cb(192, (3, 3), stride=2, name="branch7x7x3_4")(b7)
    return jnp.concatenate([b3, b7, _max_pool(x, 2)], axis=-1)


class InceptionE(nn.Module):
  """8x8 block (Mixed_7b with an average pool, Mixed_7c with the graph's max pool)."""
  pool: str  # "avg" or "max"
  precision: jax.lax.Precision = jax.lax.Precision.HIGHEST

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    cb = lambda *a, **k: ConvBN(*a, precision=self.precision, **k)
    b1 = cb(320, name="branch1x1")(x)
    b3 = cb(384, name="branch3x3_1")(x)
    b3 = jnp.concatenate([cb(384, (1, 3), padding=(0, 1), name="branch3x3_2a")(b3),
                          cb(384, (3, 1), padding=(1, 0), name="branch3x3_2b")(b3)], axis=-1)
    bd = cb(448, name="branch3x3dbl_1")(x)
    bd = cb(384, (3, 3), padding=(1, 1), name="branch3x3dbl_2")(bd)
    bd = jnp.concatenate([cb(384, (1, 3), padding=(0, 1), name="branch3x3dbl_3a")(bd),
                          cb(384, (3, 1), padding=(1, 0), name="branch3x3dbl_3b")(bd)], axis=-1)
    pooled = _avg_pool_same(x) if self.pool == "avg" else _max_pool(x, 1, pad=1)
    bp = cb(192, name="branch_pool")(pooled)
    return jnp.concatenate([b1, b3, bd, bp], axis=-1)


class FIDInceptionV3(nn.Module):
  """The FID Inception-v3. Call on images in [0, 255], NHWC, any height and width.

  Variables: {'params': conv kernels, BN scale/bias, fc; 'batch_stats': BN mean/var}.
  `precision` defaults to HIGHEST so TPUs (bf16 passes) and GPUs (TF32) keep float32 accuracy;
  FID is sensitive to feature error, and this network is a small part of an evaluation's cost.
  """
  precision: jax.lax.Precision = jax.lax.Precision.HIGHEST

  @nn.compact
  def __call__(self, images: jax.Array) -> dict[str, jax.Array]:
    """Maps images [N, H, W, 3] (uint8 or float in [0, 255]) to features.

    Returns:
      'pool': [N, 2048] the graph's pool_3 (FID, precision/recall);
      'spatial': [N, 2023] mixed_6/conv[..., :7] flattened in (h, w, c) order (sFID);
      'logits': [N, 1008] softmax/logits with bias;
      'logits_unbiased': [N, 1008] pool_3 @ W without bias, what ADM's Inception Score uses.
    """
    if images.ndim != 4 or images.shape[-1] != 3:
      raise ValueError(f"FIDInceptionV3 expects NHWC RGB images [N, H, W, 3], got {images.shape}")
    p = self.precision
    cb = lambda *a, **k: ConvBN(*a, precision=p, **k)
    x = resize_bilinear_tf1(images.astype(jnp.float32), INPUT_SIZE)
    x = (x - 128.0) / 128.0
    x = cb(32, (3, 3), stride=2, name="Conv2d_1a_3x3")(x)
    x = cb(32, (3, 3), name="Conv2d_2a_3x3")(x)
    x = cb(64, (3, 3), padding=(1, 1), name="Conv2d_2b_3x3")(x)
    x = _max_pool(x, 2)
    x = cb(80, name="Conv2d_3b_1x1")(x)
    x = cb(192, (3, 3), name="Conv2d_4a_3x3")(x)
    x = _max_pool(x, 2)
    x = InceptionA(32, p, name="Mixed_5b")(x)
    x = InceptionA(64, p, name="Mixed_5c")(x)
    x = InceptionA(64, p, name="Mixed_5d")(x)
    x = InceptionB(p, name="Mixed_6a")(x)
    x, _ = InceptionC(128, p, name="Mixed_6b")(x)
    x, _ = InceptionC(160, p, name="Mixed_6c")(x)
    x, mixed_6_conv = InceptionC(160, p, name="Mixed_6d")(x)
    x, _ = InceptionC(192, p, name="Mixed_6e")(x)
    x = InceptionD(p, name="Mixed_7a")(x)
    x = InceptionE("avg", p, name="Mixed_7b")(x)
    x = InceptionE("max", p, name="Mixed_7c")(x)
    pool = jnp.mean(x, axis=(1, 2))
    fc = nn.Dense(NUM_CLASSES, precision=p, name="fc")
    logits = fc(pool)
    unbiased = jnp.dot(pool, fc.variables["params"]["kernel"], precision=p)
    spatial = mixed_6_conv[..., :SPATIAL_CHANNELS].reshape(images.shape[0], -1)
    return {"pool": pool, "spatial": spatial, "logits": logits, "logits_unbiased": unbiased}


def abstract_variables(image_shape: Sequence[int] = (1, INPUT_SIZE, INPUT_SIZE, 3)):
  """Shapes and dtypes of the model's variables, without allocating them."""
  model = FIDInceptionV3()
  return jax.eval_shape(model.init, jax.random.key(0), jnp.zeros(image_shape, jnp.float32))

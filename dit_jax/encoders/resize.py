"""torch's bicubic resize (`torch.nn.functional.interpolate(mode='bicubic')`) in JAX.

DINOv2 resizes its position table, and REPA its images, with torch's bicubic. That is not
`jax.image.resize(method='bicubic')`: torch's kernel is Keys' cubic with a = -0.75 (JAX's is
a = -0.5), it clamps the source index at the border instead of renormalising the weights, and
given a `scale_factor` it places the source samples with that factor rather than with
in/out sizes. With `antialias=True` torch follows PIL instead: the a = -0.5 kernel, widened by
the downsampling factor, its weights truncated at the border and renormalised.

Each axis is resized by a matrix built here in float64 from the sizes alone (static shapes),
so the resize is two small matmuls in the step (cheap on a TPU's MXU), exact to float32 rounding
against torch for align_corners=False.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np


def _cubic(x: np.ndarray, a: float) -> np.ndarray:
  x = np.abs(x)
  return np.where(x <= 1, ((a + 2) * x - (a + 3)) * x * x + 1,
                  np.where(x < 2, (((x - 5) * x + 8) * x - 4) * a, 0.0))


@functools.lru_cache(maxsize=64)
def matrix(in_size: int, out_size: int, scale: float | None = None,
           antialias: bool = False) -> np.ndarray:
  """[out_size, in_size] float32 weights of torch's bicubic along one axis (align_corners=False).

  scale: torch's `scale_factor` for this axis when it was given (the source step is 1/scale),
    else None (in_size/out_size, as with `size=`).
  """
  if in_size < 1 or out_size < 1:
    raise ValueError(f"resize: sizes must be positive, got {in_size} -> {out_size}")
  w = np.zeros((out_size, in_size), np.float64)
  f32 = np.float32
  if antialias:
    # PIL's filter, as torch's _upsample_bicubic2d_aa applies it: a = -0.5, widened by the
    # downsampling factor, taps cut at the border and renormalised; positions in float32.
    step32 = f32(1.0 / scale) if scale else f32(in_size) / f32(out_size)
    wide = max(step32, f32(1.0))
    support = f32(2.0) * wide
    for i in range(out_size):
      center = step32 * (f32(i) + f32(0.5))
      lo = max(int(center - support + f32(0.5)), 0)
      hi = min(int(center + support + f32(0.5)), in_size)
      pos = (np.arange(lo, hi, dtype=np.float32) - center + f32(0.5)) / wide
      taps = _cubic(pos.astype(np.float64), -0.5)
      w[i, lo:hi] = taps / taps.sum()
    return w.astype(np.float32)
  # torch computes the source position in float32 (its step too: in/out, or 1/scale from
  # double); doing the same here keeps the weights equal to float32 rounding.
  step32 = f32(1.0 / scale) if scale else f32(in_size) / f32(out_size)
  for i in range(out_size):
    src = step32 * (f32(i) + f32(0.5)) - f32(0.5)  # not clamped at 0: torch's cubic index
    base = math.floor(src)
    t = float(src - f32(base))
    for k in range(-1, 3):
      j = min(max(base + k, 0), in_size - 1)  # border taps repeat the edge sample
      w[i, j] += _cubic(np.array(t - k), -0.75)
  return w.astype(np.float32)


def output_size(in_size: int, scale: float) -> int:
  """torch's output size for a `scale_factor` (floor of in * scale)."""
  return int(math.floor(in_size * scale))


def resize(x: jax.Array, size: tuple[int, int] | None = None,
           scale: tuple[float, float] | None = None, antialias: bool = False) -> jax.Array:
  """x [..., H, W, C] (NHWC) resized as torch's bicubic resizes the NCHW tensor.

  Give `size` (out H, W) or `scale` (torch's scale_factor for H and W: the output is
  floor(H * sh) x floor(W * sw) and the source samples sit 1/scale apart). Computed in
  float32 at the highest matmul precision; returns float32.
  """
  if (size is None) == (scale is None):
    raise ValueError("resize: give exactly one of size and scale")
  h, w = x.shape[-3], x.shape[-2]
  if scale is not None:
    oh, ow = output_size(h, scale[0]), output_size(w, scale[1])
    mh, mw = matrix(h, oh, float(scale[0]), antialias), matrix(w, ow, float(scale[1]), antialias)
  else:
    oh, ow = int(size[0]), int(size[1])
    if (oh, ow) == (h, w) and not antialias:
      return x.astype(jnp.float32)  # torch's same-size bicubic is the identity
    mh, mw = matrix(h, oh, None, antialias), matrix(w, ow, None, antialias)
  hi = jax.lax.Precision.HIGHEST
  y = jnp.einsum("oh,...hwc->...owc", jnp.asarray(mh), x.astype(jnp.float32), precision=hi)
  return jnp.einsum("pw,...owc->...opc", jnp.asarray(mw), y, precision=hi)

"""Classifier-free guidance for the samplers, as the released DiT does it.

The release runs the model on a doubled batch [cond; uncond]: the same x_t in
both halves, labels [y; null]. The guided eps = uncond + s * (cond - uncond) is
written into both halves, and the caller keeps the first half of the samples.
The release guides only the first 3 output channels (a quirk kept for exact
FID reproduction: latent channel 3 and the variance channels are not guided);
`guided_channels=None` guides all C eps channels, the standard form.
"""
from typing import Callable, Optional, Sequence, Union

import jax
import jax.numpy as jnp

from dit_jax.diffusion.gaussian_diffusion import GaussianDiffusion
from dit_jax.diffusion.gaussian_diffusion import ModelFn
from dit_jax.diffusion.gaussian_diffusion import Progress

# Number of output channels the released forward_with_cfg guides.
RELEASE_GUIDED_CHANNELS = 3


def apply_cfg(model_out: jax.Array, cfg_scale: Union[float, jax.Array],
              guided_channels: int) -> jax.Array:
  """Combines a doubled-batch output [cond; uncond] as forward_with_cfg does.

  Args:
    model_out: [2N, H, W, K] model output on [cond; uncond] inputs.
    cfg_scale: guidance scale s (may be traced); 1 is no guidance.
    guided_channels: channels [0, guided_channels) are guided; the release uses
      3; pass C (the eps channels, e.g. 4) for guidance on all eps channels.

  Returns:
    [2N, H, W, K]: guided channels equal uncond + s (cond - uncond) in both
    halves; other channels unchanged (each half keeps its own).
  """
  if not 0 < guided_channels <= model_out.shape[-1]:
    raise ValueError(f"guided_channels: {guided_channels} is outside [1, "
                     f"{model_out.shape[-1]}] for output shape {model_out.shape}.")
  if model_out.shape[0] % 2:
    raise ValueError(f"model_out: batch {model_out.shape[0]} is not [cond; uncond] (odd).")
  guided, rest = jnp.split(model_out, [guided_channels], axis=-1)
  cond, uncond = jnp.split(guided, 2, axis=0)
  half = uncond + cfg_scale * (cond - uncond)
  return jnp.concatenate([jnp.concatenate([half, half], axis=0), rest], axis=-1)


def cfg_model_fn(model_fn_xty: Callable[[jax.Array, jax.Array, jax.Array], jax.Array],
                 y: jax.Array, null_label: int, cfg_scale: Union[float, jax.Array],
                 guided_channels: Optional[int] = RELEASE_GUIDED_CHANNELS) -> ModelFn:
  """Builds a guided doubled-batch model_fn from a class-conditional model.

  Args:
    model_fn_xty: f(x [M, H, W, C], t int32 [M], y int32 [M]) -> [M, H, W, K].
    y: int32 [N] class labels of the wanted samples.
    null_label: the "no class" label (num_classes for DiT).
    cfg_scale: guidance scale (may be traced).
    guided_channels: see `apply_cfg`; None guides all C eps channels (C taken
      from x), the standard form.

  Returns:
    model_fn(x [2N, ...], t [2N]) -> [2N, ...], for `sample_with_cfg`. Like the
    release, it evaluates the model on [x[:N]; x[:N]] with labels [y; null].
  """
  y = jnp.asarray(y, jnp.int32)
  labels = jnp.concatenate([y, jnp.full_like(y, null_label)])

  def model_fn(x, t):
    half = x[: x.shape[0] // 2]
    out = model_fn_xty(jnp.concatenate([half, half], axis=0), t, labels)
    channels = x.shape[-1] if guided_channels is None else guided_channels
    return apply_cfg(out, cfg_scale, channels)
  return model_fn


def kept_half_model_fn(guided_model_fn: ModelFn) -> ModelFn:
  """model_fn on the N kept samples from a guided model_fn on the doubled batch.

  f(x [N, ...], t [N]) = guided_model_fn([x; x], [t; t])[:N]; use it to drive
  single steps (p_sample / ddim_sample) the way `sample_with_cfg` does.
  """
  def model_fn(x, t):
    n = x.shape[0]
    out = guided_model_fn(jnp.concatenate([x, x], axis=0), jnp.concatenate([t, t], axis=0))
    return out[:n]
  return model_fn


def sample_with_cfg(diffusion: GaussianDiffusion, guided_model_fn: ModelFn,
                    shape: Sequence[int], key: jax.Array,
                    noise: Optional[jax.Array] = None, sampler: str = "ddpm",
                    eta: Union[float, jax.Array] = 0.0, progress: Progress = False,
                    progress_every: Optional[int] = None) -> jax.Array:
  """Guided sampling with a model_fn that takes the doubled batch [cond; uncond].

  The loop carries only the N kept samples; each step feeds
  guided_model_fn([x; x], [t; t]) and keeps the first half of its output, so
  the noise is identical in both halves by construction and the cost per step
  is one model call on 2N images, as in the release. Suitable for
  `model_fn = lambda x, t: model.apply(params, x, t, y2, s, method=DiT.forward_with_cfg)`
  with y2 = [y; null] of length 2N, or for `cfg_model_fn(...)`.

  Args:
    diffusion: the (respaced) process.
    guided_model_fn: f(x [2N, H, W, C], t [2N]) -> [2N, H, W, C or 2C].
    shape: [N, H, W, C] of the wanted samples.
    key, noise, eta, progress, progress_every: as in p_sample_loop / ddim_sample_loop.
    sampler: "ddpm" (ancestral) or "ddim".

  Returns:
    float32 [N, H, W, C] samples.
  """
  model_fn = kept_half_model_fn(guided_model_fn)
  if sampler == "ddpm":
    return diffusion.p_sample_loop(model_fn, shape, key, noise=noise, progress=progress,
                                   progress_every=progress_every)
  if sampler == "ddim":
    return diffusion.ddim_sample_loop(model_fn, shape, key, noise=noise, eta=eta,
                                      progress=progress, progress_every=progress_every)
  raise ValueError(f"sampler: got {sampler!r}, expected 'ddpm' or 'ddim'.")

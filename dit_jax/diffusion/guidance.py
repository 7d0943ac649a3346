"""Classifier-free guidance for the samplers, as the released DiT does it.

The release runs the model on a doubled batch [cond; uncond]: the same x_t in
both halves, labels [y; null]. The guided eps = uncond + s * (cond - uncond) is
written into both halves, and the caller keeps the first half of the samples.
The release guides only the first 3 output channels (a quirk kept for exact
FID reproduction: latent channel 3 and the variance channels are not guided);
`guided_channels=None` guides all C eps channels, the standard form.

Guidance can be limited to an interval of noise levels (Kynkaanniemi et al., 2024, "Applying
guidance in a limited interval improves sample and distribution quality"): outside
(sigma_lo, sigma_hi], sigma = sqrt((1 - abar_t) / abar_t), the scale is 1 and only the
conditional half is evaluated (half the cost of those steps). It works for every sampler,
since all of them call the model with the original timestep t.
"""
from typing import Callable, Optional, Sequence, Tuple, Union

import jax
import jax.numpy as jnp
import numpy as np

from dit_jax.diffusion.dpm_solver import noise_levels
from dit_jax.diffusion.gaussian_diffusion import GaussianDiffusion
from dit_jax.diffusion.gaussian_diffusion import ModelFn
from dit_jax.diffusion.gaussian_diffusion import Progress
from dit_jax.diffusion.gaussian_diffusion import get_named_beta_schedule
from dit_jax.diffusion.samplers import Sampler

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


def _linear_alphas_cumprod() -> np.ndarray:
  return np.cumprod(1.0 - get_named_beta_schedule("linear", 1000))


def check_guidance_interval(interval: Optional[Sequence[float]]) -> Optional[Tuple[float, float]]:
  """(lo, hi) as floats, or None when the interval is absent or covers every noise level."""
  if interval is None or len(interval) == 0:
    return None
  if len(interval) != 2 or not 0 <= float(interval[0]) < float(interval[1]):
    raise ValueError(f"guidance_interval: expected (sigma_lo, sigma_hi) with 0 <= lo < hi, "
                     f"got {interval!r}.")
  lo, hi = float(interval[0]), float(interval[1])
  return None if lo == 0 and hi == float("inf") else (lo, hi)


def guidance_active(t: jax.Array, interval: Sequence[float],
                    alphas_cumprod: Optional[np.ndarray] = None) -> jax.Array:
  """Whether original timesteps t (int, any shape) lie in the interval: lo < sigma_t <= hi.

  alphas_cumprod: float64 [T] of the training process (default: 1000-step linear).
  """
  lo, hi = interval
  if alphas_cumprod is None:
    alphas_cumprod = _linear_alphas_cumprod()
  sigma = noise_levels(alphas_cumprod)
  # Decided on the host in float64 per timestep, so float32 rounding cannot move a boundary.
  table = jnp.asarray((sigma > lo) & (sigma <= hi))
  return table[jnp.asarray(t)]


def limit_guidance(guided_model_fn: ModelFn, cond_model_fn: ModelFn,
                   interval: Optional[Sequence[float]],
                   alphas_cumprod: Optional[np.ndarray] = None) -> ModelFn:
  """Guidance only inside a noise-level interval; elsewhere the conditional model alone.

  Args:
    guided_model_fn: f(x [2N, ...], t [2N]) -> [2N, ...] on the doubled batch (as for
      sample_with_cfg).
    cond_model_fn: g(x [N, ...], t [N]) -> [N, ...], the conditional model (scale 1).
    interval: (sigma_lo, sigma_hi): guide where lo < sigma_t <= hi; None (or (0, inf)):
      always guide, returning guided_model_fn unchanged.
    alphas_cumprod: float64 [T] of the training process (default: 1000-step linear).

  Returns:
    f(x [2N, ...], t [2N]) -> [2N, ...]; outside the interval both halves hold g(x[:N], t[:N]),
    computed alone (lax.cond on t[0]: all samples of a sampling step share t).
  """
  interval = check_guidance_interval(interval)
  if interval is None:
    return guided_model_fn

  def model_fn(x, t):
    n = x.shape[0] // 2

    def unguided(x, t):
      out = cond_model_fn(x[:n], t[:n])
      return jnp.concatenate([out, out], axis=0)
    return jax.lax.cond(guidance_active(t[0], interval, alphas_cumprod),
                        guided_model_fn, unguided, x, t)
  return model_fn


def cfg_model_fn(model_fn_xty: Callable[[jax.Array, jax.Array, jax.Array], jax.Array],
                 y: jax.Array, null_label: int, cfg_scale: Union[float, jax.Array],
                 guided_channels: Optional[int] = RELEASE_GUIDED_CHANNELS,
                 guidance_interval: Optional[Sequence[float]] = None,
                 alphas_cumprod: Optional[np.ndarray] = None) -> ModelFn:
  """Builds a guided doubled-batch model_fn from a class-conditional model.

  Args:
    model_fn_xty: f(x [M, H, W, C], t int32 [M], y int32 [M]) -> [M, H, W, K].
    y: int32 [N] class labels of the wanted samples.
    null_label: the "no class" label (num_classes for DiT).
    cfg_scale: guidance scale (may be traced).
    guided_channels: see `apply_cfg`; None guides all C eps channels (C taken
      from x), the standard form.
    guidance_interval, alphas_cumprod: see `limit_guidance`.

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
  cond_fn = lambda x, t: model_fn_xty(x, t, y)
  return limit_guidance(model_fn, cond_fn, guidance_interval, alphas_cumprod)


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


def sample_with_cfg(diffusion: Union[GaussianDiffusion, Sampler], guided_model_fn: ModelFn,
                    shape: Sequence[int], key: jax.Array,
                    noise: Optional[jax.Array] = None, sampler: Optional[str] = None,
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
    diffusion: the (respaced) process, or a Sampler (samplers.create_sampler: any of
      ddpm, ddim, dpm++2m, dpm++3m, dpm++2m-sde, with its steps).
    guided_model_fn: f(x [2N, H, W, C], t [2N]) -> [2N, H, W, C or 2C].
    shape: [N, H, W, C] of the wanted samples.
    key, noise, eta, progress, progress_every: as in p_sample_loop / ddim_sample_loop.
    sampler: with a GaussianDiffusion, "ddpm" (ancestral, the default) or "ddim"; not
      used with a Sampler.

  Returns:
    float32 [N, H, W, C] samples.
  """
  model_fn = kept_half_model_fn(guided_model_fn)
  if isinstance(diffusion, Sampler):
    if sampler is not None:
      raise ValueError(f"sampler={sampler!r}: a Sampler ({diffusion.name}) is already bound.")
    return diffusion.sample(model_fn, shape, key, noise=noise, progress=progress,
                            progress_every=progress_every)
  if sampler in (None, "ddpm"):
    return diffusion.p_sample_loop(model_fn, shape, key, noise=noise, progress=progress,
                                   progress_every=progress_every)
  if sampler == "ddim":
    return diffusion.ddim_sample_loop(model_fn, shape, key, noise=noise, eta=eta,
                                      progress=progress, progress_every=progress_every)
  raise ValueError(f"sampler: got {sampler!r}, expected 'ddpm' or 'ddim'.")

"""ADM's side of classifier-free guidance: its noise-level interval, and sampling with a
doubled-batch model. The CFG itself (the release's doubled batch, 3 guided channels) and the
interval limiter are dit_jax.guidance's, shared by every objective.

A guidance interval (Kynkaanniemi et al., 2024) is given in noise levels sigma_t =
sqrt((1 - abar_t) / abar_t): guide where lo < sigma_t <= hi. It works for every sampler, since
all of them call the model with the original timestep t.
"""
from typing import Optional, Sequence, Union

import jax
import jax.numpy as jnp
import numpy as np

from dit_jax.diffusion.dpm_solver import noise_levels
from dit_jax.diffusion.gaussian_diffusion import GaussianDiffusion
from dit_jax.diffusion.gaussian_diffusion import Progress
from dit_jax.diffusion.gaussian_diffusion import get_named_beta_schedule
from dit_jax.diffusion.samplers import Sampler
from dit_jax.guidance import ModelFn
from dit_jax.guidance import kept_half


def _linear_alphas_cumprod() -> np.ndarray:
  return np.cumprod(1.0 - get_named_beta_schedule("linear", 1000))


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
  `dit_jax.guidance.cfg_model_fn(...)`.

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
  model_fn = kept_half(guided_model_fn)
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

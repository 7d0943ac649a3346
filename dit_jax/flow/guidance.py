"""Classifier-free guidance for the flow samplers, as SiT's release does it.

SiT's forward_with_cfg is DiT's: the model runs on [x; x] with labels [y; null], the first 3
output channels are guided, uncond + s (cond - uncond), and channel 3 passes per half (the
release's quirk; guided_channels=None guides all). The doubled-batch plumbing is
dit_jax.diffusion.guidance's; what differs here is the time axis: a guidance interval is given
in flow time t in [0, 1] (0 noise, 1 data), guiding where lo <= t <= hi, and the prediction is
the first C channels of the model's output (SiT drops a learn_sigma model's other half).
"""
from __future__ import annotations

from typing import Callable, Optional, Sequence, Union

import jax
import jax.numpy as jnp

from dit_jax.diffusion.guidance import RELEASE_GUIDED_CHANNELS
from dit_jax.diffusion.guidance import cfg_model_fn as doubled_cfg_model_fn
from dit_jax.diffusion.guidance import kept_half_model_fn

ModelFn = Callable[[jax.Array, jax.Array], jax.Array]


def check_guidance_interval(interval: Optional[Sequence[float]]) -> Optional[tuple[float, float]]:
  """(lo, hi) in flow time, or None when absent or covering all of [0, 1]."""
  if interval is None or len(interval) == 0:
    return None
  if len(interval) != 2 or not 0 <= float(interval[0]) < float(interval[1]):
    raise ValueError(f"guidance_interval: expected flow times (t_lo, t_hi) with 0 <= lo < hi "
                     f"(t = 0 noise, 1 data), got {interval!r}.")
  lo, hi = float(interval[0]), float(interval[1])
  return None if lo == 0 and hi >= 1 else (lo, hi)


def limit_guidance(guided_model_fn: ModelFn, cond_model_fn: ModelFn,
                   interval: Optional[Sequence[float]]) -> ModelFn:
  """Guidance only where lo <= t <= hi; elsewhere the conditional model alone (half the cost).

  guided_model_fn: f(x [2N, ...], t [2N]) on the doubled batch; cond_model_fn: g(x [N], t [N]).
  Returns f on the doubled batch; outside the interval both halves hold g(x[:N], t[:N])
  (lax.cond on t[0]: all samples of a solver step share t).
  """
  interval = check_guidance_interval(interval)
  if interval is None:
    return guided_model_fn
  lo, hi = interval

  def model_fn(x, t):
    n = x.shape[0] // 2

    def unguided(x, t):
      out = cond_model_fn(x[:n], t[:n])
      return jnp.concatenate([out, out], axis=0)
    return jax.lax.cond((t[0] >= lo) & (t[0] <= hi), guided_model_fn, unguided, x, t)
  return model_fn


def first_channels(model_fn: ModelFn) -> ModelFn:
  """The prediction of x's C channels from a model with more (a learn_sigma DiT: 2C)."""
  return lambda x, t: model_fn(x, t)[..., :x.shape[-1]]


def guided_prediction(guided_model_fn: ModelFn, cond_model_fn: ModelFn,
                      guidance_interval: Optional[Sequence[float]] = None) -> ModelFn:
  """model_fn(x [N], t [N]) -> prediction [N, ..., C] for the transport's samplers, from a
  doubled-batch guided model (e.g. DiT.forward_with_cfg with labels [y; null]) and the
  conditional model; the solvers carry only the N kept samples."""
  doubled = limit_guidance(guided_model_fn, cond_model_fn, guidance_interval)
  return first_channels(kept_half_model_fn(doubled))


def cfg_model_fn(model_fn_xty: Callable[[jax.Array, jax.Array, jax.Array], jax.Array],
                 y: jax.Array, null_label: int, cfg_scale: Union[float, jax.Array],
                 guided_channels: Optional[int] = RELEASE_GUIDED_CHANNELS,
                 guidance_interval: Optional[Sequence[float]] = None) -> ModelFn:
  """Guided model_fn(x [N], t [N]) -> prediction [N, ..., C] for the flow samplers.

  Args:
    model_fn_xty: f(x [M, H, W, C], t float [M], y int32 [M]) -> [M, H, W, K >= C].
    y: int32 [N] labels; null_label: the "no class" label (num_classes for DiT).
    cfg_scale: guidance scale (may be traced); guided_channels: 3 as the release, None: all.
    guidance_interval: (t_lo, t_hi) in flow time; None: guide at every t.
  """
  guided = doubled_cfg_model_fn(model_fn_xty, y, null_label, cfg_scale, guided_channels)
  y = jnp.asarray(y, jnp.int32)
  return guided_prediction(guided, lambda x, t: model_fn_xty(x, t, y), guidance_interval)

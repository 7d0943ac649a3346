"""Classifier-free guidance for every objective: one CFG, one interval limiter, one sampler.

The release runs the model on a doubled batch [cond; uncond]: the same x_t in both halves,
labels [y; null]. The guided output uncond + s * (cond - uncond) is written into both halves
and the sampler keeps the first half. The release guides only the first 3 output channels
(kept for exact FID reproduction: latent channel 3 and the variance channels are not guided);
`guided_channels=None` guides all C channels of x, the standard form.

Guidance can be limited to an interval of noise levels (Kynkaanniemi et al., 2024): outside it
the scale is 1 and only the conditional half is evaluated, at half the cost. Each objective
says where its interval is, in its own time units, as a predicate on the model's time input
(`Objective.guidance_predicate`); the limiter here only switches on it.

`make_sample_fn` is the guided sampler that dit_jax.sample, the periodic grids and evaluation,
the grid runner and the planner all compile: one jitted (params, key, labels, cfg_scale) ->
latents whose loop is the objective's sampler.
"""

from __future__ import annotations

from typing import Any, Callable, Optional, Sequence, Union

import jax
import jax.numpy as jnp

# Output channels the released forward_with_cfg guides.
RELEASE_GUIDED_CHANNELS = 3

# model_fn(x [B, H, W, C], t [B]) -> [B, H, W, K]: the network at the objective's time input.
ModelFn = Callable[[jax.Array, jax.Array], jax.Array]
# Whether a sampling step at model time t (a scalar: every sample of a step shares it) guides.
Predicate = Callable[[jax.Array], jax.Array]


def apply_cfg(model_out: jax.Array, cfg_scale: Union[float, jax.Array],
              guided_channels: int) -> jax.Array:
  """Combines a doubled-batch output [cond; uncond] [2N, H, W, K] as the release does.

  Channels [0, guided_channels) become uncond + s (cond - uncond) in both halves; the other
  channels are unchanged (each half keeps its own). cfg_scale may be traced.
  """
  if not 0 < guided_channels <= model_out.shape[-1]:
    raise ValueError(f"guided_channels: {guided_channels} is outside [1, "
                     f"{model_out.shape[-1]}] for output shape {model_out.shape}.")
  if model_out.shape[0] % 2:
    raise ValueError(f"model_out: batch {model_out.shape[0]} is not [cond; uncond] (odd).")
  guided, rest = jnp.split(model_out, [guided_channels], axis=-1)
  cond, uncond = jnp.split(guided, 2, axis=0)
  half = uncond + jnp.asarray(cfg_scale, model_out.dtype) * (cond - uncond)
  return jnp.concatenate([jnp.concatenate([half, half], axis=0), rest], axis=-1)


def check_interval(interval: Optional[Sequence[float]], unit: str,
                   covers_all: Callable[[float, float], bool]) -> Optional[tuple[float, float]]:
  """(lo, hi) as floats with 0 <= lo < hi, or None when absent or when covers_all(lo, hi).

  `unit` names the objective's time axis in the error (e.g. "sigma_t").
  """
  if interval is None or len(interval) == 0:
    return None
  if len(interval) != 2 or not 0 <= float(interval[0]) < float(interval[1]):
    raise ValueError(f"guidance_interval: expected ({unit}_lo, {unit}_hi) with 0 <= lo < hi, "
                     f"got {interval!r}.")
  lo, hi = float(interval[0]), float(interval[1])
  return None if covers_all(lo, hi) else (lo, hi)


def limit_guidance(guided_fn: ModelFn, cond_fn: ModelFn,
                   active: Optional[Predicate]) -> ModelFn:
  """Guidance only where active(t); elsewhere the conditional model alone.

  guided_fn: f(x [2N, ...], t [2N]) on the doubled batch; cond_fn: g(x [N], t [N]). Returns f
  on the doubled batch; where not active, both halves hold g(x[:N], t[:N]), computed alone
  (lax.cond on t[0]: all samples of a sampling step share t). active None: guided_fn itself.
  """
  if active is None:
    return guided_fn

  def model_fn(x, t):
    n = x.shape[0] // 2

    def unguided(x, t):
      out = cond_fn(x[:n], t[:n])
      return jnp.concatenate([out, out], axis=0)
    return jax.lax.cond(active(t[0]), guided_fn, unguided, x, t)
  return model_fn


def kept_half(guided_fn: ModelFn) -> ModelFn:
  """model_fn on the N kept samples: f(x [N], t [N]) = guided_fn([x; x], [t; t])[:N]."""
  def model_fn(x, t):
    n = x.shape[0]
    return guided_fn(jnp.concatenate([x, x], axis=0), jnp.concatenate([t, t], axis=0))[:n]
  return model_fn


def cfg_model_fn(model_fn_xty: Callable[[jax.Array, jax.Array, jax.Array], jax.Array],
                 y: jax.Array, null_label: int, cfg_scale: Union[float, jax.Array],
                 guided_channels: Optional[int] = RELEASE_GUIDED_CHANNELS,
                 active: Optional[Predicate] = None) -> ModelFn:
  """The guided doubled-batch model_fn(x [2N], t [2N]) -> [2N, ...] of a class-conditional
  model f(x [M], t [M], y int32 [M]): evaluates f on [x[:N]; x[:N]] with labels [y; null],
  then `apply_cfg` (guided_channels None: all C channels of x; the release's 3 is capped at
  the output's channels), limited to `active`."""
  y = jnp.asarray(y, jnp.int32)
  labels = jnp.concatenate([y, jnp.full_like(y, null_label)])

  def doubled(x, t):
    half = x[: x.shape[0] // 2]
    out = model_fn_xty(jnp.concatenate([half, half], axis=0), t, labels)
    k = x.shape[-1] if guided_channels is None else min(guided_channels, out.shape[-1])
    return apply_cfg(out, cfg_scale, k)
  return limit_guidance(doubled, lambda x, t: model_fn_xty(x, t, y), active)


def make_sample_fn(objective: Any, model: Any, *, sampler: Optional[str] = None,
                   steps: Optional[int] = None,
                   guidance_interval: Optional[Sequence[float]] = None, guided: bool = True,
                   release_cfg: Optional[bool] = None, in_shardings: Any = None,
                   out_shardings: Any = None,
                   **options: Any) -> Callable:
  """Jitted `sample(params, key, labels [N], cfg_scale) -> latents [N, h, w, c]`.

  objective: a dit_jax.objectives objective; its sampler (`sampler`, `steps`, its own
  `options`, e.g. ADM's spacing or respacing) runs the loop, one compiled computation. model:
  the DiT (input_size, in_channels, num_classes, apply). guided: double each model call as
  the release does ([x; x], labels [y; null]), the scale a traced argument (changing it never
  recompiles); release_cfg: guide the first 3 channels only (the DiT release's rule, which
  SiT and LightningDiT inherited; None: for ADM only, every channel for the other objectives,
  right for any latent width, e.g. the VA-VAE's 32); guidance_interval in the
  objective's units (`objective.guidance_predicate`). ValueError for options the objective
  does not take.
  """
  if guided and objective.trained_guidance:
    raise ValueError(f"the {objective.name} objective trains its guidance in: sample with "
                     "cfg_scale 1 (no guidance pass)")
  run = objective.sampler(sampler, steps, **options)
  active = objective.guidance_predicate(guidance_interval)
  h = w = model.input_size
  if release_cfg is None:
    release_cfg = objective.name == "adm"
  channels = RELEASE_GUIDED_CHANNELS if release_cfg else None

  def sample(params, key, labels, cfg_scale):
    k_noise, k_loop = jax.random.split(key)
    z = jax.random.normal(k_noise, (labels.shape[0], h, w, model.in_channels), jnp.float32)
    variables = {"params": params}
    apply = lambda x, t, y, **kw: model.apply(variables, x, t, y, **kw)
    # Unguided, the model takes the objective's further inputs (MeanFlow's h).
    fn = lambda x, t, **kw: apply(x, t, labels, **kw)
    if guided:
      fn = kept_half(cfg_model_fn(apply, labels, model.num_classes, cfg_scale, channels, active))
    return run(fn, z, k_loop)

  return jax.jit(sample, in_shardings=in_shardings, out_shardings=out_shardings)

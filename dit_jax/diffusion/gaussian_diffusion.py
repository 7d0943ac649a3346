"""ADM Gaussian diffusion: forward process, hybrid loss, DDPM and DDIM samplers.

The process is data (coefficient tables computed in float64 with numpy on the
host, stored as float32 numpy arrays that become constants when traced) plus
pure functions of arrays, so every method can be used inside `jax.jit`,
`jax.grad` and sharded computations. Images are NHWC.

Timesteps: methods take `t`, int32 [N] indices into THIS process
(0 .. num_timesteps - 1). A respaced process (see `respace.py`) keeps a subset
of the original 1000 steps; the model is always called with the ORIGINAL
timestep `timestep_map[t]`, as the released code does. For the unrespaced
process the two coincide.
"""
import math
import sys
from typing import Callable, Optional, Sequence, Union

import jax
import jax.numpy as jnp
import numpy as np

from dit_jax.diffusion import losses
from dit_jax.guidance import ModelFn  # here: t int32 [N] original timesteps

Progress = Union[bool, Callable[[int, int], None]]

MEAN_TYPES = ("epsilon", "start_x")
VAR_TYPES = ("learned_range", "fixed_small", "fixed_large")
LOSS_TYPES = ("mse", "rescaled_mse", "kl", "rescaled_kl")


def get_named_beta_schedule(name: str, num_diffusion_timesteps: int) -> np.ndarray:
  """Betas [T] in float64 for the "linear" (DDPM, scaled by 1000/T) or "cosine" schedule."""
  if name == "linear":
    scale = 1000.0 / num_diffusion_timesteps
    return np.linspace(scale * 1e-4, scale * 0.02, num_diffusion_timesteps,
                       dtype=np.float64)
  if name == "cosine":
    def alpha_bar(s):
      return math.cos((s + 0.008) / 1.008 * math.pi / 2) ** 2
    t = np.arange(num_diffusion_timesteps, dtype=np.float64)
    betas = [1.0 - alpha_bar((i + 1) / num_diffusion_timesteps) /
             alpha_bar(i / num_diffusion_timesteps) for i in t]
    return np.minimum(np.asarray(betas, np.float64), 0.999)
  raise ValueError(f"noise_schedule: unknown schedule {name!r}; "
                   "expected 'linear' or 'cosine'.")


def loop_start(shape: Sequence[int], key: jax.Array,
               noise: Optional[jax.Array]) -> tuple[jax.Array, jax.Array]:
  """(x_T, key of the steps' noise) of a sampling loop: x_T is drawn from split(key)[0]
  unless `noise` (of `shape`) is given."""
  shape = tuple(shape)
  key_init, key_steps = jax.random.split(key)
  if noise is None:
    return jax.random.normal(key_init, shape, jnp.float32), key_steps
  if tuple(noise.shape) != shape:
    raise ValueError(f"noise: shape {tuple(noise.shape)} does not match shape {shape}.")
  return jnp.asarray(noise, jnp.float32), key_steps


def progress_ticker(progress: Progress, every: Optional[int], total: int) -> Callable:
  """tick(done) for inside a scan: reports (done, total) on the host every `every` steps and at
  the end, through `progress` (a callable, or True for the default line); no-op if falsy."""
  if not progress:
    return lambda done: None
  report = progress if callable(progress) else _default_progress
  every = every or max(1, total // 10)

  def tick(done):
    jax.lax.cond((done % every == 0) | (done == total),
                 lambda d: jax.debug.callback(lambda v: report(int(v), total), d),
                 lambda d: None, done)

  return tick


def _check_choice(field: str, value: str, choices: Sequence[str]) -> None:
  if value not in choices:
    raise ValueError(f"{field}: got {value!r}, expected one of {list(choices)}.")


def _default_progress(done: int, total: int) -> None:
  print(f"sampling: step {done}/{total}", file=sys.stderr, flush=True)


class GaussianDiffusion:
  """A (possibly respaced) Gaussian diffusion process with ADM semantics.

  Attributes:
    num_timesteps: number of steps T of this process.
    timestep_map: int32 numpy [T], original timestep of each step of this process.
    betas, alphas_cumprod, ...: float64 numpy tables [T] (host copies).
  """

  def __init__(self, betas: np.ndarray, *, model_mean_type: str = "epsilon",
               model_var_type: str = "learned_range", loss_type: str = "mse",
               timestep_map: Optional[Sequence[int]] = None,
               original_num_steps: Optional[int] = None):
    _check_choice("model_mean_type", model_mean_type, MEAN_TYPES)
    _check_choice("model_var_type", model_var_type, VAR_TYPES)
    _check_choice("loss_type", loss_type, LOSS_TYPES)
    betas = np.asarray(betas, dtype=np.float64)
    if betas.ndim != 1 or betas.size < 1:
      raise ValueError(f"betas: expected a non-empty 1-D array, got shape {betas.shape}.")
    if not np.all((betas > 0) & (betas <= 1)):
      raise ValueError("betas: every beta must lie in (0, 1].")
    self.model_mean_type = model_mean_type
    self.model_var_type = model_var_type
    self.loss_type = loss_type
    self.num_timesteps = int(betas.shape[0])
    self.original_num_steps = original_num_steps or self.num_timesteps
    if timestep_map is None:
      timestep_map = np.arange(self.num_timesteps)
    self.timestep_map = np.asarray(timestep_map, dtype=np.int32)
    if self.timestep_map.shape != betas.shape:
      raise ValueError(f"timestep_map: shape {self.timestep_map.shape} does not "
                       f"match betas {betas.shape}.")

    self.betas = betas
    alphas = 1.0 - betas
    self.alphas_cumprod = np.cumprod(alphas)
    self.alphas_cumprod_prev = np.append(1.0, self.alphas_cumprod[:-1])
    self.alphas_cumprod_next = np.append(self.alphas_cumprod[1:], 0.0)
    self.sqrt_alphas_cumprod = np.sqrt(self.alphas_cumprod)
    self.sqrt_one_minus_alphas_cumprod = np.sqrt(1.0 - self.alphas_cumprod)
    self.sqrt_recip_alphas_cumprod = np.sqrt(1.0 / self.alphas_cumprod)
    self.sqrt_recipm1_alphas_cumprod = np.sqrt(1.0 / self.alphas_cumprod - 1.0)
    self.posterior_variance = (betas * (1.0 - self.alphas_cumprod_prev) /
                               (1.0 - self.alphas_cumprod))
    # The posterior variance is 0 at t = 0; ADM clips its log to the t = 1 value.
    pv = self.posterior_variance
    self.posterior_log_variance_clipped = np.log(
        np.append(pv[1], pv[1:]) if pv.size > 1 else np.maximum(pv, betas))
    self.posterior_mean_coef1 = (betas * np.sqrt(self.alphas_cumprod_prev) /
                                 (1.0 - self.alphas_cumprod))
    self.posterior_mean_coef2 = ((1.0 - self.alphas_cumprod_prev) * np.sqrt(alphas) /
                                 (1.0 - self.alphas_cumprod))
    fixed_large = np.append(pv[1], betas[1:]) if pv.size > 1 else betas
    self._fixed_large_variance = fixed_large
    self._fixed_large_log_variance = np.log(fixed_large)
    self._f32 = {}

  def __repr__(self) -> str:
    return (f"GaussianDiffusion(num_timesteps={self.num_timesteps}, "
            f"original_num_steps={self.original_num_steps}, "
            f"mean={self.model_mean_type}, var={self.model_var_type}, "
            f"loss={self.loss_type})")

  @property
  def learn_sigma(self) -> bool:
    return self.model_var_type == "learned_range"

  # Tables and indexing.

  def _table(self, name: str) -> np.ndarray:
    if name not in self._f32:
      self._f32[name] = np.asarray(getattr(self, name), dtype=np.float32)
    return self._f32[name]

  def _extract(self, name: str, t: jax.Array, ndim: int) -> jax.Array:
    """table[t] as float32, shaped [N, 1, ..., 1] to broadcast over [N, ...]."""
    t = jnp.asarray(t)
    values = jnp.asarray(self._table(name))[t]
    return values.reshape(t.shape + (1,) * (ndim - t.ndim))

  def model_timesteps(self, t: jax.Array) -> jax.Array:
    """Original timesteps (int32, same shape as t) to feed the model."""
    return jnp.asarray(self.timestep_map)[jnp.asarray(t)]

  def _call_model(self, model_fn: ModelFn, x: jax.Array, t: jax.Array) -> jax.Array:
    out = model_fn(x, self.model_timesteps(t))
    channels = x.shape[-1]
    expected = 2 * channels if self.learn_sigma else channels
    if out.shape[:-1] != x.shape[:-1] or out.shape[-1] != expected:
      raise ValueError(
          f"model_fn output: expected shape {x.shape[:-1] + (expected,)} "
          f"(NHWC, {'2C' if self.learn_sigma else 'C'} channels for "
          f"model_var_type={self.model_var_type!r}), got {out.shape}.")
    return out.astype(jnp.float32)

  # Forward process and posterior.

  def q_mean_variance(self, x_start: jax.Array, t: jax.Array):
    """Mean, variance, log variance of q(x_t | x_0)."""
    n = x_start.ndim
    mean = self._extract("sqrt_alphas_cumprod", t, n) * x_start
    variance = 1.0 - self._extract("alphas_cumprod", t, n)
    log_variance = jnp.log(variance)
    return mean, variance, log_variance

  def q_sample(self, x_start: jax.Array, t: jax.Array, noise: jax.Array) -> jax.Array:
    """x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) noise; all [N, H, W, C]."""
    n = x_start.ndim
    return (self._extract("sqrt_alphas_cumprod", t, n) * x_start +
            self._extract("sqrt_one_minus_alphas_cumprod", t, n) * noise)

  def q_posterior_mean_variance(self, x_start: jax.Array, x_t: jax.Array, t: jax.Array):
    """Mean, variance and clipped log variance of q(x_{t-1} | x_t, x_0)."""
    n = x_t.ndim
    mean = (self._extract("posterior_mean_coef1", t, n) * x_start +
            self._extract("posterior_mean_coef2", t, n) * x_t)
    variance = self._extract("posterior_variance", t, n)
    log_variance = self._extract("posterior_log_variance_clipped", t, n)
    return mean, variance, log_variance

  def predict_xstart_from_eps(self, x_t: jax.Array, t: jax.Array, eps: jax.Array) -> jax.Array:
    n = x_t.ndim
    return (self._extract("sqrt_recip_alphas_cumprod", t, n) * x_t -
            self._extract("sqrt_recipm1_alphas_cumprod", t, n) * eps)

  def predict_eps_from_xstart(self, x_t: jax.Array, t: jax.Array,
                              pred_xstart: jax.Array) -> jax.Array:
    n = x_t.ndim
    return ((self._extract("sqrt_recip_alphas_cumprod", t, n) * x_t - pred_xstart) /
            self._extract("sqrt_recipm1_alphas_cumprod", t, n))

  # Reverse process.

  def p_mean_variance_from_output(self, model_output: jax.Array, x: jax.Array,
                                  t: jax.Array, clip_denoised: bool = False) -> dict:
    """p(x_{t-1} | x_t) from a model output [N, H, W, C or 2C] (see p_mean_variance)."""
    n = x.ndim
    channels = x.shape[-1]
    if self.learn_sigma:
      model_output, var_values = jnp.split(model_output, [channels], axis=-1)
      min_log = self._extract("posterior_log_variance_clipped", t, n)
      max_log = jnp.log(self._extract("betas", t, n))
      frac = (var_values + 1.0) / 2.0
      log_variance = frac * max_log + (1.0 - frac) * min_log
      variance = jnp.exp(log_variance)
    else:
      if self.model_var_type == "fixed_large":
        variance = self._extract("_fixed_large_variance", t, n)
        log_variance = self._extract("_fixed_large_log_variance", t, n)
      else:
        variance = self._extract("posterior_variance", t, n)
        log_variance = self._extract("posterior_log_variance_clipped", t, n)
      variance = jnp.broadcast_to(variance, x.shape)
      log_variance = jnp.broadcast_to(log_variance, x.shape)

    if self.model_mean_type == "epsilon":
      pred_xstart = self.predict_xstart_from_eps(x, t, model_output)
    else:
      pred_xstart = model_output
    if clip_denoised:
      pred_xstart = jnp.clip(pred_xstart, -1.0, 1.0)
    mean, _, _ = self.q_posterior_mean_variance(pred_xstart, x, t)
    return {"mean": mean, "variance": variance, "log_variance": log_variance,
            "pred_xstart": pred_xstart}

  def p_mean_variance(self, model_fn: ModelFn, x: jax.Array, t: jax.Array,
                      clip_denoised: bool = False) -> dict:
    """Model's p(x_{t-1} | x_t).

    Args:
      model_fn: model_fn(x_t, original_t) -> [N, H, W, C] or [N, H, W, 2C].
      x: x_t, [N, H, W, C].
      t: int32 [N] indices into this process.
      clip_denoised: clip the predicted x_0 to [-1, 1] (off for latents).

    Returns:
      dict of mean, variance, log_variance, pred_xstart, each [N, H, W, C].
    """
    return self.p_mean_variance_from_output(
        self._call_model(model_fn, x, t), x, t, clip_denoised)

  def p_sample(self, model_fn: ModelFn, x: jax.Array, t: jax.Array,
               key: Optional[jax.Array] = None, clip_denoised: bool = False,
               noise: Optional[jax.Array] = None) -> dict:
    """One ancestral DDPM step x_t -> x_{t-1}: dict(sample, pred_xstart).

    The step noise z [N, H, W, C] is `noise` if given, else drawn from `key`;
    it is not added where t == 0.
    """
    out = self.p_mean_variance(model_fn, x, t, clip_denoised)
    noise = self._step_noise(key, noise, x, "p_sample")
    nonzero = (jnp.asarray(t) != 0).astype(x.dtype).reshape((-1,) + (1,) * (x.ndim - 1))
    sample = out["mean"] + nonzero * jnp.exp(0.5 * out["log_variance"]) * noise
    return {"sample": sample, "pred_xstart": out["pred_xstart"]}

  def ddim_sample(self, model_fn: ModelFn, x: jax.Array, t: jax.Array,
                  key: Optional[jax.Array] = None, eta: Union[float, jax.Array] = 0.0,
                  clip_denoised: bool = False,
                  noise: Optional[jax.Array] = None) -> dict:
    """One DDIM step x_t -> x_{t-1}: dict(sample, pred_xstart).

    eta may be traced; with a Python eta == 0 no noise is drawn. Otherwise the
    step noise is `noise` if given, else drawn from `key`.
    """
    out = self.p_mean_variance(model_fn, x, t, clip_denoised)
    n = x.ndim
    # As ADM: eps re-derived from pred_xstart so clipping (if on) is respected.
    eps = self.predict_eps_from_xstart(x, t, out["pred_xstart"])
    abar = self._extract("alphas_cumprod", t, n)
    abar_prev = self._extract("alphas_cumprod_prev", t, n)
    sigma = (eta * jnp.sqrt((1.0 - abar_prev) / (1.0 - abar)) *
             jnp.sqrt(1.0 - abar / abar_prev))
    sample = (out["pred_xstart"] * jnp.sqrt(abar_prev) +
              jnp.sqrt(1.0 - abar_prev - jnp.square(sigma)) * eps)
    deterministic = isinstance(eta, (int, float)) and eta == 0
    if not deterministic:
      noise = self._step_noise(key, noise, x, "ddim_sample")
      nonzero = (jnp.asarray(t) != 0).astype(x.dtype).reshape((-1,) + (1,) * (n - 1))
      sample = sample + nonzero * sigma * noise
    return {"sample": sample, "pred_xstart": out["pred_xstart"]}

  @staticmethod
  def _step_noise(key, noise, x, where):
    if noise is not None:
      if noise.shape != x.shape:
        raise ValueError(f"{where}: noise shape {noise.shape} does not match x {x.shape}.")
      return noise.astype(x.dtype)
    if key is None:
      raise ValueError(f"{where}: pass either key or noise.")
    return jax.random.normal(key, x.shape, x.dtype)

  def _loop(self, step_fn, shape, key, noise, progress, progress_every):
    shape = tuple(shape)
    x, key_steps = loop_start(shape, key, noise)
    total = self.num_timesteps
    tick = progress_ticker(progress, progress_every, total)

    def body(x, i):
      t = jnp.full((shape[0],), i, jnp.int32)
      x = step_fn(x, t, jax.random.fold_in(key_steps, i))
      tick(total - i)
      return x, None

    indices = jnp.arange(total - 1, -1, -1, dtype=jnp.int32)
    x, _ = jax.lax.scan(body, x, indices)
    return x

  def p_sample_loop(self, model_fn: ModelFn, shape: Sequence[int], key: jax.Array,
                    noise: Optional[jax.Array] = None, clip_denoised: bool = False,
                    progress: Progress = False,
                    progress_every: Optional[int] = None) -> jax.Array:
    """Ancestral DDPM sampling over all steps of this process, as one lax.scan.

    Args:
      model_fn: model_fn(x_t, original_t) -> [N, H, W, C or 2C].
      shape: [N, H, W, C] of the samples.
      key: PRNG key; step i (index into this process) draws its noise from
        fold_in(split(key)[1], i), the initial noise (if not given) from split(key)[0].
      noise: optional initial x_T, [N, H, W, C].
      clip_denoised: clip predicted x_0 to [-1, 1] each step (off for latents).
      progress: True to print every `progress_every` steps (default T/10) from
        the device via jax.debug.callback, or a callable(done, total).

    Returns:
      x_0 samples, float32 [N, H, W, C].
    """
    def step(x, t, k):
      return self.p_sample(model_fn, x, t, k, clip_denoised=clip_denoised)["sample"]
    return self._loop(step, shape, key, noise, progress, progress_every)

  def ddim_sample_loop(self, model_fn: ModelFn, shape: Sequence[int], key: jax.Array,
                       noise: Optional[jax.Array] = None,
                       eta: Union[float, jax.Array] = 0.0, clip_denoised: bool = False,
                       progress: Progress = False,
                       progress_every: Optional[int] = None) -> jax.Array:
    """DDIM sampling over all steps of this process, as one lax.scan (see p_sample_loop)."""
    def step(x, t, k):
      return self.ddim_sample(model_fn, x, t, k, eta=eta,
                              clip_denoised=clip_denoised)["sample"]
    return self._loop(step, shape, key, noise, progress, progress_every)

  # Training loss.

  def _vb_terms_bpd(self, model_output: jax.Array, x_start: jax.Array,
                    x_t: jax.Array, t: jax.Array) -> jax.Array:
    """Per-example bound term in bits: KL for t > 0, decoder NLL at t = 0. [N]."""
    true_mean, _, true_log_variance = self.q_posterior_mean_variance(x_start, x_t, t)
    out = self.p_mean_variance_from_output(model_output, x_t, t)
    kl = losses.normal_kl(true_mean, true_log_variance, out["mean"], out["log_variance"])
    kl = losses.mean_flat(kl) / math.log(2.0)
    nll = -losses.discretized_gaussian_log_likelihood(
        x_start, means=out["mean"], log_scales=0.5 * out["log_variance"])
    nll = losses.mean_flat(nll) / math.log(2.0)
    return jnp.where(jnp.asarray(t) == 0, nll, kl)

  def training_losses(self, model_fn: ModelFn, x_start: jax.Array, t: jax.Array,
                      noise: jax.Array) -> dict:
    """Per-example training losses of the release (hybrid loss by default).

    Args:
      model_fn: model_fn(x_t, original_t) -> [N, H, W, 2C] (learned sigma) or
        [N, H, W, C]. Differentiate through it by closing over parameters.
      x_start: x_0, [N, H, W, C].
      t: int32 [N] indices into this process (uniform in [0, num_timesteps)).
      noise: eps, [N, H, W, C].

    Returns:
      dict of float32 [N] arrays: "mse" (mean squared eps error), "vb" (the bound
      term in bits with the mean prediction held constant, so it trains only the
      variance; zero for fixed variances) and "loss" = mse + vb. For
      loss_type "kl"/"rescaled_kl", "loss" is the full bound (times T if rescaled).
    """
    x_start = jnp.asarray(x_start, jnp.float32)
    if noise.shape != x_start.shape:
      raise ValueError(f"noise: shape {noise.shape} does not match x_start {x_start.shape}.")
    x_t = self.q_sample(x_start, t, noise)
    model_output = self._call_model(model_fn, x_t, t)
    channels = x_start.shape[-1]
    mean_output = model_output[..., :channels]
    target = noise if self.model_mean_type == "epsilon" else x_start
    mse = losses.mean_flat(jnp.square(target - mean_output))

    if self.loss_type in ("kl", "rescaled_kl"):
      vb = self._vb_terms_bpd(model_output, x_start, x_t, t)
      loss = vb * self.num_timesteps if self.loss_type == "rescaled_kl" else vb
      return {"loss": loss, "mse": mse, "vb": vb}

    if self.learn_sigma:
      frozen = jnp.concatenate(
          [jax.lax.stop_gradient(mean_output), model_output[..., channels:]], axis=-1)
      vb = self._vb_terms_bpd(frozen, x_start, x_t, t)
      if self.loss_type == "rescaled_mse":
        # As ADM: divide by 1000 so the term matches the original L_vlb weighting.
        vb = vb * (self.num_timesteps / 1000.0)
    else:
      vb = jnp.zeros_like(mse)
    return {"loss": mse + vb, "mse": mse, "vb": vb}

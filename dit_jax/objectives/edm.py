"""EDM (Karras et al. 2022): preconditioning, training loss and the Heun sampler in pure JAX.

D(x, sigma) = c_skip * x + c_out * F(c_in * x, c_noise) with sigma_data = 0.5; training draws
ln(sigma) ~ N(-1.2, 1.2^2) with weight (sigma^2 + sd^2) / (sigma * sd)^2; sampling runs the
second-order Heun solver on the rho = 7 sigma grid, optionally with churn (2N - 1 network calls
for N steps).

`raw_fn(x_in [B, ...], c_noise [B]) -> [B, ...]` is the network F. `EDM` below is the
objective (config.objective.name = 'edm') that trains a DiT as F and samples it.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping, Optional, Sequence, Tuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from dit_jax import guidance
from dit_jax.diffusion.losses import mean_flat
from dit_jax.objectives import base

RawFn = Callable[[jax.Array, jax.Array], jax.Array]
DenoiseFn = Callable[[jax.Array, jax.Array], jax.Array]

# Numerics

SIGMA_DATA = 0.5
P_MEAN = -1.2
P_STD = 1.2
SIGMA_MIN = 0.002
SIGMA_MAX = 80.0
RHO = 7.0
NUM_STEPS = 18


def _batch_sigma(sigma, batch: int) -> jax.Array:
  """sigma as float32 [batch]; a scalar is broadcast."""
  sigma = jnp.asarray(sigma, jnp.float32)
  if sigma.ndim == 0:
    return jnp.full((batch,), sigma, jnp.float32)
  if sigma.shape != (batch,):
    raise ValueError(f"sigma must be a scalar or of shape [{batch}], got {sigma.shape}")
  return sigma


def precondition(sigma: jax.Array, sigma_data: float = SIGMA_DATA
                ) -> Tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
  """EDM's preconditioning coefficients (c_skip, c_out, c_in, c_noise), each of sigma's shape [B].

  c_skip = sd^2 / (sigma^2 + sd^2), c_out = sigma * sd / sqrt(sigma^2 + sd^2),
  c_in = 1 / sqrt(sigma^2 + sd^2), c_noise = ln(sigma) / 4.
  """
  sigma = jnp.asarray(sigma, jnp.float32)
  sd2 = sigma_data ** 2
  var = sigma ** 2 + sd2
  c_in = jax.lax.rsqrt(var)
  c_skip = sd2 / var
  c_out = sigma * sigma_data * c_in
  c_noise = jnp.log(sigma) / 4.0
  return c_skip, c_out, c_in, c_noise


def denoiser(raw_fn: RawFn, sigma_data: float = SIGMA_DATA) -> DenoiseFn:
  """The preconditioned denoiser D(x [B, ...], sigma [B] or scalar) -> [B, ...] float32."""

  def denoise(x: jax.Array, sigma) -> jax.Array:
    x = jnp.asarray(x, jnp.float32)
    sigma = _batch_sigma(sigma, x.shape[0])
    c_skip, c_out, c_in, c_noise = precondition(sigma, sigma_data)
    f = raw_fn(base.per_example(c_in, x) * x, c_noise)
    if f.shape != x.shape:
      # A learn_sigma DiT returns 2C channels: the caller must pick the first C.
      raise ValueError(f"raw_fn returned shape {f.shape}, expected x's shape {x.shape}")
    return base.per_example(c_skip, x) * x + base.per_example(c_out, x) * f.astype(jnp.float32)

  return denoise


def loss_weight(sigma: jax.Array, sigma_data: float = SIGMA_DATA) -> jax.Array:
  """lambda(sigma) = (sigma^2 + sd^2) / (sigma * sd)^2, of sigma's shape."""
  sigma = jnp.asarray(sigma, jnp.float32)
  return (sigma ** 2 + sigma_data ** 2) / (sigma * sigma_data) ** 2


def loss(raw_fn: RawFn, x0: jax.Array, sigma: jax.Array, noise: jax.Array,
         sigma_data: float = SIGMA_DATA) -> jax.Array:
  """Per-example EDM loss [B]: mean over non-batch dims of lambda * (D(x0 + sigma n, sigma) - x0)^2.

  x0, noise: [B, ...]; sigma: [B].
  """
  x0 = jnp.asarray(x0, jnp.float32)
  noise = jnp.asarray(noise, jnp.float32)
  sigma = _batch_sigma(sigma, x0.shape[0])
  _, _, c_in, c_noise = precondition(sigma, sigma_data)
  s = base.per_example(sigma, x0)
  c_in_b = base.per_example(c_in, x0)
  y = x0 + s * noise
  f = raw_fn(c_in_b * y, c_noise).astype(jnp.float32)
  # lambda * c_out^2 == 1, so the loss is (F - target)^2 with target = (x0 - c_skip y) / c_out,
  # which simplifies to c_in (sigma / sd x0 - sd n). Forming D - x0 instead would cancel two O(1)
  # terms to O(sigma) and then multiply the rounding error by lambda ~ 1 / sigma^2.
  target = c_in_b * (s / sigma_data * x0 - sigma_data * noise)
  return mean_flat(jnp.square(f - target))


def sample_sigma(key: jax.Array, batch: int, p_mean: float = P_MEAN, p_std: float = P_STD
                ) -> jax.Array:
  """Training noise levels: float32 [batch] with ln(sigma) ~ N(p_mean, p_std^2)."""
  return jnp.exp(p_mean + p_std * jax.random.normal(key, (batch,), jnp.float32))


def sigma_steps(num_steps: int = NUM_STEPS, sigma_min: float = SIGMA_MIN,
                sigma_max: float = SIGMA_MAX, rho: float = RHO) -> np.ndarray:
  """The sampler's noise levels, float64 [num_steps + 1]: sigma_max down to sigma_min, then 0."""
  if num_steps < 2:
    raise ValueError(f"num_steps must be at least 2, got {num_steps}")
  frac = np.arange(num_steps, dtype=np.float64) / (num_steps - 1)
  lo, hi = sigma_min ** (1.0 / rho), sigma_max ** (1.0 / rho)
  t = (hi + frac * (lo - hi)) ** rho
  return np.append(t, 0.0)


def nfe(num_steps: int) -> int:
  """Network evaluations of `sample`: a Heun step costs 2, the last (Euler, to sigma = 0) 1."""
  return 2 * num_steps - 1


def sample(raw_fn: Optional[RawFn], latents: jax.Array, num_steps: int = NUM_STEPS,
           sigma_min: float = SIGMA_MIN, sigma_max: float = SIGMA_MAX, rho: float = RHO,
           S_churn: float = 0.0, S_min: float = 0.0, S_max: float = float("inf"),
           S_noise: float = 1.0, key: Optional[jax.Array] = None,
           sigma_data: float = SIGMA_DATA, *, denoise_fn: Optional[DenoiseFn] = None
          ) -> jax.Array:
  """EDM's Heun sampler (deterministic, or stochastic with S_churn > 0): latents -> x float32.

  latents: [B, ...] unit-variance noise; scaled by sigma_max inside. Every call of the denoiser
  gets sigma [B] holding one value. denoise_fn, if given, replaces denoiser(raw_fn, sigma_data).
  The sigma grid and churn are static (host float64), so this traces to one scan body with two
  denoiser calls plus the final Euler step, and works under jax.jit.
  """
  if denoise_fn is None:
    if raw_fn is None:
      raise ValueError("sample needs raw_fn or denoise_fn")
    denoise_fn = denoiser(raw_fn, sigma_data)
  stochastic = S_churn > 0
  if stochastic and key is None:
    raise ValueError("sample with S_churn > 0 needs a PRNG `key`")

  t = sigma_steps(num_steps, sigma_min, sigma_max, rho)
  t_cur, t_next = t[:-1], t[1:]
  in_range = (t_cur >= S_min) & (t_cur <= S_max)
  gamma = np.where(in_range, min(S_churn / num_steps, np.sqrt(2.0) - 1.0), 0.0)
  t_hat = t_cur + gamma * t_cur
  # Computed on the host in float64: t_hat^2 - t_cur^2 would cancel badly in float32.
  noise_std = S_noise * np.sqrt(np.maximum(t_hat ** 2 - t_cur ** 2, 0.0))

  x = jnp.asarray(latents, jnp.float32)
  batch = x.shape[0]

  def denoise(x_, sigma):
    return denoise_fn(x_, jnp.full((batch,), sigma, jnp.float32)).astype(jnp.float32)

  def churn(x_, i, std):
    if not stochastic:
      return x_
    eps = jax.random.normal(jax.random.fold_in(key, i), x_.shape, jnp.float32)
    return x_ + std * eps

  def heun_step(x_, xs):
    i, th, tn, std = xs
    x_hat = churn(x_, i, std)
    d = (x_hat - denoise(x_hat, th)) / th
    x_euler = x_hat + (tn - th) * d
    d_next = (x_euler - denoise(x_euler, tn)) / tn
    return x_hat + (tn - th) * (0.5 * d + 0.5 * d_next), None

  t_hat, t_next, noise_std = (a.astype(np.float32) for a in (t_hat, t_next, noise_std))
  x = x * np.float32(t[0])
  n_heun = num_steps - 1
  xs = (np.arange(n_heun, dtype=np.int32), t_hat[:n_heun], t_next[:n_heun], noise_std[:n_heun])
  x, _ = jax.lax.scan(heun_step, x, xs)

  # The last step lands on sigma = 0, where the correction would divide by zero: Euler only.
  last = n_heun
  th, tn = t_hat[last], t_next[last]
  x_hat = churn(x, last, noise_std[last])
  d = (x_hat - denoise(x_hat, th)) / th
  return x_hat + (tn - th) * d


# The objective

@base.register
@dataclasses.dataclass(frozen=True)
class EDM(base.ObjectiveBase):
  """EDM's preconditioned denoiser trained on log-normal sigma, sampled with its Heun solver.

  The DiT is EDM's F: it sees x_in = c_in x and, as its time input, time_scale * c_noise with
  c_noise = ln(sigma) / 4. DiT's frequency embedding was made for ADM's timesteps 0 .. 999, and
  time_scale (250) spreads EDM's sigma range (c_noise from -1.55 to 1.10) over a span of that
  size. A learn_sigma model's extra channels are left unused.
  """
  sigma_data: float = SIGMA_DATA
  p_mean: float = P_MEAN
  p_std: float = P_STD
  time_scale: float = 250.0
  learn_sigma: bool = False

  name = "edm"
  samplers = ("heun",)
  default_sampler = "heun"
  default_steps = {"heun": NUM_STEPS}
  # The sigma grid (sigma_min, sigma_max, rho) and the churn of the stochastic sampler
  # (S_churn > 0 turns it on, between S_min and S_max, with noise scale S_noise).
  sampler_options = {"sigma_min": SIGMA_MIN, "sigma_max": SIGMA_MAX, "rho": RHO,
                     "S_churn": 0.0, "S_min": 0.0, "S_max": float("inf"), "S_noise": 1.0}
  time_dtype = jnp.float32

  @classmethod
  def config_fields(cls) -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    # EDM only. The data's standard deviation the preconditioning assumes (EDM: 0.5).
    c.sigma_data = SIGMA_DATA
    # EDM only. Training noise levels: ln(sigma) ~ N(p_mean, p_std^2) (EDM: -1.2, 1.2).
    c.p_mean = P_MEAN
    c.p_std = P_STD
    # EDM only. The DiT's time input is time_scale * ln(sigma) / 4.
    c.time_scale = 250.0
    return c

  @classmethod
  def _build(cls, fields: Mapping[str, Any], learn_sigma: bool, where: str) -> "EDM":
    for key in ("sigma_data", "p_std", "time_scale"):
      if not float(fields[key]) > 0:
        raise ValueError(f"{where}.{key}: expected > 0, got {fields[key]!r}")
    return cls(float(fields["sigma_data"]), float(fields["p_mean"]), float(fields["p_std"]),
               float(fields["time_scale"]), bool(learn_sigma))

  def model_time(self, sigma: jax.Array) -> jax.Array:
    """The DiT's time input at noise level sigma: time_scale * c_noise."""
    return self.time_scale * jnp.log(sigma) / 4

  def raw_fn(self, model_fn: guidance.ModelFn) -> RawFn:
    """EDM's F(x_in, c_noise) from the DiT at its time input (the first C channels)."""
    return lambda x_in, c_noise: model_fn(x_in, self.time_scale * c_noise)[..., :x_in.shape[-1]]

  def draw(self, k_t: jax.Array, k_noise: jax.Array, x0: jax.Array) -> dict[str, jax.Array]:
    """sigma [B] log-normal, t [B] its model time; noise like x0."""
    sigma = sample_sigma(k_t, x0.shape[0], self.p_mean, self.p_std)
    return {"t": self.model_time(sigma), "sigma": sigma, "noise": base.draw_noise(k_noise, x0)}

  def training_losses(self, model_fn: guidance.ModelFn, x0: jax.Array,
                      inputs: Mapping[str, jax.Array]) -> tuple[jax.Array, dict]:
    """(loss [B], logged) of EDM's weighted denoising loss (a mean over each example's
    elements); logged: the mean loss in each quarter of the training sigma distribution
    (loss_q0 .. loss_q3, q0 the lowest noise)."""
    sigma = inputs["sigma"]
    per_example = loss(self.raw_fn(model_fn), x0, sigma, inputs["noise"], self.sigma_data)
    z = (jnp.log(sigma) - self.p_mean) / self.p_std
    quarter = jnp.searchsorted(jnp.asarray([-0.6745, 0.0, 0.6745]), z)  # normal quartiles
    return per_example, base.binned_means(per_example, quarter, 4, "loss_q")

  def sampler(self, sampler: Optional[str] = None, steps: Optional[int] = None,
              **options: Any) -> base.Sampler:
    """EDM's Heun solver with `steps` steps (2 steps - 1 network calls; default 18)."""
    base.check_sampler(self, sampler)
    steps = int(steps or NUM_STEPS)
    if steps < 2:
      raise ValueError(f"steps={steps}: EDM's sigma grid needs at least 2 steps")
    opts = {**self.sampler_options, **base.own_options(self, options)}
    opts = {k: float(v) for k, v in opts.items()}

    def run(model_fn, noise, key):
      return sample(self.raw_fn(model_fn), noise, steps, key=key, sigma_data=self.sigma_data,
                    **opts)
    return run

  def guidance_predicate(self, interval: Optional[Sequence[float]]) -> Optional[
      guidance.Predicate]:
    """(sigma_lo, sigma_hi): guide where lo < sigma <= hi, decided on the model time."""
    interval = guidance.check_interval(interval, "sigma",
                                       lambda lo, hi: lo == 0 and hi == float("inf"))
    if interval is None:
      return None
    # The bounds in model time, rounded as the samplers' float32 t is: rounding cannot move
    # a step across a boundary that the same sigma would not cross.
    lo, hi = (np.float32(self.time_scale * np.log(v) / 4) if 0 < v < np.inf else
              np.float32(-np.inf if v == 0 else np.inf) for v in interval)
    return lambda t: (t > lo) & (t <= hi)

  def to_meta(self) -> dict:
    return {"name": "edm", "sigma_data": self.sigma_data, "p_mean": self.p_mean,
            "p_std": self.p_std, "time_scale": self.time_scale}

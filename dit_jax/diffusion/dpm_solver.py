"""DPM-Solver++ multistep samplers (2M, 3M, 2M-SDE) on the ADM eps-prediction model.

DPM-Solver++ (Lu et al., 2022, "DPM-Solver++: Fast Solver for Guided Sampling of Diffusion
Probabilistic Models") integrates the probability-flow ODE (or, for the SDE variant, the
reverse SDE) of the training process in the log-SNR variable lambda = log(alpha / sigma),
using the model's data prediction x0 = (x - sigma * eps) / alpha. Multistep: step i reuses the
x0 predictions of the previous one (2M) or two (3M) steps, so every step costs ONE model call.

Each step is linear in (x, x0_i, x0_{i-1}, x0_{i-2}, z): its coefficients depend only on the
noise levels, so they are computed once in float64 on the host (a [steps, 5] table) and the
whole loop is one `lax.scan` that evaluates the model once per step. The update, the order
schedule (first order at the start, "lower_order_final"), the step spacings and the conversion
of learned-sigma outputs are those of diffusers' `DPMSolverMultistepScheduler` with
`algorithm_type` "dpmsolver++" / "sde-dpmsolver++", `solver_type="midpoint"` and
`final_sigmas_type="zero"` (tested step by step).

Noise levels are written as in diffusers and EDM: sigma = sqrt((1 - abar) / abar), the
noise-to-signal ratio of x_t / sqrt(abar); the VP quantities are alpha = 1 / sqrt(1 + sigma^2)
and sigma_vp = sigma * alpha.
"""
from typing import Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from dit_jax.diffusion.gaussian_diffusion import ModelFn
from dit_jax.diffusion.gaussian_diffusion import Progress
from dit_jax.diffusion.gaussian_diffusion import loop_start
from dit_jax.diffusion.gaussian_diffusion import progress_ticker

# Spacings of the sampling steps over the training process.
#   time:   uniform in t (diffusers' timestep_spacing="linspace": round(linspace(0, T-1, N+1)),
#           reversed, the final 0 dropped; the last step jumps from t ~ T/N to sigma = 0);
#   logsnr: uniform in log sigma = -logSNR/2 from sigma(T-1) to sigma(0) (use_lu_lambdas);
#   karras: Karras et al. (2022) with rho = 7 from sigma(T-1) to sigma(0) (use_karras_sigmas).
SPACINGS = ("time", "logsnr", "karras")
# name -> (multistep order, stochastic).
SOLVERS = {"dpm++2m": (2, False), "dpm++3m": (3, False), "dpm++2m-sde": (2, True)}
KARRAS_RHO = 7.0


def noise_levels(alphas_cumprod: np.ndarray) -> np.ndarray:
  """sigma_t = sqrt((1 - abar_t) / abar_t) (float64), the noise level of each training step."""
  abar = np.asarray(alphas_cumprod, np.float64)
  return np.sqrt((1.0 - abar) / abar)


def spaced_steps(spacing: str, steps: int, alphas_cumprod: np.ndarray):
  """The noise levels a sampler visits and the timesteps it calls the model with.

  Args:
    spacing: one of SPACINGS.
    steps: number of steps N >= 1 (= model evaluations per sample).
    alphas_cumprod: float64 [T] of the training process.

  Returns:
    (timesteps int32 [N], sigmas float64 [N]), from the noisiest step down. For 'logsnr' and
    'karras' the timesteps are the continuous t of each sigma (interpolated in log sigma)
    rounded to the nearest integer, as diffusers does: the solver uses the exact sigma, the
    model the rounded timestep (neighbouring steps may share one near t = 0).
  """
  if spacing not in SPACINGS:
    raise ValueError(f"spacing: got {spacing!r}, expected one of {list(SPACINGS)}.")
  if int(steps) != steps or steps < 1:
    raise ValueError(f"steps: expected a positive integer, got {steps!r}.")
  table = noise_levels(alphas_cumprod)
  num = table.shape[0]
  if spacing == "time":
    t = np.round(np.linspace(0, num - 1, steps + 1))[::-1][:-1].astype(np.int64)
    return t.astype(np.int32), table[t]
  lo, hi = table[0], table[-1]
  ramp = np.linspace(0.0, 1.0, steps)
  if spacing == "logsnr":
    sigmas = np.exp(np.log(hi) + ramp * (np.log(lo) - np.log(hi)))
  else:
    inv_hi, inv_lo = hi ** (1 / KARRAS_RHO), lo ** (1 / KARRAS_RHO)
    sigmas = (inv_hi + ramp * (inv_lo - inv_hi)) ** KARRAS_RHO
  t = np.interp(np.log(sigmas), np.log(table), np.arange(num, dtype=np.float64))
  return np.round(t).astype(np.int32), sigmas


def _orders(solver_order: int, steps: int, lower_order_final: bool) -> list:
  """Order of each step: warm up from 1; the step to sigma = 0 is always first order."""
  orders = []
  for i in range(steps):
    order = min(solver_order, i + 1)
    if i == steps - 1:
      order = 1
    elif i == steps - 2 and lower_order_final and steps < 15:
      order = min(order, 2)
    orders.append(order)
  return orders


def _step_coefficients(order: int, stochastic: bool, sig_t: float, sig_s: Sequence[float]):
  """(cx, c0, c1, c2, cz) with x_t = cx x_s + c0 m0 + c1 m1 + c2 m2 + cz z (midpoint form).

  sig_t is the target noise level, sig_s = (s0, s1, s2) the current and previous ones (VE
  sigmas); m0, m1, m2 the x0 predictions at s0, s1, s2.
  """
  alpha = lambda s: 1.0 / np.sqrt(1.0 + s * s)
  vp_s0 = sig_s[0] * alpha(sig_s[0])
  if sig_t == 0.0:  # h = inf: the step returns the x0 prediction.
    return 0.0, 1.0, 0.0, 0.0, 0.0
  a_t, vp_t = alpha(sig_t), sig_t * alpha(sig_t)
  lam = lambda s: -np.log(s)  # log(alpha / sigma_vp) = -log(sigma)
  h = lam(sig_t) - lam(sig_s[0])
  e = np.eye(3)  # coefficient vectors over (m0, m1, m2)
  d0 = e[0]
  if order >= 2:
    r0 = (lam(sig_s[0]) - lam(sig_s[1])) / h
    d1_0 = (e[0] - e[1]) / r0
  if order == 3:
    r1 = (lam(sig_s[1]) - lam(sig_s[2])) / h
    d1_1 = (e[1] - e[2]) / r1
    d1 = d1_0 + r0 / (r0 + r1) * (d1_0 - d1_1)
    d2 = (d1_0 - d1_1) / (r0 + r1)
  if stochastic:
    cx = vp_t / vp_s0 * np.exp(-h)
    b = a_t * (1.0 - np.exp(-2.0 * h))
    cz = vp_t * np.sqrt(1.0 - np.exp(-2.0 * h))
    if order == 1:
      m = b * d0
    elif order == 2:
      m = b * (d0 + 0.5 * d1_0)
    else:
      raise ValueError("the SDE solver is implemented up to order 2.")
  else:
    cx = vp_t / vp_s0
    b = a_t * (np.exp(-h) - 1.0)
    cz = 0.0
    if order == 1:
      m = -b * d0
    elif order == 2:
      m = -b * (d0 + 0.5 * d1_0)
    else:
      m = (-b * d0 + a_t * ((np.exp(-h) - 1.0) / h + 1.0) * d1 -
           a_t * ((np.exp(-h) - 1.0 + h) / h ** 2 - 0.5) * d2)
  return cx, m[0], m[1], m[2], cz


class DPMSolver:
  """DPM-Solver++ 2M / 3M / 2M-SDE over N steps of a trained eps-prediction process.

  Attributes:
    name: one of SOLVERS.
    num_timesteps: N, the number of steps and of model calls per sample.
    timesteps: int32 numpy [N], original timesteps the model is called with, in call order.
    sigmas: float64 numpy [N + 1], noise levels visited (sigma_N = 0).
    orders: the order of each step.
    coefficients: float64 numpy [N, 5], (cx, c0, c1, c2, cz) of each step.
  """

  def __init__(self, betas: np.ndarray, steps: int, solver: str = "dpm++2m",
               spacing: str = "time", lower_order_final: bool = True):
    """Builds the solver.

    Args:
      betas: float64 [T] betas of the TRAINING process (e.g. 1000-step linear).
      steps: number of steps N >= 1.
      solver: 'dpm++2m', 'dpm++3m' or 'dpm++2m-sde'.
      spacing: one of SPACINGS.
      lower_order_final: with N < 15, at most second order for the second-to-last step
        (diffusers' default; stabilizes few-step sampling). The last step, to sigma = 0,
        is always first order.
    """
    if solver not in SOLVERS:
      raise ValueError(f"solver: got {solver!r}, expected one of {list(SOLVERS)}.")
    self.name = solver
    self.spacing = spacing
    order, self.stochastic = SOLVERS[solver]
    abar = np.cumprod(1.0 - np.asarray(betas, np.float64))
    self.timesteps, sigmas = spaced_steps(spacing, steps, abar)
    self.sigmas = np.append(sigmas, 0.0)
    if np.any(np.diff(self.sigmas) >= 0):
      raise ValueError(f"steps: {steps} {spacing!r} steps repeat a noise level of the "
                       f"{abar.shape[0]}-step process; use fewer.")
    self.num_timesteps = int(steps)
    self.orders = _orders(order, self.num_timesteps, lower_order_final)
    rows = []
    for i, o in enumerate(self.orders):
      previous = [self.sigmas[max(i - k, 0)] for k in range(3)]
      rows.append(_step_coefficients(o, self.stochastic, self.sigmas[i + 1], previous))
    self.coefficients = np.asarray(rows, np.float64)
    alphas = 1.0 / np.sqrt(1.0 + sigmas ** 2)
    # x0 = (x - sigma_vp eps) / alpha = x / alpha - sigma eps.
    self._x0_coefficients = np.stack([1.0 / alphas, sigmas], axis=1)
    self._history = order - 1

  def __repr__(self) -> str:
    return (f"DPMSolver({self.name!r}, steps={self.num_timesteps}, "
            f"spacing={self.spacing!r})")

  def _update(self, row, x0_row, model_output, x, history, noise):
    eps = model_output[..., :x.shape[-1]].astype(jnp.float32)
    m0 = x0_row[0] * x - x0_row[1] * eps
    x_next = row[0] * x + row[1] * m0
    for k, m in enumerate(history):
      x_next = x_next + row[2 + k] * m
    if self.stochastic:
      x_next = x_next + row[4] * noise
    history = ((m0,) + tuple(history[:-1])) if history else ()
    return x_next, history

  def initial_history(self, x: jax.Array) -> tuple:
    """The x0-prediction history the first step expects (zeros; their coefficients are 0)."""
    return tuple(jnp.zeros_like(x) for _ in range(self._history))

  def step(self, model_output: jax.Array, x: jax.Array, i: int, history: tuple,
           noise: Optional[jax.Array] = None):
    """One solver step i (0 .. N-1), from sigmas[i] to sigmas[i + 1].

    Args:
      model_output: [N, H, W, C or 2C] model output at (x, timesteps[i]); eps = first C.
      x: [N, H, W, C] current sample.
      i: step index (Python int or traced scalar).
      history: x0 predictions of the previous steps, newest first (`initial_history` first).
      noise: [N, H, W, C] standard normal noise, required by the SDE solver.

    Returns:
      (x_next, history for step i + 1).
    """
    if self.stochastic and noise is None:
      raise ValueError(f"{self.name}: pass noise to step().")
    row = jnp.asarray(self.coefficients, jnp.float32)[i]
    x0_row = jnp.asarray(self._x0_coefficients, jnp.float32)[i]
    return self._update(row, x0_row, model_output, x, history, noise)

  def sample_loop(self, model_fn: ModelFn, shape: Sequence[int], key: jax.Array,
                  noise: Optional[jax.Array] = None, progress: Progress = False,
                  progress_every: Optional[int] = None) -> jax.Array:
    """Samples x_0 [N, H, W, C] (float32) with one lax.scan over the N steps.

    model_fn(x [N, H, W, C], t int32 [N] original timesteps) -> [N, H, W, C or 2C]. Keys as
    in GaussianDiffusion.p_sample_loop: x_T from split(key)[0] unless `noise` is given, the
    SDE's step i noise from fold_in(split(key)[1], i). `progress` as there.
    """
    shape = tuple(shape)
    x, key_steps = loop_start(shape, key, noise)
    total = self.num_timesteps
    tick = progress_ticker(progress, progress_every, total)

    def body(carry, xs):
      x, history = carry
      i, t, row, x0_row = xs
      out = model_fn(x, jnp.full((shape[0],), t, jnp.int32))
      if out.shape[:-1] != x.shape[:-1] or out.shape[-1] not in (x.shape[-1], 2 * x.shape[-1]):
        raise ValueError(f"model_fn output: expected shape {x.shape[:-1]} + (C or 2C,) with "
                         f"C = {x.shape[-1]}, got {out.shape}.")
      z = None
      if self.stochastic:
        z = jax.random.normal(jax.random.fold_in(key_steps, i), shape, jnp.float32)
      x, history = self._update(row, x0_row, out, x, history, z)
      tick(i + 1)
      return (x, history), None

    xs = (jnp.arange(total, dtype=jnp.int32), jnp.asarray(self.timesteps),
          jnp.asarray(self.coefficients, jnp.float32),
          jnp.asarray(self._x0_coefficients, jnp.float32))
    (x, _), _ = jax.lax.scan(body, (x, self.initial_history(x)), xs)
    return x

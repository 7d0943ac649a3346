"""ODE and SDE solves for the flow samplers, on diffrax (jittable, adaptive steps inside jit).

The grids are SiT's (transport/integrators.py): N points linspace(t0, t1, N), so a fixed-grid
solve takes N - 1 steps. SiT solves its ODE with torchdiffeq ('euler', 'heun2', 'dopri5'),
here diffrax's Euler, Heun and Dopri5 (the same Butcher tableaux). Its SDE steps are
Euler-Maruyama, and a "Heun" that first adds the step's noise and then takes a deterministic
Heun step from the noised point; diffrax has no such solver, so `NoiseThenHeun` below is that
one step rule as a diffrax solver (diffrax still owns the loop, grid and Brownian increments).
"""
from __future__ import annotations

from typing import Callable, ClassVar

import diffrax
import jax
import jax.numpy as jnp
import lineax  # diffrax's own dependency: its diagonal noise operator
import numpy as np

ODE_METHODS = ("euler", "heun2", "dopri5")
SDE_METHODS = ("euler", "heun")
# Steps an adaptive solve may take before giving up (an error, not a silent wrong answer).
MAX_ADAPTIVE_STEPS = 4096

# drift(x [B, ...], t [B]) -> [B, ...] ; diffusion(t scalar) -> scalar D(t).
Drift = Callable[[jax.Array, jax.Array], jax.Array]


def shift_times(t: np.ndarray, shift: float) -> np.ndarray:
  """LightningDiT's timestep shift of a grid (t = 0 noise): t' = s t / (1 + (s - 1) t); s < 1
  puts more of the steps near the noise end, s = 1 changes nothing."""
  return shift * t / (1 + (shift - 1) * t)


def time_grid(t0: float, t1: float, num_steps: int, timestep_shift: float = 0.0) -> np.ndarray:
  """SiT's grid: num_steps float32 points from t0 to t1 (torch.linspace in float32), shifted
  by LightningDiT's timestep_shift where that is > 0."""
  if int(num_steps) != num_steps or num_steps < 2:
    raise ValueError(f"num_steps: expected an integer >= 2 (grid points), got {num_steps!r}.")
  if timestep_shift < 0:
    raise ValueError(f"timestep_shift: expected >= 0 (0: none), got {timestep_shift!r}.")
  ts = np.linspace(t0, t1, int(num_steps), dtype=np.float64).astype(np.float32)
  return shift_times(ts, np.float32(timestep_shift)).astype(np.float32) if timestep_shift else ts


def _batched(fn: Drift) -> Callable:
  """diffrax's vector field (t scalar, y, args) -> fn(y, t broadcast to [B])."""
  def vf(t, y, args):
    del args
    return fn(y, jnp.full((y.shape[0],), t, y.dtype))
  return vf


def _final(sol: diffrax.Solution) -> jax.Array:
  """The state at t1; NaN where the solve failed (dopri5 past MAX_ADAPTIVE_STEPS).

  Solves run with throw=False: diffrax's runtime error is a host callback that XLA pins to
  one device, which drags the whole loop, batch and all, onto device 0 of a sharded batch.
  """
  return jnp.where(sol.result == diffrax.RESULTS.successful, sol.ys[-1], jnp.nan)


def solve_ode(drift: Drift, x: jax.Array, t0: float, t1: float, *, method: str = "dopri5",
              num_steps: int = 50, atol: float = 1e-6, rtol: float = 1e-3,
              timestep_shift: float = 0.0) -> jax.Array:
  """x(t1) of dx/dt = drift(x, t) from x(t0) = x.

  euler/heun2 step on time_grid(t0, t1, num_steps, timestep_shift); dopri5 is adaptive (PID
  controller with atol, rtol; num_steps unused: SiT's num_steps only sets where torchdiffeq
  saves; a timestep shift is refused there).
  """
  if method not in ODE_METHODS:
    raise ValueError(f"method: got {method!r}, expected one of {list(ODE_METHODS)}.")
  term = diffrax.ODETerm(_batched(drift))
  if method == "dopri5":
    if timestep_shift:
      raise ValueError("timestep_shift: the adaptive dopri5 has no grid to shift; use euler "
                       "or heun2")
    solver, dt0 = diffrax.Dopri5(), None
    controller = diffrax.PIDController(rtol=rtol, atol=atol)
    max_steps = MAX_ADAPTIVE_STEPS
  else:
    solver = diffrax.Euler() if method == "euler" else diffrax.Heun()
    ts = time_grid(t0, t1, num_steps, timestep_shift)
    controller, dt0, max_steps = diffrax.StepTo(ts=jnp.asarray(ts)), None, len(ts)
    t0, t1 = float(ts[0]), float(ts[-1])
  sol = diffrax.diffeqsolve(term, solver, t0, t1, dt0, x, stepsize_controller=controller,
                            saveat=diffrax.SaveAt(t1=True), max_steps=max_steps, throw=False)
  return _final(sol)


class NoiseThenHeun(diffrax.AbstractItoSolver):
  """SiT's SDE "Heun" step for additive noise: x^ = x + g(t0) dW, then Heun on the drift:
  k1 = f(x^, t0), k2 = f(x^ + dt k1, t1), x' = x^ + dt (k1 + k2) / 2."""

  term_structure: ClassVar = diffrax.MultiTerm[tuple[diffrax.ODETerm, diffrax.AbstractTerm]]
  interpolation_cls: ClassVar = diffrax.LocalLinearInterpolation

  def order(self, terms):
    return 2

  def strong_order(self, terms):
    return 0.5

  def init(self, terms, t0, t1, y0, args):
    return None

  def step(self, terms, t0, t1, y0, args, solver_state, made_jump):
    del solver_state, made_jump
    drift, noise = terms.terms
    dt = drift.contr(t0, t1)
    x_hat = jax.tree.map(jnp.add, y0, noise.vf_prod(t0, y0, args, noise.contr(t0, t1)))
    k1 = drift.vf(t0, x_hat, args)
    x_pred = jax.tree.map(lambda x, k: x + dt * k, x_hat, k1)
    k2 = drift.vf(t1, x_pred, args)
    y1 = jax.tree.map(lambda x, a, b: x + 0.5 * dt * (a + b), x_hat, k1, k2)
    return y1, None, dict(y0=y0, y1=y1), None, diffrax.RESULTS.successful

  def func(self, terms, t0, y0, args):
    return terms.vf(t0, y0, args)


def solve_sde(drift: Drift, diffusion: Callable[[jax.Array], jax.Array], x: jax.Array,
              key: jax.Array, ts: np.ndarray, *, method: str = "euler") -> jax.Array:
  """x at ts[-1] of dx = drift(x, t) dt + sqrt(2 D(t)) dW on the fixed grid ts.

  diffusion: t (scalar) -> D(t) (SiT's forms depend on t only: the noise is additive).
  euler: Euler-Maruyama (SiT's Euler); heun: NoiseThenHeun (SiT's Heun).
  """
  if method not in SDE_METHODS:
    raise ValueError(f"method: got {method!r}, expected one of {list(SDE_METHODS)}.")
  brownian = diffrax.UnsafeBrownianPath(shape=jax.ShapeDtypeStruct(x.shape, x.dtype), key=key)
  noise = diffrax.ControlTerm(
      lambda t, y, args: lineax.DiagonalLinearOperator(
          jnp.broadcast_to(jnp.sqrt(2 * diffusion(t)).astype(y.dtype), y.shape)), brownian)
  terms = diffrax.MultiTerm(diffrax.ODETerm(_batched(drift)), noise)
  solver = diffrax.Euler() if method == "euler" else NoiseThenHeun()
  sol = diffrax.diffeqsolve(terms, solver, float(ts[0]), float(ts[-1]), None, x,
                            stepsize_controller=diffrax.StepTo(ts=jnp.asarray(ts)),
                            saveat=diffrax.SaveAt(t1=True), max_steps=len(ts), throw=False,
                            adjoint=diffrax.ForwardMode())  # UnsafeBrownianPath needs it
  return _final(sol)

"""SiT's interpolation paths x_t = alpha_t x1 + sigma_t x0 (x0 noise at t = 0, x1 data at t = 1).

Each path is a set of pure functions of t (any shape, broadcast against x by the caller), with
SiT's formulas kept term for term (transport/path.py of github.com/willisma/SiT) so released
SiT weights see the same numbers: Linear (SiT's ICPlan), GVP (GVPCPlan: cos/sin) and VP
(VPCPlan: the variance-preserving SDE with beta from 0.1 to 20, reversed so t = 1 is data).
"""
from __future__ import annotations

import dataclasses
import math
from typing import Callable

import jax.numpy as jnp

PATHS = ("Linear", "GVP", "VP")
# SiT's diffusion forms D(t) of the reverse SDE dx = [v + D s] dt + sqrt(2 D) dW.
DIFFUSION_FORMS = ("constant", "SBDM", "sigma", "linear", "decreasing", "increasing-decreasing")


@dataclasses.dataclass(frozen=True)
class Path:
  """One interpolation path. Every method takes t already broadcast against x."""
  name: str
  sigma_min: float = 0.1   # VP only
  sigma_max: float = 20.0  # VP only

  def __post_init__(self):
    if self.name not in PATHS:
      raise ValueError(f"path_type: got {self.name!r}, expected one of {list(PATHS)}.")

  # The VP path's log alpha_t and its derivative.
  def _log_mean_coeff(self, t):
    return (-0.25 * (1 - t) ** 2 * (self.sigma_max - self.sigma_min)
            - 0.5 * (1 - t) * self.sigma_min)

  def _d_log_mean_coeff(self, t):
    return 0.5 * (1 - t) * (self.sigma_max - self.sigma_min) + 0.5 * self.sigma_min

  def alpha(self, t):
    """(alpha_t, d alpha_t / dt): the data coefficient."""
    if self.name == "Linear":
      return t, jnp.ones_like(t)
    if self.name == "GVP":
      return jnp.sin(t * math.pi / 2), math.pi / 2 * jnp.cos(t * math.pi / 2)
    a = jnp.exp(self._log_mean_coeff(t))
    return a, a * self._d_log_mean_coeff(t)

  def sigma(self, t):
    """(sigma_t, d sigma_t / dt): the noise coefficient."""
    if self.name == "Linear":
      return 1 - t, -jnp.ones_like(t)
    if self.name == "GVP":
      return jnp.cos(t * math.pi / 2), -math.pi / 2 * jnp.sin(t * math.pi / 2)
    p = 2 * self._log_mean_coeff(t)
    s = jnp.sqrt(1 - jnp.exp(p))
    return s, jnp.exp(p) * (2 * self._d_log_mean_coeff(t)) / (-2 * s)

  def d_alpha_alpha_ratio(self, t):
    """alpha_t' / alpha_t in SiT's numerically stable form per path."""
    if self.name == "Linear":
      return 1 / t
    if self.name == "GVP":
      return math.pi / (2 * jnp.tan(t * math.pi / 2))
    return self._d_log_mean_coeff(t)

  def _beta(self, t):  # VP only
    return self.sigma_min + (1 - t) * (self.sigma_max - self.sigma_min)

  def drift_var(self, t):
    """D_t = alpha_t'/alpha_t sigma_t^2 - sigma_t sigma_t' (beta_t / 2 on VP)."""
    if self.name == "VP":
      return self._beta(t) / 2
    s, ds = self.sigma(t)
    return self.d_alpha_alpha_ratio(t) * s ** 2 - s * ds

  def drift(self, x, t):
    """(f, D): the probability-flow ODE is dx/dt = -f + D * score = ratio x + D score."""
    if self.name == "VP":
      return -0.5 * self._beta(t) * x, self.drift_var(t)
    return -self.d_alpha_alpha_ratio(t) * x, self.drift_var(t)

  def diffusion(self, t, form: str = "sigma", norm: float = 1.0):
    """D(t) of the reverse SDE in SiT's named forms (the noise is sqrt(2 D) dW)."""
    forms: dict[str, Callable] = {
        "constant": lambda: norm * jnp.ones_like(t),
        "SBDM": lambda: norm * self.drift_var(t),
        "sigma": lambda: norm * self.sigma(t)[0],
        "linear": lambda: norm * (1 - t),
        "decreasing": lambda: 0.25 * (norm * jnp.cos(math.pi * t) + 1) ** 2,
        "increasing-decreasing": lambda: norm * jnp.sin(math.pi * t) ** 2,
    }
    if form not in forms:
      raise ValueError(f"diffusion_form: got {form!r}, expected one of {list(DIFFUSION_FORMS)}.")
    return forms[form]()

  def score_from_velocity(self, v, x, t):
    """grad log p_t(x) from the velocity (SiT's get_score_from_velocity)."""
    a, da = self.alpha(t)
    s, ds = self.sigma(t)
    r = a / da
    var = s ** 2 - r * ds * s
    return (r * v - x) / var

  def interpolate(self, t, x0, x1):
    """(x_t, u_t): the point on the path and its velocity d x_t / dt."""
    a, da = self.alpha(t)
    s, ds = self.sigma(t)
    return a * x1 + s * x0, da * x1 + ds * x0

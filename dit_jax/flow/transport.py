"""SiT's transport (Ma et al., 2024): flow-matching losses and ODE/SDE samplers in JAX.

Time runs from t = 0 (noise x0 ~ N(0, I)) to t = 1 (data x1); the model sees t in [0, 1], as
SiT's released weights expect. `create_transport` takes SiT's arguments and applies its
train_eps/sample_eps rules; the formulas follow github.com/willisma/SiT transport/ term for
term. Every method is a pure function of arrays (jittable); images are NHWC.

  from dit_jax import flow
  transport = flow.create_transport("Linear", "velocity")
  terms = transport.training_losses(model_fn, x1, t, noise)           # terms["loss"]: [B]
  x = transport.sample_ode(model_fn, noise, method="dopri5")           # or "euler", "heun2"
  x = transport.sample_sde(model_fn, noise, key, num_steps=250)        # SiT's SDE sampler
"""
from __future__ import annotations

import dataclasses
from typing import Optional

import jax
import jax.numpy as jnp

from dit_jax.diffusion.losses import mean_flat
from dit_jax.flow import samplers
from dit_jax.flow.paths import DIFFUSION_FORMS
from dit_jax.flow.paths import Path
from dit_jax.guidance import ModelFn  # here: t float32 [B] in [0, 1], a [B, H, W, C] prediction

PREDICTIONS = ("velocity", "score", "noise")
LOSS_WEIGHTS = (None, "velocity", "likelihood")
TIME_SAMPLINGS = ("uniform", "logit_normal")
LAST_STEPS = (None, "mean", "tweedie", "euler")

def _expand(t: jax.Array, x: jax.Array) -> jax.Array:
  return jnp.reshape(t, t.shape + (1,) * (x.ndim - t.ndim))


@dataclasses.dataclass(frozen=True)
class Transport:
  """A path, what the model predicts, the loss weighting, the time interval and its sampling.

  Attributes:
    path: the interpolation x_t = alpha_t x1 + sigma_t x0 (paths.Path).
    prediction: 'velocity' (dx_t/dt), 'score' (grad log p_t) or 'noise' (x0).
    loss_weight: None, 'velocity' or 'likelihood' (score and noise predictions only, as SiT).
    train_eps, sample_eps: the time interval is shrunk by these where the path or prediction
      is singular (see `interval`).
    time_sampling: 'uniform' (SiT) or 'logit_normal' (SD3: the noise level 1 - u is
      sigmoid(N(logit_mean, logit_std^2)), so logit_mean > 0 favours noisier times).
    cosine_loss: LightningDiT's use_cosine_loss (velocity only): the MSE plus the mean over
      pixels of 1 - cos(v_pred, v) over channels.
  """
  path: Path
  prediction: str = "velocity"
  loss_weight: Optional[str] = None
  train_eps: float = 0.0
  sample_eps: float = 0.0
  time_sampling: str = "uniform"
  logit_mean: float = 0.0
  logit_std: float = 1.0
  cosine_loss: bool = False

  # --- time ---------------------------------------------------------------------------------
  def interval(self, *, sde: bool = False, sampling: bool = False,
               diffusion_form: str = "SBDM", last_step_size: float = 0.0) -> tuple[float, float]:
    """(t0, t1) as SiT's check_interval: training, ODE or SDE sampling."""
    eps = self.sample_eps if sampling else self.train_eps
    t0, t1 = 0.0, 1.0
    end = 1 - eps if (not sde or last_step_size == 0) else 1 - last_step_size
    if self.path.name == "VP":
      t1 = end
    elif self.prediction != "velocity" or sde:
      # Linear/GVP: the score and noise parametrisations are singular at the ends.
      t0 = eps if (diffusion_form == "SBDM" and sde) or self.prediction != "velocity" else 0.0
      t1 = end
    return float(t0), float(t1)

  def sample_t(self, key: jax.Array, batch: int) -> jax.Array:
    """float32 [batch] training times in the training interval, uniform or logit-normal."""
    t0, t1 = self.interval()
    if self.time_sampling == "uniform":
      u = jax.random.uniform(key, (batch,), jnp.float32)
    else:
      z = self.logit_mean + self.logit_std * jax.random.normal(key, (batch,), jnp.float32)
      u = 1 - jax.nn.sigmoid(z)
    return u * (t1 - t0) + t0

  # --- training -----------------------------------------------------------------------------
  def training_losses(self, model_fn: ModelFn, x1: jax.Array, t: jax.Array,
                      noise: jax.Array) -> dict[str, jax.Array]:
    """SiT's loss per example.

    Args:
      model_fn: f(x_t [B, H, W, C], t [B]) -> prediction [B, H, W, C].
      x1: data [B, H, W, C].
      t: float [B] times (`sample_t`); noise: x0 [B, H, W, C].

    Returns:
      {"loss": [B], "pred": the model output, "t": [B]}.
    """
    tx = _expand(t, x1)
    xt, ut = self.path.interpolate(tx, noise, x1)
    out = model_fn(xt, t)
    if out.shape != x1.shape:
      raise ValueError(f"model_fn: output shape {out.shape} differs from x {x1.shape} (take "
                       "the first C channels of a learn_sigma model's output).")
    if self.prediction == "velocity":
      loss = mean_flat((out - ut) ** 2)
      if self.cosine_loss:  # LightningDiT's use_cosine_loss: 1 - cos over channels, added
        loss = loss + mean_flat(1 - cosine_similarity(out, ut))
    else:
      _, drift_var = self.path.drift(xt, tx)
      sigma_t, _ = self.path.sigma(tx)
      weight = {None: 1.0, "velocity": (drift_var / sigma_t) ** 2,
                "likelihood": drift_var / sigma_t ** 2}[self.loss_weight]
      if self.prediction == "noise":
        loss = mean_flat(weight * (out - noise) ** 2)
      else:
        loss = mean_flat(weight * (out * sigma_t + noise) ** 2)
    return {"loss": loss, "pred": out, "t": t}

  # --- the model as an ODE drift and a score -----------------------------------------------
  def ode_drift(self, model_fn: ModelFn) -> samplers.Drift:
    """(x, t) -> dx/dt of the probability-flow ODE from the model's prediction."""
    def drift(x, t):
      out = model_fn(x, t)
      if self.prediction == "velocity":
        return out
      tx = _expand(t, x)
      f, d = self.path.drift(x, tx)
      score = out if self.prediction == "score" else out / -self.path.sigma(tx)[0]
      return -f + d * score
    return drift

  def score(self, model_fn: ModelFn) -> samplers.Drift:
    """(x, t) -> grad log p_t(x) from the model's prediction."""
    def score(x, t):
      out = model_fn(x, t)
      tx = _expand(t, x)
      if self.prediction == "score":
        return out
      if self.prediction == "noise":
        return out / -self.path.sigma(tx)[0]
      return self.path.score_from_velocity(out, x, tx)
    return score

  # --- sampling -----------------------------------------------------------------------------
  def sample_ode(self, model_fn: ModelFn, noise: jax.Array, method: str = "dopri5",
                 num_steps: int = 50, atol: float = 1e-6, rtol: float = 1e-3,
                 timestep_shift: float = 0.0) -> jax.Array:
    """Samples [B, H, W, C] from noise [B, H, W, C] by the probability-flow ODE.

    euler and heun2 step on SiT's grid of num_steps points from t0 to t1 (num_steps - 1
    steps; heun2 calls the model twice per step), shifted by LightningDiT's timestep_shift
    where > 0; dopri5 is adaptive (atol, rtol).
    """
    t0, t1 = self.interval(sampling=True)
    return samplers.solve_ode(self.ode_drift(model_fn), noise, t0, t1, method=method,
                              num_steps=num_steps, atol=atol, rtol=rtol,
                              timestep_shift=timestep_shift)

  def sample_sde(self, model_fn: ModelFn, noise: jax.Array, key: jax.Array,
                 method: str = "euler", diffusion_form: str = "sigma",
                 diffusion_norm: float = 1.0, last_step: Optional[str] = "mean",
                 last_step_size: float = 0.04, num_steps: int = 250) -> jax.Array:
    """Samples [B, H, W, C] by SiT's reverse SDE dx = [v + D s] dt + sqrt(2 D) dW.

    num_steps - 1 SDE steps on linspace(t0, t1, num_steps) with t1 = 1 - last_step_size,
    then the last step to t = 1: 'mean' (an SDE drift step without noise), 'tweedie'
    (E[x1 | x_t1]), 'euler' (an ODE drift step) or None (stop at t1 = 1 - sample_eps).
    method: 'euler' (Euler-Maruyama) or 'heun' (noise, then a Heun step; 2 calls a step).
    """
    last_step = last_step.lower() if isinstance(last_step, str) else last_step
    if last_step not in LAST_STEPS:
      raise ValueError(f"last_step: got {last_step!r}, expected one of {list(LAST_STEPS)}.")
    if last_step is None:
      last_step_size = 0.0
    t0, t1 = self.interval(sde=True, sampling=True, diffusion_form=diffusion_form,
                           last_step_size=last_step_size)
    if diffusion_form == "SBDM" and t0 == 0 and self.path.name != "VP":
      raise ValueError(f"diffusion_form='SBDM' is infinite at t0 = 0 on the {self.path.name} "
                       "path (sample_eps is 0 for velocity models, as in SiT): use another "
                       "form, or a score/noise prediction (sample_eps > 0).")
    if diffusion_form not in DIFFUSION_FORMS:
      raise ValueError(f"diffusion_form: got {diffusion_form!r}, expected one of "
                       f"{list(DIFFUSION_FORMS)}.")

    ode_drift, score = self.ode_drift(model_fn), self.score(model_fn)

    def diffusion(t):
      return self.path.diffusion(t, diffusion_form, diffusion_norm)

    def sde_drift(x, t):
      return ode_drift(x, t) + diffusion(_expand(t, x)) * score(x, t)

    x = samplers.solve_sde(sde_drift, diffusion, noise, key,
                           samplers.time_grid(t0, t1, num_steps), method=method)
    t_end = jnp.full((x.shape[0],), t1, x.dtype)
    if last_step == "mean":
      return x + sde_drift(x, t_end) * last_step_size
    if last_step == "euler":
      return x + ode_drift(x, t_end) * last_step_size
    if last_step == "tweedie":
      alpha, sigma = self.path.alpha(jnp.float32(t1))[0], self.path.sigma(jnp.float32(t1))[0]
      return x / alpha + sigma ** 2 / alpha * score(x, t_end)
    return x


def cosine_similarity(a: jax.Array, b: jax.Array, eps: float = 1e-8) -> jax.Array:
  """torch's cosine_similarity over the channel (last) axis: a.b / max(|a| |b|, eps)."""
  dot = jnp.sum(a * b, axis=-1)
  norms = jnp.sqrt(jnp.sum(a * a, axis=-1) * jnp.sum(b * b, axis=-1))
  return dot / jnp.maximum(norms, eps)


def create_transport(path_type: str = "Linear", prediction: str = "velocity",
                     loss_weight: Optional[str] = None, train_eps: Optional[float] = None,
                     sample_eps: Optional[float] = None, *, time_sampling: str = "uniform",
                     logit_mean: float = 0.0, logit_std: float = 1.0,
                     cosine_loss: bool = False) -> Transport:
  """SiT's create_transport: the defaults of train_eps and sample_eps by path and prediction.

  VP: train_eps 1e-5, sample_eps 1e-3. Linear/GVP predicting score or noise: 1e-3 both.
  Linear/GVP predicting velocity: 0 (stable everywhere; given values are ignored, as SiT).
  Unlike SiT, a given sample_eps is kept when train_eps is left None (SiT drops it).
  """
  if prediction not in PREDICTIONS:
    raise ValueError(f"prediction: got {prediction!r}, expected one of {list(PREDICTIONS)}.")
  if isinstance(loss_weight, str) and loss_weight.lower() in ("", "none"):
    loss_weight = None
  if loss_weight not in LOSS_WEIGHTS:
    raise ValueError(f"loss_weight: got {loss_weight!r}, expected one of {list(LOSS_WEIGHTS)}.")
  if time_sampling not in TIME_SAMPLINGS:
    raise ValueError(f"time_sampling: got {time_sampling!r}, expected one of "
                     f"{list(TIME_SAMPLINGS)}.")
  if not logit_std > 0:
    raise ValueError(f"logit_std: expected > 0, got {logit_std!r}.")
  if cosine_loss and prediction != "velocity":
    raise ValueError("cosine_loss: LightningDiT's direction loss is for velocity prediction, "
                     f"not {prediction!r}.")
  path = Path(path_type)
  if path_type == "VP":
    train_eps = 1e-5 if train_eps is None else train_eps
    sample_eps = 1e-3 if sample_eps is None else sample_eps
  elif prediction != "velocity":
    train_eps = 1e-3 if train_eps is None else train_eps
    sample_eps = 1e-3 if sample_eps is None else sample_eps
  else:
    train_eps = sample_eps = 0.0
  for name, eps in (("train_eps", train_eps), ("sample_eps", sample_eps)):
    if not 0 <= eps < 0.5:
      raise ValueError(f"{name}: expected a value in [0, 0.5), got {eps!r}.")
  return Transport(path, prediction, loss_weight, float(train_eps), float(sample_eps),
                   time_sampling, float(logit_mean), float(logit_std), bool(cosine_loss))

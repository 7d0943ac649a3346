"""SiT's objective: flow matching (dit_jax.flow's transport); the model sees float32 time
t in [0, 1], 0 noise and 1 data."""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Optional, Sequence

import jax
import jax.numpy as jnp
import ml_collections

from dit_jax import flow, guidance
from dit_jax.objectives import base

# The network's time conventions (`network_time`).
NETWORK_TIMES = ("sit", "repa")
# The ODE's samplers (euler, heun2, dopri5) and SiT's SDE's (sde-euler, sde-heun).
SAMPLERS = ("euler", "heun2", "dopri5", "sde-euler", "sde-heun")
# Grid points when none are given (SiT's sample.py uses 250; dopri5 adapts its steps).
DEFAULT_STEPS = {"euler": 250, "heun2": 250, "dopri5": 50, "sde-euler": 250, "sde-heun": 250}
# timestep_shift: LightningDiT's shift of the euler/heun2 grid (0: none; it uses 0.3).
_ODE_OPTIONS = {"atol": 1e-6, "rtol": 1e-3, "timestep_shift": 0.0}
_SDE_OPTIONS = {"diffusion_form": "sigma", "diffusion_norm": 1.0, "last_step": "mean",
                "last_step_size": 0.04}


@base.register
@dataclasses.dataclass(frozen=True)
class Flow(base.ObjectiveBase):
  """SiT's flow matching: path, prediction, loss weight and training times of `transport`."""
  transport: flow.Transport
  learn_sigma: bool = True
  network_time: str = "sit"

  name = "flow"
  samplers = SAMPLERS
  default_sampler = "sde-euler"
  default_steps = DEFAULT_STEPS
  # The ODE's tolerances (dopri5) and the SDE's diffusion and last step, as Transport's.
  sampler_options = {**_ODE_OPTIONS, **_SDE_OPTIONS}
  time_dtype = jnp.float32

  @classmethod
  def config_fields(cls) -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    # Flow only. Path x_t = alpha_t x1 + sigma_t x0: 'Linear' (SiT's best), 'GVP' or 'VP'.
    c.path_type = "Linear"
    # Flow only. What the model predicts: 'velocity' (SiT), 'score' or 'noise'.
    c.prediction = "velocity"
    # Flow only. Loss weighting of score/noise predictions: '' (none), 'velocity', 'likelihood'.
    c.loss_weight = ""
    # Flow only. Interval shrinkage at singular ends; -1: SiT's defaults by path and prediction.
    c.train_eps = -1.0
    c.sample_eps = -1.0
    # Flow only. Training times: 'uniform' (SiT) or 'logit_normal' (SD3: noise level 1 - t ~
    # sigmoid(N(logit_mean, logit_std^2))).
    c.time_sampling = "uniform"
    c.logit_mean = 0.0
    c.logit_std = 1.0
    # Flow only. LightningDiT's velocity-direction loss: + mean(1 - cos(v_pred, v) over
    # channels) beside the MSE (velocity prediction).
    c.cosine_loss = False
    # Flow only. The network's own time: 'sit' (0 noise, 1 data; it predicts data - noise) or
    # 'repa' (REPA's SiT: 0 data, 1 noise; it predicts noise - data). The path, the samplers
    # and guidance intervals stay in SiT's time; only the network's input and output flip.
    c.network_time = "sit"
    return c

  @classmethod
  def _build(cls, fields: Mapping[str, Any], learn_sigma: bool, where: str) -> "Flow":
    eps = lambda v: None if v is None or float(v) < 0 else float(v)
    try:
      transport = flow.create_transport(
          fields["path_type"], fields["prediction"], fields["loss_weight"] or None,
          eps(fields["train_eps"]), eps(fields["sample_eps"]),
          time_sampling=fields["time_sampling"], logit_mean=float(fields["logit_mean"]),
          logit_std=float(fields["logit_std"]), cosine_loss=bool(fields.get("cosine_loss",
                                                                             False)))
    except ValueError as e:
      raise ValueError(f"{where}.{e}") from None
    network_time = str(fields.get("network_time", "sit"))
    if network_time not in NETWORK_TIMES:
      raise ValueError(f"{where}.network_time={network_time!r}: choose one of {NETWORK_TIMES}")
    return cls(transport, bool(learn_sigma), network_time)

  def _net(self, model_fn: guidance.ModelFn) -> guidance.ModelFn:
    """The velocity in SiT's time (0 noise, 1 data) from the network, whatever its own time."""
    fn = base.first_channels(model_fn)
    if self.network_time == "sit":
      return fn
    return lambda x, t: -fn(x, 1.0 - t)  # REPA's t' = 1 - t, and v' = noise - data = -v

  def draw(self, k_t: jax.Array, k_noise: jax.Array, x0: jax.Array) -> dict[str, jax.Array]:
    """t float32 [B] in the training interval (uniform or logit-normal); noise like x0."""
    return {"t": self.transport.sample_t(k_t, x0.shape[0]),
            "noise": base.draw_noise(k_noise, x0)}

  def training_losses(self, model_fn: guidance.ModelFn, x0: jax.Array,
                      inputs: Mapping[str, jax.Array]) -> tuple[jax.Array, dict]:
    """(loss [B], logged) of SiT's loss on data x0 (SiT's x1); logged: the mean loss in each
    quarter of t (loss_t0 .. loss_t3, t0 nearest noise)."""
    t = inputs["t"]
    loss = self.transport.training_losses(self._net(model_fn), x0, t,
                                          inputs["noise"])["loss"]
    quarter = jnp.clip((t * 4).astype(jnp.int32), 0, 3)
    return loss, base.binned_means(loss, quarter, 4, "loss_t")

  def sampler(self, sampler: Optional[str] = None, steps: Optional[int] = None,
              **options: Any) -> base.Sampler:
    """steps: SiT's num_steps (grid points; default DEFAULT_STEPS). Options: atol, rtol,
    timestep_shift (ODE); diffusion_form, diffusion_norm, last_step, last_step_size (SDE)."""
    sampler = base.check_sampler(self, sampler)
    steps = steps or self.default_steps[sampler]
    sde = sampler.startswith("sde-")
    opts = base.own_options(self, options)
    mine, other = (_SDE_OPTIONS, _ODE_OPTIONS) if sde else (_ODE_OPTIONS, _SDE_OPTIONS)
    for key, value in opts.items():
      if key in other and value != other[key]:
        raise ValueError(f"{key}={value!r} is for the {'ODE' if sde else 'SDE'} samplers, "
                         f"not {sampler}")
    kwargs = {k: v for k, v in opts.items() if k in mine}

    def run(model_fn, noise, key):
      fn = self._net(model_fn)
      if sde:
        return self.transport.sample_sde(fn, noise, key, method=sampler[4:], num_steps=steps,
                                         **kwargs)
      return self.transport.sample_ode(fn, noise, method=sampler, num_steps=steps, **kwargs)
    return run

  def guidance_predicate(self, interval: Optional[Sequence[float]]) -> Optional[
      guidance.Predicate]:
    """(t_lo, t_hi) in flow time: guide where lo <= t <= hi."""
    interval = guidance.check_interval(interval, "t", lambda lo, hi: lo == 0 and hi >= 1)
    if interval is None:
      return None
    lo, hi = interval
    if self.network_time == "repa":  # the guided network sees its own time, 1 - t
      return lambda t: (1.0 - t >= lo) & (1.0 - t <= hi)
    return lambda t: (t >= lo) & (t <= hi)

  def to_meta(self) -> dict:
    tr = self.transport
    return {"name": "flow", "path_type": tr.path.name, "prediction": tr.prediction,
            "loss_weight": tr.loss_weight or "", "train_eps": tr.train_eps,
            "sample_eps": tr.sample_eps, "time_sampling": tr.time_sampling,
            "logit_mean": tr.logit_mean, "logit_std": tr.logit_std,
            **({"cosine_loss": True} if tr.cosine_loss else {}),
            **({"network_time": self.network_time} if self.network_time != "sit" else {})}

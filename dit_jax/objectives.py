"""The training objective, one object built in one place: ADM diffusion or flow matching (SiT).

Built from config (`from_config`: config.objective.name, 'adm' or 'flow', with the flow fields;
ADM reads config.diffusion as before) or from a checkpoint's meta (`from_meta`; checkpoints
written before objectives existed hold only meta["diffusion"] and are ADM). It owns how t is
drawn, the per-example loss and the metrics to log, the samplers it offers, and its meta record.

  objective = objectives.from_config(config)
  loss, logged = objective.training_losses(model_fn, x0, key)   # loss [B]; logged: scalars
  x = objective.sample(model_fn, noise, key, sampler="dopri5", steps=50)

`model_fn(x [B, H, W, C], t [B]) -> [B, H, W, K]` is the DiT's raw output (K = 2C with
learn_sigma). t is in the objective's model units: ADM's int32 timesteps 0 .. steps - 1, or
flow time float32 in [0, 1] (0 noise, 1 data); the DiT embeds either with the same function.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping, Optional, Sequence

import jax
import jax.numpy as jnp
import ml_collections

from dit_jax import diffusion as adm
from dit_jax import flow

OBJECTIVES = ("adm", "flow")
# The flow samplers: the ODE's (euler, heun2, dopri5) and SiT's SDE (sde-euler, sde-heun).
FLOW_SAMPLERS = ("euler", "heun2", "dopri5", "sde-euler", "sde-heun")
# Grid points when none are given (SiT's sample.py uses 250; dopri5 adapts its steps).
FLOW_DEFAULT_STEPS = {"euler": 250, "heun2": 250, "dopri5": 50, "sde-euler": 250,
                      "sde-heun": 250}

ModelFn = Callable[[jax.Array, jax.Array], jax.Array]


def default_config() -> ml_collections.ConfigDict:
  """config.objective with its defaults (ADM; the flow fields are SiT's defaults)."""
  c = ml_collections.ConfigDict()
  # 'adm' (DiT's diffusion, settings in config.diffusion) or 'flow' (SiT's flow matching).
  c.name = "adm"
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
  return c


@dataclasses.dataclass(frozen=True)
class ADM:
  """DiT's ADM diffusion (dit_jax.diffusion, unchanged): hybrid loss, DDPM/DDIM/DPM-Solver++."""
  steps: int = 1000
  noise_schedule: str = "linear"
  learn_sigma: bool = True

  name = "adm"
  samplers = adm.SAMPLERS
  default_steps = adm.DEFAULT_STEPS
  default_sampler = "ddpm"

  @property
  def diffusion(self) -> adm.GaussianDiffusion:
    return adm.create_diffusion("", noise_schedule=self.noise_schedule,
                                learn_sigma=self.learn_sigma, diffusion_steps=self.steps)

  def sample_t(self, key: jax.Array, batch: int) -> jax.Array:
    """int32 [batch] timesteps, uniform in [0, steps)."""
    return jax.random.randint(key, (batch,), 0, self.steps)

  def training_losses(self, model_fn: ModelFn, x0: jax.Array, key: Optional[jax.Array] = None,
                      *, t: Optional[jax.Array] = None,
                      noise: Optional[jax.Array] = None) -> tuple[jax.Array, dict]:
    """(loss [B], {"mse", "vb"} batch means) of the release's hybrid loss.

    t and noise are drawn from key when not given: k_t, k_noise = split(key).
    """
    t, noise = _draw(self, key, x0, t, noise)
    terms = self.diffusion.training_losses(model_fn, x0, t, noise=noise)
    return terms["loss"], {"mse": terms["mse"].mean(), "vb": terms["vb"].mean()}

  def sample(self, model_fn: ModelFn, noise: jax.Array, key: jax.Array,
             sampler: Optional[str] = None, steps: Optional[int] = None,
             **options: Any) -> jax.Array:
    """x_0 [B, H, W, C] from noise [B, H, W, C]; options: spacing, respacing, eta
    (see diffusion.create_sampler)."""
    process = adm.create_sampler(sampler or self.default_sampler, steps,
                                 noise_schedule=self.noise_schedule,
                                 diffusion_steps=self.steps, learn_sigma=self.learn_sigma,
                                 **options)
    return process.sample(model_fn, noise.shape, key, noise=noise)

  def make_sample_fn(self, model: Any, **kwargs: Any) -> Callable:
    """sampling.make_sample_fn with this process: jitted (params, key, labels, cfg_scale) ->
    latents. sampler None or '': DDPM (DDIM for a 'ddimN' respacing)."""
    from dit_jax import sampling  # pylint: disable=import-outside-toplevel (TensorFlow)
    kwargs["sampler"] = kwargs.get("sampler") or None
    return sampling.make_sample_fn(model, diffusion_steps=self.steps,
                                   noise_schedule=self.noise_schedule, **kwargs)

  def to_meta(self) -> dict:
    return {"name": "adm", "steps": self.steps, "noise_schedule": self.noise_schedule}


@dataclasses.dataclass(frozen=True)
class Flow:
  """SiT's flow matching (dit_jax.flow): the model sees t in [0, 1]."""
  transport: flow.Transport
  learn_sigma: bool = True

  name = "flow"
  samplers = FLOW_SAMPLERS
  default_steps = FLOW_DEFAULT_STEPS
  default_sampler = "sde-euler"

  def sample_t(self, key: jax.Array, batch: int) -> jax.Array:
    """float32 [batch] flow times in the training interval (uniform or logit-normal)."""
    return self.transport.sample_t(key, batch)

  def training_losses(self, model_fn: ModelFn, x0: jax.Array, key: Optional[jax.Array] = None,
                      *, t: Optional[jax.Array] = None,
                      noise: Optional[jax.Array] = None) -> tuple[jax.Array, dict]:
    """(loss [B], logged) of SiT's loss on data x0 (SiT's x1); logged: the mean loss in each
    quarter of t (loss_t0 .. loss_t3, t0 nearest noise). Draws as ADM.training_losses."""
    t, noise = _draw(self, key, x0, t, noise)
    loss = self.transport.training_losses(flow.first_channels(model_fn), x0, t=t,
                                          noise=noise)["loss"]
    quarter = jnp.clip((t * 4).astype(jnp.int32), 0, 3)
    logged = {}
    for q in range(4):
      mask = (quarter == q).astype(loss.dtype)
      logged[f"loss_t{q}"] = (mask * loss).sum() / jnp.maximum(mask.sum(), 1)
    return loss, logged

  def sample(self, model_fn: ModelFn, noise: jax.Array, key: jax.Array,
             sampler: Optional[str] = None, steps: Optional[int] = None,
             **options: Any) -> jax.Array:
    """Data [B, H, W, C] from noise [B, H, W, C].

    sampler: one of FLOW_SAMPLERS; steps: SiT's num_steps (grid points; default
    FLOW_DEFAULT_STEPS). options: atol, rtol (ODE); diffusion_form, diffusion_norm, last_step,
    last_step_size (SDE), as Transport.sample_ode / sample_sde.
    """
    sampler = sampler or self.default_sampler
    if sampler not in self.samplers:
      raise ValueError(f"sampler: got {sampler!r}, the flow objective offers "
                       f"{list(self.samplers)}.")
    steps = steps or self.default_steps[sampler]
    fn = flow.first_channels(model_fn)
    if sampler.startswith("sde-"):
      return self.transport.sample_sde(fn, noise, key, method=sampler[4:], num_steps=steps,
                                       **options)
    return self.transport.sample_ode(fn, noise, method=sampler, num_steps=steps, **options)

  def make_sample_fn(self, model: Any, *, sampler: Optional[str] = None,
                     steps: Optional[int] = None,
                     guidance_interval: Optional[Sequence[float]] = None, guided: bool = True,
                     release_cfg: bool = True, in_shardings: Any = None,
                     out_shardings: Any = None, spacing: str = "time",
                     respacing: Optional[str] = None, **options: Any) -> Callable:
    """Jitted sample(params, key, labels [N], cfg_scale) -> latents [N, h, w, c], as
    sampling.make_sample_fn: the release's CFG on [x; x] with labels [y; null] (first 3
    channels unless release_cfg=False), guidance_interval (t_lo, t_hi) in flow time.
    sampler None or '': default_sampler. spacing and respacing are ADM's (the same keywords
    for either objective): flow samplers step on SiT's uniform grid, so only 'time' and ''."""
    from dit_jax.models import DiT  # pylint: disable=import-outside-toplevel
    if spacing != "time":
      raise ValueError(f"spacing={spacing!r}: the flow samplers step on SiT's uniform time "
                       "grid; use 'time'")
    if respacing:
      raise ValueError(f"respacing={respacing!r} is ADM's: the flow objective samples with "
                       f"sampler (one of {list(self.samplers)}) and steps")
    if sampler and sampler not in self.samplers:
      raise ValueError(f"sampler: got {sampler!r}, the flow objective offers "
                       f"{list(self.samplers)}.")
    interval = flow.check_guidance_interval(guidance_interval)
    h = w = model.input_size

    def sample(params, key, labels, cfg_scale):
      k_noise, k_loop = jax.random.split(key)
      z = jax.random.normal(k_noise, (labels.shape[0], h, w, model.in_channels), jnp.float32)
      variables = {"params": params}
      cond = lambda x, t: model.apply(variables, x, t, labels)
      fn = cond
      if guided:
        y = jnp.concatenate([labels, jnp.full_like(labels, model.num_classes)])
        doubled = lambda x, t: model.apply(variables, x, t, y, cfg_scale, not release_cfg,
                                           method=DiT.forward_with_cfg)
        fn = flow.guided_prediction(doubled, cond, interval)
      return self.sample(fn, z, k_loop, sampler, steps, **options)

    return jax.jit(sample, in_shardings=in_shardings, out_shardings=out_shardings)

  def to_meta(self) -> dict:
    tr = self.transport
    return {"name": "flow", "path_type": tr.path.name, "prediction": tr.prediction,
            "loss_weight": tr.loss_weight or "", "train_eps": tr.train_eps,
            "sample_eps": tr.sample_eps, "time_sampling": tr.time_sampling,
            "logit_mean": tr.logit_mean, "logit_std": tr.logit_std}


Objective = ADM | Flow


def _draw(objective: Objective, key, x0, t, noise) -> tuple[jax.Array, jax.Array]:
  if t is not None and noise is not None:
    return t, noise
  if key is None:
    raise ValueError("training_losses: pass key, or both t and noise.")
  k_t, k_noise = jax.random.split(key)
  if t is None:
    t = objective.sample_t(k_t, x0.shape[0])
  if noise is None:
    noise = jax.random.normal(k_noise, x0.shape, jnp.float32)
  return t, noise


def _flow(fields: Mapping[str, Any], learn_sigma: bool, where: str) -> Flow:
  eps = lambda v: None if v is None or float(v) < 0 else float(v)
  known = set(default_config().keys())
  unknown = sorted(set(fields) - known)
  if unknown:
    raise ValueError(f"{where}: unknown fields {unknown}; expected some of {sorted(known)}.")
  try:
    transport = flow.create_transport(
        fields.get("path_type", "Linear"), fields.get("prediction", "velocity"),
        fields.get("loss_weight") or None, eps(fields.get("train_eps")),
        eps(fields.get("sample_eps")), time_sampling=fields.get("time_sampling", "uniform"),
        logit_mean=float(fields.get("logit_mean", 0.0)),
        logit_std=float(fields.get("logit_std", 1.0)))
  except ValueError as e:
    raise ValueError(f"{where}.{e}") from None
  return Flow(transport, bool(learn_sigma))


def from_config(config: ml_collections.ConfigDict) -> Objective:
  """The objective of config.objective (absent: ADM); ADM's process is config.diffusion's."""
  fields = dict(config.get("objective") or {})
  name = fields.get("name", "adm")
  learn_sigma = config.model.learn_sigma
  if name == "adm":
    return ADM(int(config.diffusion.steps), str(config.diffusion.noise_schedule),
               bool(learn_sigma))
  if name == "flow":
    return _flow(fields, learn_sigma, "config.objective")
  raise ValueError(f"config.objective.name: got {name!r}, expected one of {list(OBJECTIVES)}.")


def from_meta(meta: Mapping[str, Any]) -> Objective:
  """The objective a checkpoint was trained with: meta["objective"] (to_meta's record), else
  the ADM process of meta["diffusion"] (checkpoints written before objectives)."""
  learn_sigma = meta.get("model_kwargs", {}).get("learn_sigma", True)
  record = dict(meta.get("objective") or {})
  name = record.get("name", "adm")
  if name == "adm":
    legacy = meta.get("diffusion", {})
    return ADM(int(record.get("steps", legacy.get("steps", 1000))),
               str(record.get("noise_schedule", legacy.get("noise_schedule", "linear"))),
               bool(learn_sigma))
  if name == "flow":
    return _flow(record, learn_sigma, 'meta["objective"]')
  raise ValueError(f'meta["objective"]["name"]: got {name!r}, expected one of '
                   f"{list(OBJECTIVES)}: the checkpoint was written by a newer dit_jax?")

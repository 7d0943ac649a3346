"""DiT's objective: the ADM Gaussian diffusion (dit_jax.diffusion) with the release's hybrid
loss; the model sees int32 timesteps 0 .. steps - 1 (steps - 1 is noise)."""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Optional, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from dit_jax import diffusion, guidance
from dit_jax.objectives import base


@base.register
@dataclasses.dataclass(frozen=True)
class ADM(base.ObjectiveBase):
  """The training process of config.diffusion; samplers DDPM (the release), DDIM and
  DPM-Solver++ (dit_jax.diffusion.create_sampler)."""
  steps: int = 1000
  noise_schedule: str = "linear"
  learn_sigma: bool = True

  name = "adm"
  samplers = diffusion.SAMPLERS
  default_sampler = "ddpm"
  default_steps = diffusion.DEFAULT_STEPS
  # spacing: where the steps sit, 'time' (uniform in t; for DDPM the release's 250-step list),
  # 'logsnr' (uniform in log SNR) or 'karras' (Karras et al. 2022, rho 7). respacing: the
  # release's string ('250', 'ddim50'), which replaces sampler, steps and spacing (DDIM for
  # 'ddimN', else DDPM). eta: DDIM's. lower_order_final: DPM-Solver++'s last steps at lower
  # order. progress: print sampling progress from the device.
  sampler_options = {"spacing": "time", "respacing": "", "eta": 0.0, "lower_order_final": True,
                     "progress": False}
  time_dtype = jnp.int32

  @classmethod
  def config_fields(cls) -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict()  # ADM's process is config.diffusion

  @classmethod
  def from_config(cls, config: ml_collections.ConfigDict) -> "ADM":
    return cls(int(config.diffusion.steps), str(config.diffusion.noise_schedule),
               bool(config.model.learn_sigma))

  @classmethod
  def from_meta(cls, record: Mapping[str, Any], meta: Mapping[str, Any]) -> "ADM":
    # Checkpoints written before objectives were recorded hold meta["diffusion"] only.
    legacy = meta.get("diffusion", {})
    return cls(int(record.get("steps", legacy.get("steps", 1000))),
               str(record.get("noise_schedule", legacy.get("noise_schedule", "linear"))),
               bool(meta.get("model_kwargs", {}).get("learn_sigma", True)))

  @property
  def process(self) -> diffusion.GaussianDiffusion:
    return diffusion.create_diffusion("", noise_schedule=self.noise_schedule,
                                      learn_sigma=self.learn_sigma, diffusion_steps=self.steps)

  def draw(self, k_t: jax.Array, k_noise: jax.Array, x0: jax.Array) -> dict[str, jax.Array]:
    """t int32 [B] uniform in [0, steps); noise like x0."""
    return {"t": jax.random.randint(k_t, (x0.shape[0],), 0, self.steps),
            "noise": base.draw_noise(k_noise, x0)}

  def training_losses(self, model_fn: guidance.ModelFn, x0: jax.Array,
                      inputs: Mapping[str, jax.Array]) -> tuple[jax.Array, dict]:
    """(loss [B], {"mse", "vb"} batch means) of the release's hybrid loss."""
    terms = self.process.training_losses(model_fn, x0, inputs["t"], noise=inputs["noise"])
    return terms["loss"], {"mse": terms["mse"].mean(), "vb": terms["vb"].mean()}

  def sampler(self, sampler: Optional[str] = None, steps: Optional[int] = None,
              **options: Any) -> base.Sampler:
    """DDPM, DDIM or DPM-Solver++ over this process (diffusion.create_sampler); a respacing
    string chooses DDIM ('ddimN') or DDPM and replaces steps."""
    opts = {**self.sampler_options, **base.own_options(self, options)}
    if opts["respacing"]:
      sampler, steps = ("ddim" if opts["respacing"].startswith("ddim") else "ddpm"), None
    process = diffusion.create_sampler(
        base.check_sampler(self, sampler), steps or None, opts["spacing"],
        respacing=opts["respacing"] or None, noise_schedule=self.noise_schedule,
        diffusion_steps=self.steps, learn_sigma=self.learn_sigma, eta=opts["eta"],
        lower_order_final=opts["lower_order_final"])
    return lambda model_fn, noise, key: process.sample(model_fn, noise.shape, key, noise=noise,
                                                       progress=opts["progress"])

  def guidance_predicate(self, interval: Optional[Sequence[float]]) -> Optional[
      guidance.Predicate]:
    """(sigma_lo, sigma_hi): guide where lo < sigma_t <= hi, sigma_t = sqrt((1 - abar_t) /
    abar_t) of the training process."""
    interval = guidance.check_interval(interval, "sigma",
                                       lambda lo, hi: lo == 0 and hi == float("inf"))
    if interval is None:
      return None
    abar = np.cumprod(1.0 - diffusion.get_named_beta_schedule(self.noise_schedule, self.steps))
    return lambda t: diffusion.guidance_active(t, interval, abar)

  def to_meta(self) -> dict:
    return {"name": "adm", "steps": self.steps, "noise_schedule": self.noise_schedule}

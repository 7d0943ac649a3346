"""One entry point for every sampler: DDPM, DDIM and DPM-Solver++ (2M, 3M, 2M-SDE).

  from dit_jax.diffusion import create_sampler
  sampler = create_sampler("dpm++2m", steps=20, spacing="logsnr")
  x0 = sampler.sample(model_fn, (n, 32, 32, 4), key)       # one lax.scan, `steps` model calls

DDPM and DDIM run the release's respaced GaussianDiffusion over the kept timesteps; the
DPM-Solver++ family runs `dpm_solver.DPMSolver` on the training schedule. Every sampler calls
model_fn(x, t) with ORIGINAL timesteps t and reads eps from its first C output channels.
"""
import dataclasses
from typing import Optional, Sequence, Union

import jax
import numpy as np

from dit_jax.diffusion.dpm_solver import SOLVERS
from dit_jax.diffusion.dpm_solver import SPACINGS
from dit_jax.diffusion.dpm_solver import DPMSolver
from dit_jax.diffusion.dpm_solver import spaced_steps
from dit_jax.diffusion.gaussian_diffusion import GaussianDiffusion
from dit_jax.diffusion.gaussian_diffusion import ModelFn
from dit_jax.diffusion.gaussian_diffusion import Progress
from dit_jax.diffusion.gaussian_diffusion import get_named_beta_schedule
from dit_jax.diffusion.respace import create_diffusion

SAMPLERS = ("ddpm", "ddim") + tuple(SOLVERS)
# Steps when none are given: the release's 250 DDPM steps; 50 for DDIM; 20 for the solvers.
DEFAULT_STEPS = {"ddpm": 250, "ddim": 50, "dpm++2m": 20, "dpm++3m": 20, "dpm++2m-sde": 20}


@dataclasses.dataclass(frozen=True)
class Sampler:
  """A sampler bound to its steps: `sample(model_fn, shape, key)` -> x_0.

  Attributes:
    name: one of SAMPLERS.
    process: the respaced GaussianDiffusion (ddpm, ddim) or the DPMSolver.
    eta: DDIM's eta (0: deterministic).
  """
  name: str
  process: Union[GaussianDiffusion, DPMSolver]
  eta: float = 0.0

  @property
  def num_steps(self) -> int:
    """Model calls per sample (x2 images per call with guidance)."""
    return self.process.num_timesteps

  @property
  def timesteps(self) -> np.ndarray:
    """int32 [num_steps]: the original timesteps the model is called with, in call order."""
    if isinstance(self.process, DPMSolver):
      return self.process.timesteps
    return self.process.timestep_map[::-1].copy()

  def sample(self, model_fn: ModelFn, shape: Sequence[int], key: jax.Array,
             noise: Optional[jax.Array] = None, progress: Progress = False,
             progress_every: Optional[int] = None) -> jax.Array:
    """x_0 samples float32 [N, H, W, C]; arguments as in GaussianDiffusion.p_sample_loop."""
    kw = dict(noise=noise, progress=progress, progress_every=progress_every)
    if self.name == "ddpm":
      return self.process.p_sample_loop(model_fn, shape, key, **kw)
    if self.name == "ddim":
      return self.process.ddim_sample_loop(model_fn, shape, key, eta=self.eta, **kw)
    return self.process.sample_loop(model_fn, shape, key, **kw)


def create_sampler(name: str = "ddpm", steps: Optional[int] = None, spacing: str = "time", *,
                   respacing: Optional[str] = None, noise_schedule: str = "linear",
                   diffusion_steps: int = 1000, learn_sigma: bool = True, eta: float = 0.0,
                   lower_order_final: bool = True) -> Sampler:
  """Builds a sampler over the training process.

  Args:
    name: 'ddpm' (ancestral, the release), 'ddim', 'dpm++2m', 'dpm++3m' or 'dpm++2m-sde'.
    steps: number of steps = model calls per sample (default DEFAULT_STEPS[name]).
    spacing: where the steps sit (dpm_solver.SPACINGS): 'time' (uniform in t), 'logsnr'
      (uniform in log SNR) or 'karras' (rho = 7). For DDPM/DDIM, 'time' keeps the release's
      evenly spaced steps (create_diffusion(str(steps)): 0, ..., 999); 'logsnr' and 'karras'
      keep the rounded timesteps of those noise levels, duplicates merged (so possibly
      fewer than `steps` near t = 0).
    respacing: the release's respacing string instead of steps/spacing ('250', 'ddim50',
      '10,5'; see respace.space_timesteps); DDPM and DDIM only.
    noise_schedule, diffusion_steps, learn_sigma: the training process.
    eta: DDIM's eta.
    lower_order_final: see DPMSolver.

  Returns:
    A Sampler.
  """
  if name not in SAMPLERS:
    raise ValueError(f"sampler: got {name!r}, expected one of {list(SAMPLERS)}.")
  if spacing not in SPACINGS:
    raise ValueError(f"spacing: got {spacing!r}, expected one of {list(SPACINGS)}.")
  if respacing and steps is not None:
    raise ValueError(f"pass either respacing ({respacing!r}) or steps ({steps}), not both.")
  if steps is None and not respacing:
    steps = DEFAULT_STEPS[name]
  if name in SOLVERS:
    if respacing:
      raise ValueError(f"respacing={respacing!r} applies to ddpm/ddim; {name} takes steps= "
                       "and spacing=.")
    betas = get_named_beta_schedule(noise_schedule, diffusion_steps)
    return Sampler(name, DPMSolver(betas, steps, name, spacing, lower_order_final))
  kw = dict(noise_schedule=noise_schedule, learn_sigma=learn_sigma,
            diffusion_steps=diffusion_steps)
  if respacing:
    return Sampler(name, create_diffusion(respacing, **kw), eta)
  if int(steps) != steps or not 1 <= steps <= diffusion_steps:
    raise ValueError(f"steps: expected an integer in [1, {diffusion_steps}], got {steps!r}.")
  if spacing == "time":
    return Sampler(name, create_diffusion(str(int(steps)), **kw), eta)
  abar = np.cumprod(1.0 - get_named_beta_schedule(noise_schedule, diffusion_steps))
  kept, _ = spaced_steps(spacing, steps, abar)
  return Sampler(name, create_diffusion(use_timesteps=kept.tolist(), **kw), eta)

"""ADM Gaussian diffusion in JAX (training loss, respacing, DDPM/DDIM and DPM-Solver++ samplers).

  from dit_jax.diffusion import create_diffusion, create_sampler
  diffusion = create_diffusion("")        # training: all 1000 steps
  sampler = create_diffusion("250")       # sampling: 250 respaced steps
  solver = create_sampler("dpm++2m", steps=20)   # any sampler: solver.sample(model_fn, shape, key)
"""
from dit_jax.diffusion.dpm_solver import SPACINGS
from dit_jax.diffusion.dpm_solver import DPMSolver
from dit_jax.diffusion.dpm_solver import noise_levels
from dit_jax.diffusion.dpm_solver import spaced_steps
from dit_jax.diffusion.gaussian_diffusion import GaussianDiffusion
from dit_jax.diffusion.gaussian_diffusion import get_named_beta_schedule
from dit_jax.diffusion.guidance import guidance_active
from dit_jax.diffusion.guidance import sample_with_cfg
from dit_jax.diffusion.respace import create_diffusion
from dit_jax.diffusion.respace import respaced_betas
from dit_jax.diffusion.respace import space_timesteps
from dit_jax.diffusion.samplers import DEFAULT_STEPS
from dit_jax.diffusion.samplers import SAMPLERS
from dit_jax.diffusion.samplers import Sampler
from dit_jax.diffusion.samplers import create_sampler

__all__ = [
    "DEFAULT_STEPS", "DPMSolver", "GaussianDiffusion", "SAMPLERS", "SPACINGS", "Sampler",
    "create_diffusion", "create_sampler", "get_named_beta_schedule", "guidance_active",
    "noise_levels", "respaced_betas", "sample_with_cfg", "spaced_steps", "space_timesteps",
]

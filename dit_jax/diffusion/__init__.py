"""ADM Gaussian diffusion in JAX (training loss, respacing, DDPM/DDIM samplers).

  from dit_jax.diffusion import create_diffusion
  diffusion = create_diffusion("")        # training: all 1000 steps
  sampler = create_diffusion("250")       # sampling: 250 respaced steps
"""
from dit_jax.diffusion.gaussian_diffusion import GaussianDiffusion
from dit_jax.diffusion.gaussian_diffusion import get_named_beta_schedule
from dit_jax.diffusion.guidance import RELEASE_GUIDED_CHANNELS
from dit_jax.diffusion.guidance import apply_cfg
from dit_jax.diffusion.guidance import cfg_model_fn
from dit_jax.diffusion.guidance import kept_half_model_fn
from dit_jax.diffusion.guidance import sample_with_cfg
from dit_jax.diffusion.respace import create_diffusion
from dit_jax.diffusion.respace import respaced_betas
from dit_jax.diffusion.respace import space_timesteps

__all__ = [
    "GaussianDiffusion", "RELEASE_GUIDED_CHANNELS", "apply_cfg", "cfg_model_fn",
    "create_diffusion", "get_named_beta_schedule", "kept_half_model_fn", "respaced_betas",
    "sample_with_cfg", "space_timesteps",
]

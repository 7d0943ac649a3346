"""Timestep respacing with the release's semantics, and `create_diffusion`.

A respaced process keeps a subset S of the original steps; its betas are
recomputed so that its cumulative alphas equal the original ones at the kept
steps (beta_k = 1 - abar[s_k] / abar[s_{k-1}]), and the model is called with
the original timestep s_k.
"""
from typing import Optional, Sequence, Union

import numpy as np

from dit_jax.diffusion.gaussian_diffusion import GaussianDiffusion
from dit_jax.diffusion.gaussian_diffusion import get_named_beta_schedule

Respacing = Union[None, str, Sequence[int]]


def space_timesteps(num_timesteps: int, section_counts: Respacing) -> list:
  """Sorted original timesteps kept by a respacing (the release's rules).

  Args:
    num_timesteps: steps of the original process (1000).
    section_counts: "" or None (keep all); "ddimN": the smallest integer stride
      k with len(range(0, T, k)) == N, i.e. 0, k, 2k, ...; "N" or "N1,N2,...":
      the process is cut into equal sections (the first T % len sections one
      step longer), and section i keeps Ni steps evenly spaced over it, rounded,
      first and last included; a list of ints is read as the section counts.
      "250" keeps round(i * 999 / 249): 0, 4, 8, ..., 995, 999.

  Returns:
    Sorted list of the kept original timesteps.
  """
  if section_counts is None or (isinstance(section_counts, str) and not section_counts):
    return list(range(num_timesteps))
  if isinstance(section_counts, str):
    if section_counts.startswith("ddim"):
      try:
        desired = int(section_counts[len("ddim"):])
      except ValueError:
        raise ValueError(f"timestep_respacing: cannot parse {section_counts!r}; "
                         "expected 'ddimN' with N an integer.") from None
      for stride in range(1, num_timesteps):
        if len(range(0, num_timesteps, stride)) == desired:
          return list(range(0, num_timesteps, stride))
      raise ValueError(f"timestep_respacing: no integer stride gives exactly {desired} "
                       f"of {num_timesteps} steps for {section_counts!r}.")
    try:
      section_counts = [int(c) for c in section_counts.split(",")]
    except ValueError:
      raise ValueError(f"timestep_respacing: cannot parse {section_counts!r}; expected "
                       "'', 'N', 'N1,N2,...' or 'ddimN'.") from None
  section_counts = list(section_counts)
  size_per, extra = divmod(num_timesteps, len(section_counts))
  start = 0
  kept = []
  for i, count in enumerate(section_counts):
    size = size_per + (1 if i < extra else 0)
    if count < 1 or count > size:
      raise ValueError(f"timestep_respacing: cannot keep {count} steps of a section "
                       f"of {size} steps.")
    stride = 1.0 if count <= 1 else (size - 1) / (count - 1)
    # Accumulated float position and Python's round(), to reproduce the
    # release's step lists bit for bit.
    position = 0.0
    for _ in range(count):
      kept.append(start + round(position))
      position += stride
    start += size
  return sorted(set(kept))


def respaced_betas(base_betas: np.ndarray, use_timesteps: Sequence[int]) -> np.ndarray:
  """Betas [len(use_timesteps)] (float64) of the process keeping `use_timesteps`."""
  alphas_cumprod = np.cumprod(1.0 - np.asarray(base_betas, np.float64))
  betas = []
  last = 1.0
  for t in sorted(use_timesteps):
    betas.append(1.0 - alphas_cumprod[t] / last)
    last = alphas_cumprod[t]
  return np.asarray(betas, np.float64)


def create_diffusion(timestep_respacing: Respacing = "",
                     noise_schedule: str = "linear",
                     use_kl: bool = False,
                     sigma_small: bool = False,
                     predict_xstart: bool = False,
                     learn_sigma: bool = True,
                     rescale_learned_sigmas: bool = False,
                     diffusion_steps: int = 1000,
                     use_timesteps: Optional[Sequence[int]] = None) -> GaussianDiffusion:
  """The diffusion of the release (DiT's `create_diffusion`, same arguments).

  Args:
    timestep_respacing: "" (all steps, for training), "250", "ddim50", ...
      (see `space_timesteps`).
    noise_schedule: "linear" or "cosine".
    use_kl: train on the full variational bound ("rescaled_kl" loss).
    sigma_small: with learn_sigma=False, use the posterior variance instead of beta.
    predict_xstart: the model predicts x_0 instead of eps.
    learn_sigma: the model outputs 2C channels, the last C interpolating the
      log variance between the clipped posterior variance and beta.
    rescale_learned_sigmas: scale vb by T / 1000 ("rescaled_mse" loss).
    diffusion_steps: steps of the original process.
    use_timesteps: the original timesteps to keep, instead of timestep_respacing.

  Returns:
    A GaussianDiffusion whose num_timesteps is the number of kept steps.
  """
  if diffusion_steps < 2:
    raise ValueError(f"diffusion_steps: need at least 2, got {diffusion_steps}.")
  base_betas = get_named_beta_schedule(noise_schedule, diffusion_steps)
  if use_kl:
    loss_type = "rescaled_kl"
  elif rescale_learned_sigmas:
    loss_type = "rescaled_mse"
  else:
    loss_type = "mse"
  if learn_sigma:
    var_type = "learned_range"
  else:
    var_type = "fixed_small" if sigma_small else "fixed_large"
  if use_timesteps is None:
    use_timesteps = space_timesteps(diffusion_steps, timestep_respacing)
  else:
    if timestep_respacing:
      raise ValueError("pass either timestep_respacing or use_timesteps, not both.")
    use_timesteps = sorted(set(int(t) for t in use_timesteps))
    if not use_timesteps or use_timesteps[0] < 0 or use_timesteps[-1] >= diffusion_steps:
      raise ValueError(f"use_timesteps: expected timesteps in [0, {diffusion_steps}), got "
                       f"{use_timesteps[:3]}...{use_timesteps[-3:]}.")
  return GaussianDiffusion(
      respaced_betas(base_betas, use_timesteps),
      model_mean_type="start_x" if predict_xstart else "epsilon",
      model_var_type=var_type,
      loss_type=loss_type,
      timestep_map=use_timesteps,
      original_num_steps=diffusion_steps)

"""Flow matching (SiT's transport) in JAX: paths, losses, ODE/SDE samplers on diffrax.

  from dit_jax import flow
  transport = flow.create_transport("Linear", "velocity")   # SiT's arguments and defaults
  loss = transport.training_losses(model_fn, x1, t, noise)["loss"]            # [B]
  x = transport.sample_ode(model_fn, noise, method="heun2", num_steps=50)
  x = transport.sample_sde(model_fn, noise, key, num_steps=250)

Time runs from 0 (noise) to 1 (data); the model sees t in [0, 1]. See docs/flow.md.
"""
from dit_jax.flow.paths import DIFFUSION_FORMS
from dit_jax.flow.paths import PATHS
from dit_jax.flow.paths import Path
from dit_jax.flow.samplers import ODE_METHODS
from dit_jax.flow.samplers import SDE_METHODS
from dit_jax.flow.samplers import time_grid
from dit_jax.flow.transport import LAST_STEPS
from dit_jax.flow.transport import LOSS_WEIGHTS
from dit_jax.flow.transport import PREDICTIONS
from dit_jax.flow.transport import TIME_SAMPLINGS
from dit_jax.flow.transport import Transport
from dit_jax.flow.transport import create_transport

__all__ = [
    "DIFFUSION_FORMS", "LAST_STEPS", "LOSS_WEIGHTS", "ODE_METHODS", "PATHS", "PREDICTIONS",
    "Path", "SDE_METHODS", "TIME_SAMPLINGS", "Transport", "create_transport", "time_grid",
]

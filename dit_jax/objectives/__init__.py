"""Training objectives, one file each, chosen by config.objective.name from a registry.

  objective = objectives.from_config(config)        # or from_meta(checkpoint meta)
  inputs = objective.draw(k_t, k_noise, x0)         # t, noise (and whatever it needs)
  loss, logged = objective.training_losses(model_fn, x0, inputs)   # loss [B]; logged scalars
  x = objective.sample(model_fn, noise, key, sampler="dopri5", steps=50)

`model_fn(x [B, H, W, C], t [B]) -> [B, H, W, K]` is the DiT's raw output (K = 2C with
learn_sigma) at the objective's time input. The interface is `base.Objective`; adding one is a
file with a registered class and a line below (docs/objectives.md).
"""
from dit_jax.objectives.base import Objective
from dit_jax.objectives.base import REGISTRY
from dit_jax.objectives.base import default_config
from dit_jax.objectives.base import from_config
from dit_jax.objectives.base import from_meta
from dit_jax.objectives.base import names
from dit_jax.objectives.base import parse_options
from dit_jax.objectives.base import register
from dit_jax.objectives.base import sampler_kwargs
from dit_jax.objectives.base import sampler_option_defaults
# Each module registers its objective on import.
from dit_jax.objectives import adm  # noqa: E402
from dit_jax.objectives import edm  # noqa: E402
from dit_jax.objectives import flow  # noqa: E402
from dit_jax.objectives import meanflow  # noqa: E402

ADM = adm.ADM
EDM = edm.EDM
Flow = flow.Flow
MeanFlow = meanflow.MeanFlow

__all__ = ["ADM", "EDM", "Flow", "MeanFlow", "Objective", "REGISTRY", "default_config", "from_config",
           "from_meta", "names", "parse_options", "register", "sampler_kwargs",
           "sampler_option_defaults"]

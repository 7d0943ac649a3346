"""DiT-XL/8 at 256x256 (32x32x4 latents), the paper's recipe: 400K steps, batch 256.

  python -m dit_jax.main --config=configs/xl8.py --workdir=DIR --config.data.dir=LATENTS_256
"""

from configs import base


def get_config():
  c = base.get_config("DiT-XL/8", image_size=256)
  c.model.dtype = "bfloat16"
  return c

"""DiT-XL/2 at 512x512 (64x64x4 latents): the paper's 3M-step run (FID 3.04 with cfg 1.5).

  python -m dit_jax.main --config=configs/xl2_512.py --workdir=DIR --config.data.dir=LATENTS_512
"""

from configs import base


def get_config():
  c = base.get_config("DiT-XL/2", image_size=512)
  c.total_steps = 3_000_000
  c.model.dtype = "bfloat16"
  # The lightest remat that fits (step.REMAT_AUTO): with splash attention (the TPU default at
  # 1,024 tokens) none on v5p-64 and up, full where 64 images share a chip (docs/performance.md).
  c.model.remat = "auto"
  return c

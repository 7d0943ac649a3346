"""Demo: a small class-conditional DiT on scikit-learn's 8x8 digits, in minutes on a CPU.

  python -m dit_jax.main --config=configs/demo.py --workdir=/tmp/dit_demo

The digits ship inside scikit-learn; on first use they are written into WORKDIR/data with the
project's record writer (identity "VAE", std 0), so the demo runs the same pipeline as
ImageNet latents. Sample grids land in WORKDIR/samples/*.png and in TensorBoard.
"""

from configs import base


def get_config():
  c = base.get_config("DiT-S/2", image_size=8)
  c.data.builtin = "digits"
  c.data.global_batch_size = 64
  c.data.shuffle_buffer = 2_000
  # Digits are not mirror-symmetric: keep them unflipped.
  c.data.random_flip = False
  # A small DiT-S/2 variant: 16 tokens of width 128.
  c.model.overrides.hidden_size = 128
  c.model.overrides.depth = 4
  c.model.overrides.num_heads = 4
  # A short run needs a larger step size than the release's 1e-4 and a faster EMA.
  c.total_steps = 3_000
  c.optim.learning_rate = 1e-3
  c.optim.warmup_steps = 100
  c.ema_decay = 0.995
  c.log_every_steps = 100
  c.checkpoint.every_steps = 500
  c.sample.every_steps = 1_000
  c.sample.num_images = 40
  c.sample.steps = 100
  c.sample.cfg_scale = 3.0
  # One channel: guide it (the release's 3-channel rule is for 4-channel SD latents).
  c.sample.release_cfg = False
  return c

"""REPA's SiT-XL/2 at 256x256 (Yu et al. 2025): flow matching (SiT's linear path, velocity),
no learned sigma, DINOv2-B/14 aligned with block 8, coefficient 0.5; lr 1e-4, batch 256,
gradient clipping 1.0, label dropout 0.1, 400K steps (REPA's README: its 7M-step FID in under
400K).

  # DINOv2-B weights (from the torch hub, on a machine with internet access):
  python -c "import torch; torch.save(torch.hub.load('facebookresearch/dinov2', \
      'dinov2_vitb14').state_dict(), 'dinov2_vitb14.pth')"
  dit-prepare-latents --source=IMAGENET/train --vae=sd-vae-ft-ema --out=LATENTS --with_images
  python -m dit_jax.main --config=configs/repa_sit_xl2.py --workdir=DIR \
      --config.data.dir=LATENTS --config.repa.encoder_path=dinov2_vitb14.pth

REPA trains in its own time convention (0 data, 1 noise); this config keeps SiT's
(objective.network_time='sit'), which trains the same path and loss with t mirrored.
"""

from configs import base


def get_config():
  c = base.get_config("DiT-XL/2", image_size=256)
  c.model.dtype = "bfloat16"
  c.model.learn_sigma = False
  c.objective.name = "flow"
  c.optim.grad_clip_norm = 1.0
  c.repa.encoder = "dinov2_vitb14"
  c.repa.depth = 8
  c.repa.coefficient = 0.5
  return c

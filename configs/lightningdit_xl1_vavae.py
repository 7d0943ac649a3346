"""LightningDiT-XL/1 on VA-VAE f16d32 latents (16x16x32) at 256x256: LightningDiT's 64-epoch
recipe (hustvl/LightningDiT configs/lightningdit_xl_vavae_f16d32.yaml; FID 2.11 reported there,
cfg 10 with the guidance interval and timestep shift below).

  python -m dit_jax.prepare_latents --source=/data/imagenet/train --vae=vavae_f16d32 \
      --vae_weights=/ckpt/vavae-imagenet256-f16d32-dinov2.pt --out=VAVAE_LATENTS_256
  python -m dit_jax.main --config=configs/lightningdit_xl1_vavae.py --workdir=DIR \
      --config.data.dir=VAVAE_LATENTS_256

The architecture: SwiGLU, RoPE and RMSNorm on, qk-norm off, adaLN shift on (the named model's
defaults). Training: flow matching (linear path, velocity), logit-normal t, the velocity-
direction loss, AdamW with beta2 0.95, batch 1024, lr 2e-4, 80K steps (64 epochs of ImageNet).
Sampling: Euler with 250 grid points, timestep shift 0.3, guidance from t = 0.11 (t = 0 is
noise) on every latent channel. The latents are the VA-VAE's (16x16x32), normalised per channel
by the statistics prepare_latents records in the manifest, as LightningDiT does; samples are
decoded after undoing it (dit_jax.latent_norm, docs/latents.md).
"""

from configs import base


def get_config():
  c = base.get_config("LightningDiT-XL/1", image_size=256)
  c.model.dtype = "bfloat16"
  c.model.learn_sigma = False
  c.vae.downsample_factor, c.vae.latent_channels = 16, 32  # VA-VAE f16d32: 16x16x32
  c.objective.name = "flow"
  c.objective.path_type = "Linear"
  c.objective.prediction = "velocity"
  c.objective.time_sampling = "logit_normal"
  c.objective.logit_mean, c.objective.logit_std = 0.0, 1.0
  c.objective.cosine_loss = True
  c.total_steps = 80_000
  c.data.global_batch_size = 1024
  c.optim.learning_rate = 2e-4
  c.optim.b2 = 0.95
  c.checkpoint.every_steps = 20_000
  c.sample.sampler = "euler"
  c.sample.steps = 250
  c.sample.timestep_shift = 0.3
  c.sample.guidance_interval = (0.11, 1.0)
  c.sample.cfg_scale = 10.0
  c.eval.sampler = "euler"
  c.eval.steps = 250
  c.eval.timestep_shift = 0.3
  c.eval.guidance_interval = (0.11, 1.0)
  return c

"""The demo with REPA: the digits DiT aligned with the digits teacher (docs/repa.md).

  python -m dit_jax.main --config=configs/demo_repa.py --workdir=/tmp/dit_demo_repa

The teacher (a small ViT trained self-supervised on the digits, dit_jax/encoders/
digits_teacher.py) is trained into WORKDIR/digits_teacher first (a few minutes on a CPU); the
digits are written with their images beside the latents (WORKDIR/data/digits+images).
"""

from configs import demo


def get_config():
  c = demo.get_config()
  c.objective.name = "flow"
  c.model.learn_sigma = False
  c.data.with_images = True
  c.repa.encoder = "digits_teacher"
  c.repa.projector_hidden = 512
  return c

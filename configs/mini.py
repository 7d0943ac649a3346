"""Mini scaling grid: scaled-down DiT-S/B/L/XL x patch 8/4/2 on the 8x8 digits, for a CPU.

  python -m dit_jax.grid run --preset=mini --root=/tmp/dit_grid_mini      # all 12, then:
  python -m dit_jax.grid report --root=/tmp/dit_grid_mini
  python -m dit_jax.main --config=configs/mini.py:xl2 --workdir=/tmp/xl2   # one of them alone

The paper's grid at 1/6 of the width and 1/4 of the depth (head width 32-48 instead of 64-72):

  size  depth  width  heads      paper: depth  width  heads
  S       3     64     2                  12    384     6
  B       3    128     4                  12    768    12
  L       6    176     4                  24   1024    16
  XL      7    192     4                  28   1152    16

Images are the digits themselves (8x8x1 pixels, no VAE, no upsampling), so patch 8/4/2 gives
1/4/16 tokens where the paper's 32x32x4 latents give 16/64/256: the same factor of 4 in tokens
(and compute) per halving of the patch. Every model trains with the same recipe and the same
fixed budget (batch 32, 2,000 steps), as the paper's grid does (batch 256, 400K steps).
"""

from configs import demo

SIZES = {"s": (3, 64, 2), "b": (3, 128, 4), "l": (6, 176, 4), "xl": (7, 192, 4)}
NAMES = tuple(f"{s}{p}" for s in SIZES for p in (8, 4, 2))


def get_config(name: str = "s2"):
  size, patch = name.rstrip("0123456789"), name[len(name.rstrip("0123456789")):]
  if size not in SIZES or patch not in ("2", "4", "8"):
    raise ValueError(f"configs/mini.py:{name}: expected one of {', '.join(NAMES)}")
  c = demo.get_config()
  c.model.name = f"DiT-{size.upper()}/{patch}"
  depth, width, heads = SIZES[size]
  c.model.overrides.depth = depth
  c.model.overrides.hidden_size = width
  c.model.overrides.num_heads = heads
  # Same budget and recipe for every model: the demo's (lr 1e-3 after 100 warmup steps, EMA 0.995).
  c.data.global_batch_size = 32
  c.total_steps = 2_000
  c.log_every_steps = 250
  # Checkpoints every 500 steps, all kept: the grid evaluates each of them.
  c.checkpoint.every_steps = 500
  c.checkpoint.keep = 1
  c.checkpoint.keep_period = 500
  # No periodic grids: the grid runner writes the samples it evaluates.
  c.sample.every_steps = 0
  c.sample.num_images = 0
  return c

"""Cost of the checkpoint integrity check (digests + finiteness of the whole train state).

  python benchmarks/checkpoint_integrity.py --model=DiT-B/2
  python benchmarks/checkpoint_integrity.py --model=DiT-XL/2   # needs ~25 GB of host memory

Builds the train state of a model (parameters, EMA, both Adam moments, float32) on this
machine's default device and times `checkpointing.summarize` (what every save and restore
runs): compile once, then the mean of a few calls. Prints GB/s so the cost at other sizes
follows (it is one read of the state; on an accelerator it runs at memory bandwidth).
"""

import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import optax  # noqa: E402
from absl import app, flags  # noqa: E402

from dit_jax import checkpointing, models  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_string("model", "DiT-B/2", "A DiT name.")
flags.DEFINE_integer("repeats", 3, "Timed calls after the first (compiling) one.")


def main(_):
  model = models.get_model(FLAGS.model)
  shapes = models.param_shapes(model)
  params = jax.tree.map(lambda x: jnp.full(x.shape, 0.5, x.dtype), shapes)
  train = {"params": params, "opt_state": optax.adamw(1e-4).init(params),
           "step": jnp.zeros((), jnp.int32), "rng": jax.random.PRNGKey(0)}
  ema = jax.tree.map(jnp.copy, params)
  nbytes = sum(x.nbytes for x in jax.tree.leaves((train, ema)))
  t0 = time.perf_counter()
  checkpointing.summarize(train, ema)
  first = time.perf_counter() - t0
  t0 = time.perf_counter()
  for _ in range(FLAGS.repeats):
    checkpointing.summarize(train, ema)
  dt = (time.perf_counter() - t0) / FLAGS.repeats
  print(f"model        {FLAGS.model}: train state + EMA {nbytes / 1e9:.2f} GB "
        f"({len(jax.tree.leaves((train, ema)))} arrays) on {jax.devices()[0].device_kind}")
  print(f"first call   {first:.2f} s (compile + run)")
  print(f"per call     {dt:.3f} s = {nbytes / dt / 1e9:.2f} GB/s")


if __name__ == "__main__":
  app.run(main)

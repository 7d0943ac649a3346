"""Train-step throughput of a config on this machine (synthetic latents, the real step).

  python benchmarks/train_speed.py --config=configs/s2.py --config.data.global_batch_size=8
  python benchmarks/train_speed.py --config=configs/demo.py --steps=50

Prints compile time, FLOPs (3 x forward, and XLA's count) and memory per device, steps/s, images/s (total and per
device) and MFU where the device's peak is known (TPU, A100/H100/H200). Uses the same
`step.build` as the main job, so the step is exactly the one that trains.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import numpy as np  # noqa: E402
from absl import app, flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from dit_jax import data_info, hardware, step  # noqa: E402

import accelerator_speed  # noqa: E402  (beside this file)

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Experiment config.", lock_config=False)
flags.DEFINE_integer("steps", 20, "Timed steps (after 2 warm-up steps; at least).")
flags.DEFINE_integer("num_classes", 1000, "Classes of the synthetic data.")
flags.mark_flags_as_required(["config"])


def main(_):
  config = FLAGS.config
  info = data_info.synthetic_info(config, FLAGS.num_classes)
  setup = step.build(config, info)
  gbs = config.data.global_batch_size
  sps, loss, _ = accelerator_speed.time_train_step(setup, info, gbs, FLAGS.steps, 0.0)
  n = setup.mesh.size
  params = sum(x.size for x in jax.tree.leaves(setup.abstract.params))
  peak = hardware.peak_flops(jax.devices()[0])
  print(f"config            {config.model.name} latents {info.latent_shape} batch {gbs} "
        f"dtype {config.model.dtype} remat {config.model.remat}")
  print(f"devices           {n} x {jax.devices()[0].device_kind}  mesh {dict(setup.mesh.shape)}")
  print(f"parameters        {params:,}")
  print(f"compile           {setup.compile_seconds:.1f} s")
  print(f"FLOPs/step        {setup.model_flops:.4g} per device (3 x forward), XLA counts "
        f"{setup.flops:.4g}")
  print(f"memory            {setup.memory_gib:.3f} GiB per device (args + outputs + temps)")
  print(f"steps/s           {sps:.3f}")
  print(f"images/s          {sps * gbs:.1f} total, {sps * gbs / n:.1f} per device")
  if peak:
    mfu = setup.model_flops * sps / peak
    print(f"MFU               {mfu:.1%} of {peak / 1e12:.0f} TFLOP/s per "
          "device")
  print(f"loss              {loss:.4f} (finite: {np.isfinite(loss)})")


if __name__ == "__main__":
  app.run(main)

"""Train-step throughput of a config on this machine (synthetic latents, the real step).

  python benchmarks/train_speed.py --config=configs/s2.py --config.data.global_batch_size=8
  python benchmarks/train_speed.py --config=configs/demo.py --steps=50
  python benchmarks/train_speed.py --config=configs/demo.py --steps=300 --in_flight=2,0 --rounds=3

Prints compile time, FLOPs (3 x forward, and XLA's count) and memory per device, steps/s, images/s (total and per
device) and MFU where the device's peak is known (TPU, A100/H100/H200). Uses the same
`step.build` as the main job, so the step is exactly the one that trains.

With --in_flight: the cost of bounding how far the host dispatches ahead of the device
(config.steps_in_flight, dit_jax.train.InFlight), side by side: rounds of --steps steps of the
training loop's own dispatch (a host batch made a global array each step, the compiled step,
InFlight.add), alternating the depths given, in one process; prints steps/s per round and
each depth's median against the first's.
"""

import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import numpy as np  # noqa: E402
from absl import app, flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from dit_jax import data_info, hardware, step, train  # noqa: E402

import accelerator_speed  # noqa: E402  (beside this file)

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Experiment config.", lock_config=False)
flags.DEFINE_integer("steps", 20, "Timed steps (after 2 warm-up steps; at least).")
flags.DEFINE_integer("num_classes", 1000, "Classes of the synthetic data.")
flags.DEFINE_list("in_flight", [], "Compare these config.steps_in_flight depths (e.g. 2,0).")
flags.DEFINE_integer("rounds", 3, "Rounds per depth with --in_flight.")
flags.mark_flags_as_required(["config"])


def compare_in_flight(setup, info, gbs):
  """steps/s of the loop's dispatch at each depth, alternating rounds."""
  batch = jax.device_get(accelerator_speed.synthetic_batch(setup, info, gbs))
  state = setup.init(jax.random.PRNGKey(0))
  state, m = setup.compiled(state, {k: jax.device_put(v, setup.batch_sh)
                                    for k, v in batch.items()})
  jax.block_until_ready(m)
  depths = [int(d) for d in FLAGS.in_flight]
  rates = {d: [] for d in depths}
  step_no = 0
  for r in range(FLAGS.rounds):
    for d in depths:
      inflight = train.InFlight(d)
      t0 = time.perf_counter()
      for _ in range(FLAGS.steps):
        arrays = {k: jax.make_array_from_process_local_data(setup.batch_sh, v)
                  for k, v in batch.items()}
        state, m = setup.compiled(state, arrays)
        step_no += 1
        inflight.add(step_no, m["loss"])
      jax.block_until_ready(m)
      rates[d].append(FLAGS.steps / (time.perf_counter() - t0))
      print(f"round {r + 1} steps_in_flight={d}: {rates[d][-1]:.2f} steps/s", flush=True)
  base = float(np.median(rates[depths[0]]))
  for d in depths:
    med = float(np.median(rates[d]))
    print(f"steps_in_flight={d}: median {med:.2f} steps/s, {med / base:.4f}x "
          f"steps_in_flight={depths[0]}")


def main(_):
  config = FLAGS.config
  info = data_info.synthetic_info(config, FLAGS.num_classes)
  setup = step.build(config, info)
  gbs = config.data.global_batch_size
  if FLAGS.in_flight:
    compare_in_flight(setup, info, gbs)
    return
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

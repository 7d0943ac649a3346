"""Per-chip memory of a config's train step on a TPU topology, compiled here (no TPU needed).

  pip install "jax[tpu]==$(python -c 'import jax; print(jax.__version__)')"   # libtpu
  python benchmarks/pod_memory.py --config=configs/xl2.py --topology=v5p:2x2x1
  python benchmarks/pod_memory.py --config=configs/xl2.py --topology=v5p:2x2x2 --slices=2

Topology names are libtpu's: v5p-8 = v5p:2x2x1 (4 chips), v5p-256 = v5p:4x4x8 (128 chips),
v5e-256 = v5e:16x16, v6e-64 = v6e:8x8. The step is built by the main job's `train.build`
with the config's layout (by default chosen from this memory: data parallel where the step
fits a chip), on synthetic latents of the config's shape. Prints the mesh, the compiled
per-chip memory against the chip's HBM, FLOPs per chip and the compile time.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TPU_ACCELERATOR_TYPE", "v5p-8")  # quiets libtpu's start-up checks
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")

from absl import app, flags, logging  # noqa: E402
from jax.experimental import topologies  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from dit_jax import hardware, input_pipeline, sharding, train  # noqa: E402

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Experiment config.", lock_config=False)
flags.DEFINE_string("topology", "v5p:2x2x1", "libtpu topology name, e.g. v5p:4x4x8, v5e:16x16.")
flags.DEFINE_integer("slices", 1, "Number of slices (multi-slice over DCN).")
flags.mark_flags_as_required(["config"])


def main(_):
  config = FLAGS.config
  s = config.data.image_size // 8
  info = input_pipeline.DataInfo((s, s, 4), 1000, 0.18215, 0, 0, (), {"dtype": "float16"})
  devices = topologies.get_topology_desc(platform="tpu", topology_name=FLAGS.topology,
                                         num_slices=FLAGS.slices).devices
  logging.set_verbosity(logging.WARNING)
  b = train.build(config, info, devices=devices)
  hbm = hardware.memory_bytes(devices[0])
  _, repl = sharding.replicated_bytes(b.state_sh.params, b.abstract.params)
  print(f"config        {config.model.name} {config.data.image_size}px, global batch "
        f"{config.data.global_batch_size}, {config.model.dtype}, remat {config.model.remat}")
  print(f"topology      {FLAGS.topology} x {FLAGS.slices} slice(s): {len(devices)} x "
        f"{devices[0].device_kind}")
  print(f"mesh          {dict(b.mesh.shape)} (config.mesh.fsdp={config.mesh.fsdp})")
  print(f"memory        {b.memory_gib:.2f} GiB per chip of {hbm / 2**30:.0f} GiB")
  print(f"replicated    {repl / 2**20:.1f} MiB of parameters")
  print(f"FLOPs         {b.flops:.4g} per chip per step")
  print(f"compile       {b.compile_seconds:.0f} s")


if __name__ == "__main__":
  app.run(main)

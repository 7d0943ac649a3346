"""Images/s of FID Inception feature extraction (random weights) on the available devices.

  python benchmarks/inception_speed.py --batch_size_per_device=8 --resolution=299 --steps=5

Times `extract_features` end to end (host -> device copy, forward, all features back to the
host) after one warm-up call that compiles.
"""
import time

from absl import app, flags
import jax
import numpy as np

from dit_jax.evaluation import features, inception

_BATCH = flags.DEFINE_integer("batch_size_per_device", 8, "Images per device per step.")
_RESOLUTION = flags.DEFINE_integer("resolution", 299, "Input image size (resized to 299 inside).")
_STEPS = flags.DEFINE_integer("steps", 5, "Timed steps.")
_PRECISION = flags.DEFINE_enum("precision", "highest", ["highest", "default"],
                               "Matmul/conv precision (highest = float32 everywhere).")


def random_variables(shape: tuple[int, ...]) -> dict:
  """He-scaled normal kernels, identity batch norm; numpy draws (flax init takes ~1 min here)."""
  rng = np.random.default_rng(0)

  def draw(path, leaf):
    name = path[-1].key
    if name in ("kernel",):
      fan_in = int(np.prod(leaf.shape[:-1]))
      return (rng.standard_normal(leaf.shape) * np.sqrt(2.0 / fan_in)).astype(np.float32)
    return np.full(leaf.shape, 1.0 if name in ("scale", "var") else 0.0, np.float32)

  return jax.tree_util.tree_map_with_path(draw, inception.abstract_variables(shape))


def main(argv: list[str]) -> None:
  del argv
  precision = jax.lax.Precision[_PRECISION.value.upper()]
  shape = (1, _RESOLUTION.value, _RESOLUTION.value, 3)
  variables = random_variables(shape)
  mesh = features.data_mesh()
  fn = features.make_extract_fn(mesh, precision)
  global_batch = _BATCH.value * mesh.size
  images = np.random.default_rng(0).integers(0, 256, (global_batch,) + shape[1:], dtype=np.uint8)
  run = lambda n: features.extract_features(np.concatenate([images] * n), variables, mesh=mesh,
                                            batch_size_per_device=_BATCH.value, extract_fn=fn)
  start = time.perf_counter()
  run(1)
  compile_s = time.perf_counter() - start
  start = time.perf_counter()
  run(_STEPS.value)
  elapsed = time.perf_counter() - start
  batch_sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
  placed = jax.ShapeDtypeStruct(images.shape, images.dtype, sharding=batch_sharding)
  cost = fn.lower(variables, placed).cost_analysis()  # HLO count, no second compile
  cost = cost[0] if isinstance(cost, list) else cost
  flops = (cost or {}).get("flops", float("nan")) / global_batch
  print(f"devices: {jax.device_count()} x {jax.devices()[0].device_kind}; "
        f"global batch {global_batch} at {_RESOLUTION.value}x{_RESOLUTION.value}; "
        f"precision {_PRECISION.value}")
  print(f"first call (compile + 1 step): {compile_s:.1f} s")
  print(f"{_STEPS.value * global_batch / elapsed:.2f} images/s "
        f"({elapsed / _STEPS.value:.3f} s/step); {flops / 1e9:.2f} GFLOP/image (XLA count)")


if __name__ == "__main__":
  app.run(main)

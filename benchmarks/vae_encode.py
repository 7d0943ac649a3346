r"""Throughput of the Flax SD-VAE encoder (and optionally decoder) on the local devices.

  python benchmarks/vae_encode.py                      # SD-VAE config, random weights, 256 px, batch 8
  python benchmarks/vae_encode.py --decode --dtype=bfloat16 --batch_size=64

Prints compile time, FLOPs per image (XLA's count, multiply-adds counted as 2) and steady-state
images/s. `prepare_latents` encodes every source image twice (as is and flipped), so its rate in
source images/s is half the encode rate printed here.
"""
import time

from absl import app
from absl import flags
import jax
import jax.numpy as jnp
import numpy as np

from dit_jax import flops as flops_lib, vae

_BATCH = flags.DEFINE_integer("batch_size", 8, "Images per call (sharded over all local devices).")
_SIZE = flags.DEFINE_integer("image_size", 256, "Image side in pixels.")
_ITERS = flags.DEFINE_integer("iters", 5, "Timed calls after one warm-up call.")
_DTYPE = flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "Compute dtype.")
_PRECISION = flags.DEFINE_enum("precision", "default", ["default", "high", "highest"], "Conv precision.")
_DECODE = flags.DEFINE_bool("decode", False, "Also time the decoder (latents of the same batch).")


def _time(name: str, fn, params, x) -> None:
  t0 = time.perf_counter()
  compiled = jax.jit(fn).lower(params, x).compile()
  compile_s = time.perf_counter() - t0
  flops = float(flops_lib.xla_cost(compiled).get("flops", float("nan")))
  jax.block_until_ready(compiled(params, x))  # warm-up
  t0 = time.perf_counter()
  for _ in range(_ITERS.value):
    out = compiled(params, x)
  jax.block_until_ready(out)
  step = (time.perf_counter() - t0) / _ITERS.value
  n = x.shape[0]
  print(f"{name}: batch {n} at {_SIZE.value} px, {_DTYPE.value}, precision {_PRECISION.value}: "
        f"compile {compile_s:.1f} s, {flops / n / 1e9:.1f} GFLOP/image, "
        f"{step * 1e3:.0f} ms/batch, {n / step:.2f} images/s")


def main(argv):
  del argv
  devices = jax.local_devices()
  print(f"devices: {len(devices)} x {devices[0].device_kind}")
  module = vae.AutoencoderKL(dtype=jnp.dtype(_DTYPE.value), precision=_PRECISION.value)  # SD-VAE config
  params = jax.jit(module.init)(jax.random.key(0), jnp.zeros((1, 8, 8, 3)))
  n_params = sum(p.size for p in jax.tree_util.tree_leaves(params))
  print(f"SD-VAE config, random weights: {n_params:,} parameters")
  mesh = jax.sharding.Mesh(np.array(devices), ("batch",))
  batch = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("batch"))
  params = jax.device_put(params, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec()))
  rng = np.random.default_rng(0)
  x = jax.device_put(rng.uniform(-1, 1, (_BATCH.value, _SIZE.value, _SIZE.value, 3)).astype(np.float32), batch)
  _time("encode", lambda p, x: module.apply(p, x, method=module.encode), params, x)
  if _DECODE.value:
    f = module.downsample_factor
    z = jax.device_put(rng.normal(size=(_BATCH.value, _SIZE.value // f, _SIZE.value // f, 4)).astype(np.float32),
                       batch)
    _time("decode", lambda p, z: module.apply(p, z, method=module.decode), params, z)


if __name__ == "__main__":
  app.run(main)

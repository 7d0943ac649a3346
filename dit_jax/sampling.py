"""The batched sampling loop (labels -> shard -> sample -> decode), its checks, and decoding.

The guided sampler it runs is dit_jax.guidance.make_sample_fn: one jitted (params, key,
labels, cfg_scale) -> latents whose whole loop is the objective's sampler.
"""

from __future__ import annotations

import contextlib
import functools
from typing import Any, Callable, Iterator

import jax
import jax.numpy as jnp
import numpy as np

from dit_jax import latent_norm
from dit_jax.models import DiT, has_null_class


def check_batch(model: DiT, cfg_scale: float, batch_size: int, num_devices: int,
                names: tuple[str, str] = ("cfg_scale", "batch_size")) -> None:
  """ValueError, naming the fields (`names`: the scale's, the batch's), unless a batched run of
  `model` can guide at `cfg_scale` and split `batch_size` over `num_devices`."""
  cfg_name, batch_name = names
  if batch_size % num_devices:
    raise ValueError(f"{batch_name}={batch_size} must divide by the {num_devices} devices")
  if cfg_scale != 1.0 and not has_null_class(model):
    raise ValueError(f"{cfg_name}={cfg_scale} needs a model trained with class dropout (a null "
                     f"class); this one has none: use {cfg_name}=1")


def sample_batches(sample_fn: Callable, decoder: Callable, params: Any, labels: np.ndarray, *,
                   batch_size: int, key: jax.Array, cfg_scale: float,
                   batch_sharding: Any = None, replicated: Any = None, mesh: Any = None,
                   matmul_precision: str | None = None) -> Iterator[tuple[int, jax.Array]]:
  """The batched loop: labels -> shard -> sample -> decode. Yields (first row, images), images
  uint8 [B, H, W, C] as `decoder` returns them (on device, sharded like the latents).

  Batch i samples with key fold_in(key, i). With `batch_sharding` every process passes all the
  labels, cycled to a multiple of batch_size, and each batch becomes one global array of
  which each process builds its own shards; without, the last batch may be shorter. Keys and
  the scale are placed with `replicated` when given. `mesh` and `matmul_precision` are the
  context of a jitted (not yet compiled) `sample_fn`: splash attention shard_maps itself
  over the mesh.
  """
  labels = np.asarray(labels, np.int32)
  if batch_sharding is not None:
    labels = np.resize(labels, -(-len(labels) // batch_size) * batch_size)
  scale = jnp.float32(cfg_scale)
  if replicated is not None:
    scale = jax.device_put(scale, replicated)
  for i, start in enumerate(range(0, len(labels), batch_size)):
    chunk = labels[start:start + batch_size]
    if batch_sharding is None:
      y = jnp.asarray(chunk)
    else:
      y = jax.make_array_from_callback(chunk.shape, batch_sharding, lambda idx, c=chunk: c[idx])
    k = jax.random.fold_in(key, i)
    if replicated is not None:
      k = jax.device_put(k, replicated)
    with contextlib.ExitStack() as context:
      if matmul_precision:
        context.enter_context(jax.default_matmul_precision(matmul_precision))
      if mesh is not None:
        context.enter_context(jax.set_mesh(mesh))
      latents = sample_fn(params, k, y, scale)
    yield start, decoder(latents)


class Decoder:
  """Latents (scaled, as the DiT sees them) -> uint8 images, on device, keeping the batch sharding.

  'identity' for pixel-space data, else a diffusers AutoencoderKL folder or a named VAE
  ("NAME:WEIGHTS", dit_jax.vae.named). `norm` is the latents' normalisation (a
  dit_jax.latent_norm.LatentNorm, or a scale factor), undone before decoding. The VAE
  parameters are passed as arguments, not folded into the executable as constants. Matmuls
  run at `matmul_precision` ('highest': float32 as the release decodes, also on TPUs, whose
  default is one bfloat16 pass). `compile(latents)` compiles ahead of time for one batch
  shape and sharding, so an error or out-of-memory shows before a training job starts.
  """

  def __init__(self, path: str, norm: "latent_norm.LatentNorm | float",
               params_sharding: Any = None, matmul_precision: str | None = "highest"):
    self.path, self.norm = path, latent_norm.as_norm(norm)
    self.matmul_precision = matmul_precision
    self._compiled: dict[Any, Any] = {}
    if path == "identity":
      self._jit, self._static, self._params = _identity_to_uint8, (), None
    else:
      from dit_jax import vae  # pylint: disable=import-outside-toplevel
      module, params = vae.load(path)
      self._jit, self._static = vae.decode_to_uint8, (module,)
      # Place the weights once (replicated over the mesh), not at every call.
      self._params = jax.device_put(params, params_sharding) if params_sharding else params

  @staticmethod
  def _key(latents: Any) -> Any:
    return latents.shape, latents.dtype, getattr(latents, "sharding", None)

  def compile(self, latents: Any) -> jax.ShapeDtypeStruct:
    """Compiles for latents like `latents` (an array or jax.ShapeDtypeStruct with sharding);
    returns the images' shape and dtype."""
    abstract = jax.ShapeDtypeStruct(latents.shape, latents.dtype,
                                    sharding=getattr(latents, "sharding", None))
    with jax.default_matmul_precision(self.matmul_precision):
      lowered = self._jit.lower(*self._static, self._params, abstract, norm=self.norm)
      self._compiled[self._key(abstract)] = lowered.compile()
    return lowered.out_info

  def __call__(self, latents: Any) -> jax.Array:
    compiled = self._compiled.get(self._key(latents))
    if compiled is not None:
      return compiled(self._params, latents)
    with jax.default_matmul_precision(self.matmul_precision):
      return self._jit(*self._static, self._params, latents, norm=self.norm)


@functools.partial(jax.jit, static_argnames=("norm",))
def _identity_to_uint8(params: None, latents: jax.Array,
                       norm: latent_norm.LatentNorm) -> jax.Array:
  del params  # the identity has none; same signature as the VAE's decoder
  return jnp.clip(127.5 * norm.denormalize(latents) + 128.0, 0, 255).astype(jnp.uint8)

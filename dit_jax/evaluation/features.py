"""Inception feature extraction, sharded over every device of every process.

The batch axis is split over a 1-D mesh ('data') of all devices; the Inception variables are
replicated. Every process passes the SAME global image stream (e.g. each host reads the same
.npz) and keeps only its own rows of each global batch, so nothing but features crosses hosts;
the features of each batch are all-gathered, so every process returns all of them, in order.
The last batch is zero-padded to the global batch size and the padding dropped afterwards.
"""
import collections
import functools
from typing import Any, Iterable, Iterator

import jax
import jax.numpy as jnp
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
import numpy as np

from dit_jax.evaluation import inception

FEATURE_KEYS = ("pool", "spatial", "logits", "logits_unbiased")


def data_mesh() -> Mesh:
  """1-D mesh over all devices, ordered by process so each host's rows are contiguous."""
  devices = sorted(jax.devices(), key=lambda d: (d.process_index, d.id))
  return Mesh(np.asarray(devices), ("data",))


def _rebatch(batches: Iterable[np.ndarray], size: int) -> Iterator[tuple[np.ndarray, int]]:
  """Re-chunks a stream of [b, H, W, 3] arrays into [size, H, W, 3] (last zero-padded), #valid."""
  pending, count = [], 0
  for batch in batches:
    batch = np.asarray(batch)
    if batch.ndim != 4 or batch.shape[-1] not in (1, 3):
      raise ValueError(f"images must be NHWC batches [N, H, W, 3] (or 1 channel), "
                       f"got {batch.shape}")
    if batch.shape[-1] == 1:  # grayscale: replicate to RGB, as FID tools do
      batch = np.repeat(batch, 3, axis=-1)
    while len(batch):
      take = min(size - count, len(batch))
      pending.append(batch[:take])
      batch, count = batch[take:], count + take
      if count == size:
        yield np.concatenate(pending), size
        pending, count = [], 0
  if count:
    last = np.concatenate(pending)
    pad = np.zeros((size - count,) + last.shape[1:], last.dtype)
    yield np.concatenate([last, pad]), count


def _as_batches(images: np.ndarray | Iterable[np.ndarray], size: int) -> Iterable[np.ndarray]:
  if isinstance(images, (np.ndarray, jax.Array)):
    images = np.asarray(images)
    if images.ndim != 4:
      raise ValueError(f"images must be [N, H, W, 3], got shape {images.shape}")
    return (images[i:i + size] for i in range(0, len(images), size))
  return images


@functools.lru_cache(maxsize=8)
def make_extract_fn(mesh: Mesh, precision: jax.lax.Precision = jax.lax.Precision.HIGHEST):
  """jit of FIDInceptionV3.apply: (variables, images [G, H, W, 3]) -> features, batch-sharded.

  Cached per mesh, so periodic evaluations in a training job compile once per image shape.
  """
  model = inception.FIDInceptionV3(precision=precision)
  replicated, batch = NamedSharding(mesh, P()), NamedSharding(mesh, P("data"))
  return jax.jit(model.apply, in_shardings=(replicated, batch), out_shardings=batch)


def make_sharded_extract_fn(sharding: NamedSharding,
                            precision: jax.lax.Precision = jax.lax.Precision.HIGHEST):
  """jit of (variables, images) -> features for images that are ALREADY a global batch on
  devices with `sharding` (e.g. decoded samples in a training job): each device runs the
  Inception on its own rows, nothing goes through the hosts. 1-channel images are repeated
  to RGB. Features keep the batch sharding; gather them with `gather_features`."""
  model = inception.FIDInceptionV3(precision=precision)

  def extract(variables, images):
    if images.shape[-1] == 1:
      images = jnp.repeat(images, 3, axis=-1)
    return model.apply(variables, images)

  replicated = NamedSharding(sharding.mesh, P())
  return jax.jit(extract, in_shardings=(replicated, sharding), out_shardings=sharding)


def gather_features(outputs: list[dict[str, jax.Array]], count: int) -> dict[str, np.ndarray]:
  """Batch-sharded feature dicts -> the first `count` rows as numpy, on every process."""
  gathered = [multihost_utils.process_allgather(o, tiled=True) if jax.process_count() > 1
              else jax.device_get(o) for o in outputs]
  return {k: np.concatenate([np.asarray(g[k]) for g in gathered])[:count] for k in FEATURE_KEYS}


def extract_features(images: np.ndarray | Iterable[np.ndarray], variables: Any, *,
                     batch_size_per_device: int = 32, mesh: Mesh | None = None,
                     extract_fn: Any = None) -> dict[str, np.ndarray]:
  """Inception features of a set of images, computed on all devices.

  Args:
    images: uint8 (or float in [0, 255]) NHWC images, an array [N, H, W, 3] or an iterable of
      such batches of any sizes; 1-channel images are replicated to RGB. In a multi-process
      job every process must pass the same images.
    variables: FID Inception variables (`convert.load_inception`).
    batch_size_per_device: images per device per step; the global batch is this x device count.
    mesh: 1-D mesh with axis 'data' (default: `data_mesh()`).
    extract_fn: the jitted function (default: `make_extract_fn(mesh)`, cached).
  Returns:
    {'pool': [N, 2048], 'spatial': [N, 2023], 'logits': [N, 1008], 'logits_unbiased': [N, 1008]}
    float32 numpy arrays, identical on every process.
  """
  mesh = mesh or data_mesh()
  extract_fn = extract_fn or make_extract_fn(mesh)
  global_batch = batch_size_per_device * mesh.size
  num_procs, proc = jax.process_count(), jax.process_index()
  local = global_batch // num_procs
  sharding = NamedSharding(mesh, P("data"))
  variables = jax.device_put(variables, NamedSharding(mesh, P()))
  outputs = {k: [] for k in FEATURE_KEYS}
  pending = collections.deque()

  def fetch():
    out, valid = pending.popleft()
    if num_procs > 1:
      out = multihost_utils.process_allgather(out, tiled=True)
    for k in FEATURE_KEYS:
      outputs[k].append(np.asarray(out[k])[:valid])

  for batch, valid in _rebatch(_as_batches(images, global_batch), global_batch):
    rows = batch[proc * local:(proc + 1) * local]
    array = jax.make_array_from_process_local_data(sharding, rows, batch.shape)
    pending.append((extract_fn(variables, array), valid))
    if len(pending) > 1:  # keep one step in flight while the host copies the previous one
      fetch()
  while pending:
    fetch()
  if not outputs["pool"]:
    raise ValueError("extract_features: no images were given")
  return {k: np.concatenate(v) for k, v in outputs.items()}

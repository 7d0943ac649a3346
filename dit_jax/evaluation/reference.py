"""Reference statistics: from an ADM reference batch .npz, an image folder or a TFDS dataset.

ADM's ImageNet reference batches (e.g. VIRTUAL_imagenet256_labeled.npz) hold `arr_0`, uint8
reference images [M, H, W, 3], and precomputed `mu`, `sigma`, `mu_s`, `sigma_s`. As in ADM, the
precomputed moments are used for FID/sFID when present, and the images' pool features for
precision/recall. Computed statistics are cached as an .npz with the same keys plus
`pool` (the reference pool features) and `source`, so later runs skip the Inception pass.
"""
import dataclasses
import os
from typing import Any, Iterator

import jax
from jax.experimental import multihost_utils
import numpy as np
import tensorflow as tf

from dit_jax import image_io
from dit_jax.evaluation import convert
from dit_jax.evaluation import features as features_lib
from dit_jax.evaluation import metrics

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
_MOMENT_KEYS = ("mu", "sigma", "mu_s", "sigma_s")


@dataclasses.dataclass
class ReferenceStats:
  """Moments of pool [2048] and spatial [2023] features; pool features [M, 2048] if known."""
  mu: np.ndarray
  sigma: np.ndarray
  mu_s: np.ndarray
  sigma_s: np.ndarray
  pool: np.ndarray | None = None
  source: str = ""

  @classmethod
  def from_features(cls, feats: dict[str, np.ndarray], source: str = "") -> "ReferenceStats":
    mu, sigma = metrics.feature_statistics(feats["pool"])
    mu_s, sigma_s = metrics.feature_statistics(feats["spatial"])
    return cls(mu, sigma, mu_s, sigma_s, np.asarray(feats["pool"], np.float32), source)

  def save(self, path: str) -> None:
    arrays = {k: getattr(self, k) for k in _MOMENT_KEYS}
    if self.pool is not None:
      arrays["pool"] = self.pool
    image_io.save_npz(path, source=np.asarray(self.source), **arrays)  # local or gs://, atomic

  @classmethod
  def load(cls, path: str) -> "ReferenceStats":
    with tf.io.gfile.GFile(path, "rb") as f, np.load(f) as data:
      missing = [k for k in _MOMENT_KEYS if k not in data.files]
      if missing:
        raise ValueError(f"{path}: reference statistics lack keys {missing} (has {data.files})")
      pool = data["pool"] if "pool" in data.files else None
      source = str(data["source"]) if "source" in data.files else path
      return cls(*(data[k] for k in _MOMENT_KEYS), pool=pool, source=source)


def _center_cropped(images: Iterator[Any], resolution: int | None) -> Iterator[np.ndarray]:
  from dit_jax import preprocessing  # pylint: disable=g-import-not-at-top
  for image in images:
    image = preprocessing.open_rgb(image)
    if resolution:
      image = preprocessing.center_crop(image, resolution)
    yield np.asarray(image, np.uint8)


def _batched(images: Iterator[np.ndarray], batch_size: int, source: str) -> Iterator[np.ndarray]:
  batch = []
  for image in images:
    if batch and image.shape != batch[0].shape:
      raise ValueError(f"{source}: images differ in size ({batch[0].shape} vs {image.shape}); "
                       "pass a resolution to center-crop them")
    batch.append(image)
    if len(batch) == batch_size:
      yield np.stack(batch)
      batch = []
  if batch:
    yield np.stack(batch)


def folder_images(directory: str, resolution: int | None = None,
                  max_images: int | None = None) -> Iterator[np.ndarray]:
  """uint8 [H, W, 3] images of a folder tree (sorted paths), ADM center-cropped if resolution."""
  paths = sorted(os.path.join(root, name) for root, _, names in tf.io.gfile.walk(directory)
                 for name in names if name.lower().endswith(IMAGE_EXTENSIONS))
  if not paths:
    raise ValueError(f"{directory}: no images ({', '.join(IMAGE_EXTENSIONS)}) found")
  return _center_cropped((_read_bytes(p) for p in paths[:max_images]), resolution)


def _read_bytes(path: str) -> bytes:
  with tf.io.gfile.GFile(path, "rb") as f:
    return f.read()


def tfds_images(name: str, split: str = "train", resolution: int | None = None,
                max_images: int | None = None) -> Iterator[np.ndarray]:
  """uint8 [H, W, 3] images of a TFDS dataset's 'image' feature, ADM center-cropped."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  tf.config.set_visible_devices([], "GPU")  # keep TF off the accelerators JAX uses
  ds = tfds.load(name, split=split, shuffle_files=False)
  if max_images:
    ds = ds.take(max_images)
  from PIL import Image  # pylint: disable=g-import-not-at-top
  return _center_cropped((Image.fromarray(ex["image"]) for ex in tfds.as_numpy(ds)), resolution)


def compute_reference(source: str, variables: Any, *, resolution: int | None = None,
                      max_images: int | None = None, batch_size_per_device: int = 32,
                      cache_path: str | None = None, mesh: Any = None) -> ReferenceStats:
  """Reference statistics from `source`, reusing `cache_path` if made from the same source/weights.

  Args:
    source: an ADM reference batch .npz (`arr_0` and/or `mu`, `sigma`, `mu_s`, `sigma_s`), an
      image folder, or 'tfds:NAME' / 'tfds:NAME:SPLIT' (e.g. 'tfds:imagenet2012:validation').
    variables: FID Inception variables.
    resolution: center-crop folder/TFDS images to this size (ADM crop); .npz images are used as is.
    max_images: use at most this many folder/TFDS images.
    cache_path: where computed statistics are saved (by process 0) and looked up (by all; used
      only if every process finds it).
  """
  key = (f"{source}|resolution={resolution}|max_images={max_images}"
         f"|inception={convert.fingerprint(variables) if variables is not None else None}")
  cached = None
  if cache_path and tf.io.gfile.exists(cache_path):
    cached = ReferenceStats.load(cache_path)
    cached = cached if cached.source == key else None
  hit = cached is not None
  if jax.process_count() > 1:  # every process must take the same path: the extraction is collective
    hit = bool(np.all(multihost_utils.process_allgather(np.asarray(hit))))
  if hit:
    return cached
  extract = lambda images: features_lib.extract_features(
      images, variables, batch_size_per_device=batch_size_per_device, mesh=mesh)
  if source.startswith("tfds:"):
    name, _, split = source[len("tfds:"):].partition(":")
    images = tfds_images(name, split or "train", resolution, max_images)
    stats = ReferenceStats.from_features(extract(_batched(images, 256, source)), key)
  elif tf.io.gfile.isdir(source):
    images = folder_images(source, resolution, max_images)
    stats = ReferenceStats.from_features(extract(_batched(images, 256, source)), key)
  elif source.endswith(".npz") and tf.io.gfile.exists(source):
    with tf.io.gfile.GFile(source, "rb") as f, np.load(f) as data:
      files = data.files
      moments = [data[k] for k in _MOMENT_KEYS] if all(k in files for k in _MOMENT_KEYS) else None
    if "arr_0" in files:
      image_io.check_images(source, channels=(1, 3))  # grayscale: the digits' in-job FID
      stats = ReferenceStats.from_features(extract(image_io.iter_npz_array(source)), key)
      if moments is not None:  # ADM: FID against the precomputed moments, P/R against arr_0
        stats.mu, stats.sigma, stats.mu_s, stats.sigma_s = moments
    elif moments is not None:  # nothing computed, nothing to cache; no precision/recall
      return ReferenceStats(*moments, pool=None, source=key)
    else:
      raise ValueError(f"{source}: a reference .npz needs arr_0 (uint8 images) or "
                       f"{', '.join(_MOMENT_KEYS)}; it has {files}")
  else:
    raise FileNotFoundError(f"reference {source!r} is not an .npz file, a folder or 'tfds:NAME'")
  if cache_path and jax.process_index() == 0:
    stats.save(cache_path)
  return stats

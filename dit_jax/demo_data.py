"""Built-in datasets for the demo and tests, written with the project's own record writer.

'digits': scikit-learn's 1,797 8x8 handwritten digits (10 classes), shipped inside the
package, in pixel space: an identity "VAE" with std 0 and scale 1, so the demo runs the
exact pipeline used for ImageNet latents.
"""

from __future__ import annotations

import os

import jax
import numpy as np
from jax.experimental import multihost_utils

from dit_jax import records

BUILTIN = ("digits",)


def digit_images() -> tuple[np.ndarray, np.ndarray]:
  """The digits as uint8 images [N, 8, 8, 1] (pixel 0..16 times 15) and their labels: the
  'image' extra of `write_digits(with_images=True)` and the digits teacher's data."""
  from sklearn.datasets import load_digits  # pylint: disable=import-outside-toplevel
  d = load_digits()
  return (d.images * 15).astype(np.uint8)[..., None], d.target


def write_digits(out_dir: str, num_shards: int = 4, with_images: bool = False) -> dict:
  """Writes the digits as latent records: x = pixel / 8 - 1 in [-1, 1], [8, 8, 1]; with_images,
  each also carries its image as the extra 'image' (uint8 [8, 8, 1], pixel x 15, flipped with
  the latent), which REPA's encoder reads."""
  from sklearn.datasets import load_digits  # pylint: disable=import-outside-toplevel
  d = load_digits()
  x = (d.images.astype(np.float32) / 8.0 - 1.0)[..., None]          # [N, 8, 8, 1]
  mean = np.stack([x, x[:, :, ::-1]], axis=1)                          # [N, 2, 8, 8, 1]
  images, _ = digit_images()
  os.makedirs(out_dir, exist_ok=True)
  for i, idx in enumerate(np.array_split(np.arange(len(x)), num_shards)):
    path = os.path.join(out_dir, f"digits-{i:05d}-of-{num_shards:05d}.tfrecord")
    if not records.shard_done(path):
      extras = {"image": records.Extra(images[idx], "width")} if with_images else None
      records.write_shard(path, d.target[idx], mean[idx], np.zeros_like(mean[idx]),
                          dtype="float32", extras=extras)
  return records.write_manifest(out_dir, vae="identity", scale_factor=1.0, num_classes=10,
                                extra={"image_size": 8, "downsample_factor": 1,
                                       "source": "sklearn.datasets.load_digits"})


def ensure(name: str, workdir: str, with_images: bool = False) -> str:
  """Directory of built-in dataset `name` under workdir, written (by process 0) if needed;
  with_images, the records carry each image too (in their own folder, NAME+images)."""
  if not name:
    raise ValueError("config.data.dir is empty: pass --config.data.dir=DIR with latents written "
                     "by `python -m dit_jax.prepare_latents`, or set config.data.builtin="
                     f"one of {BUILTIN}")
  if name not in BUILTIN:
    raise ValueError(f"config.data.builtin={name!r} is not one of {BUILTIN}")
  out = os.path.join(workdir, "data", name + ("+images" if with_images else ""))
  if jax.process_index() == 0 and not os.path.exists(os.path.join(out, records.MANIFEST)):
    write_digits(out, with_images=with_images)
  multihost_utils.sync_global_devices(f"builtin dataset {name} ready")
  return out

"""Latent record format: sharded TFRecord files plus a JSON manifest.

One record per source image (a `tf.train.Example`):

  label  int64                       class index (0 for unconditional data)
  mean   bytes  [2, h, w, c]         VAE posterior mean, raw little-endian `dtype`
  std    bytes  [2, h, w, c]         VAE posterior standard deviation, same dtype

Index 0 of the leading axis is the image, index 1 its horizontal flip, so the training
pipeline can draw the release's random flip and a fresh posterior sample
`(mean + std * noise) * scale_factor` every step at precomputed cost. Values are stored
UNSCALED; the scale factor (0.18215 for the SD VAE) lives in the manifest.

Each shard `X.tfrecord` is written atomically (temporary file, then rename) together with
a sidecar `X.tfrecord.json` (count, byte size, sha256, shape, dtype, extra), so an
interrupted writer can skip finished shards. `write_manifest` gathers the sidecars into
`manifest.json`:

  {"format": "dit_jax.latents.v1", "latent_shape": [h, w, c], "dtype": "float16",
   "count": N, "num_classes": K, "vae": "...", "scale_factor": 0.18215,
   "num_skipped": 0, "shards": [{"file", "count", "bytes", "sha256"}, ...], ...extra}
"""

from __future__ import annotations

import hashlib
import json
import os
from typing import Any, Sequence

import numpy as np
import tensorflow as tf

FORMAT = "dit_jax.latents.v1"
MANIFEST = "manifest.json"
SUPPORTED_DTYPES = ("float16", "float32")


def sha256(path: str) -> str:
  """Hex sha256 of a (local or gs://) file, streamed."""
  h = hashlib.sha256()
  with tf.io.gfile.GFile(path, "rb") as f:
    for chunk in iter(lambda: f.read(1 << 22), b""):
      h.update(chunk)
  return h.hexdigest()


def _atomic_write_text(path: str, text: str) -> None:
  tmp = path + ".tmp"
  with tf.io.gfile.GFile(tmp, "w") as f:
    f.write(text)
  tf.io.gfile.rename(tmp, path, overwrite=True)


def write_shard(path: str, labels: np.ndarray, mean: np.ndarray, std: np.ndarray,
                *, dtype: str = "float16", extra: dict | None = None) -> dict:
  """Writes one shard of latent records atomically and returns its sidecar dict.

  Args:
    path: destination `.tfrecord` path (local or gs://).
    labels: int [n].
    mean: float [n, 2, h, w, c]; [:, 0] the image, [:, 1] its horizontal flip.
    std: float [n, 2, h, w, c], same layout (zeros for a deterministic encoder).
    dtype: storage dtype, one of SUPPORTED_DTYPES.
    extra: small JSON-serialisable dict kept in the sidecar (e.g. skipped files).
  """
  if dtype not in SUPPORTED_DTYPES:
    raise ValueError(f"dtype must be one of {SUPPORTED_DTYPES}, got {dtype!r}")
  labels = np.asarray(labels)
  mean, std = np.asarray(mean), np.asarray(std)
  n = labels.shape[0]
  if labels.ndim != 1:
    raise ValueError(f"{path}: labels must be [n], got shape {labels.shape}")
  if mean.ndim != 5 or mean.shape[0] != n or mean.shape[1] != 2:
    raise ValueError(f"{path}: mean must be [n={n}, 2, h, w, c], got shape {mean.shape}")
  if std.shape != mean.shape:
    raise ValueError(f"{path}: std shape {std.shape} must equal mean shape {mean.shape}")
  if not (np.all(np.isfinite(mean)) and np.all(np.isfinite(std))):
    raise ValueError(f"{path}: mean/std contain non-finite values")
  mean = mean.astype(np.dtype(dtype).newbyteorder("<"))
  std = std.astype(np.dtype(dtype).newbyteorder("<"))

  tmp = path + ".tmp"
  with tf.io.TFRecordWriter(tmp) as w:
    for i in range(n):
      feats = {
          "label": tf.train.Feature(int64_list=tf.train.Int64List(value=[int(labels[i])])),
          "mean": tf.train.Feature(bytes_list=tf.train.BytesList(value=[mean[i].tobytes()])),
          "std": tf.train.Feature(bytes_list=tf.train.BytesList(value=[std[i].tobytes()])),
      }
      w.write(tf.train.Example(features=tf.train.Features(feature=feats)).SerializeToString())
  tf.io.gfile.rename(tmp, path, overwrite=True)
  info = {
      "file": os.path.basename(path),
      "count": int(n),
      "bytes": int(tf.io.gfile.stat(path).length),
      "sha256": sha256(path),
      "latent_shape": [int(d) for d in mean.shape[2:]],
      "dtype": dtype,
      "extra": extra or {},
  }
  _atomic_write_text(path + ".json", json.dumps(info, indent=1))
  return info


def shard_done(path: str) -> bool:
  """True if `path` and its sidecar exist and the file size matches the sidecar."""
  side = path + ".json"
  if not (tf.io.gfile.exists(path) and tf.io.gfile.exists(side)):
    return False
  try:
    with tf.io.gfile.GFile(side) as f:
      info = json.load(f)
    return int(info["bytes"]) == tf.io.gfile.stat(path).length
  except (ValueError, KeyError, tf.errors.OpError):
    return False


def write_manifest(out_dir: str, *, vae: str, scale_factor: float, num_classes: int,
                   extra: dict | None = None) -> dict:
  """Gathers every shard sidecar in `out_dir` into `out_dir/manifest.json`."""
  sides = sorted(tf.io.gfile.glob(os.path.join(out_dir, "*.tfrecord.json")))
  if not sides:
    raise FileNotFoundError(f"{out_dir}: no finished shards (*.tfrecord.json) to list")
  shards, shape, dtype, skipped = [], None, None, 0
  for side in sides:
    with tf.io.gfile.GFile(side) as f:
      info = json.load(f)
    if shape is None:
      shape, dtype = info["latent_shape"], info["dtype"]
    if info["latent_shape"] != shape or info["dtype"] != dtype:
      raise ValueError(f"{side}: shard has shape {info['latent_shape']} / {info['dtype']}, "
                       f"but other shards have {shape} / {dtype}")
    skipped += int(info.get("extra", {}).get("skipped", 0))
    shards.append({k: info[k] for k in ("file", "count", "bytes", "sha256")})
  manifest = {
      "format": FORMAT,
      "latent_shape": shape,
      "dtype": dtype,
      "count": sum(s["count"] for s in shards),
      "num_classes": int(num_classes),
      "vae": vae,
      "scale_factor": float(scale_factor),
      "num_skipped": skipped,
      "shards": shards,
  }
  manifest.update(extra or {})
  _atomic_write_text(os.path.join(out_dir, MANIFEST), json.dumps(manifest, indent=1))
  return manifest


def read_manifest(data_dir: str) -> dict:
  """Reads and validates `data_dir/manifest.json`; errors name the file and the field."""
  path = os.path.join(data_dir, MANIFEST)
  if not tf.io.gfile.exists(path):
    raise FileNotFoundError(
        f"{path} not found: a latent dataset directory needs the manifest written by "
        "dit_jax.prepare_latents (or records.write_manifest)")
  try:
    with tf.io.gfile.GFile(path) as f:
      m = json.load(f)
  except ValueError as e:
    raise ValueError(f"{path}: not valid JSON ({e})") from e
  for key in ("format", "latent_shape", "dtype", "count", "num_classes", "scale_factor", "shards"):
    if key not in m:
      raise ValueError(f"{path}: missing field {key!r}")
  if m["format"] != FORMAT:
    raise ValueError(f"{path}: format {m['format']!r} is not {FORMAT!r}")
  if m["dtype"] not in SUPPORTED_DTYPES:
    raise ValueError(f"{path}: dtype {m['dtype']!r} not in {SUPPORTED_DTYPES}")
  if len(m["latent_shape"]) != 3:
    raise ValueError(f"{path}: latent_shape must be [h, w, c], got {m['latent_shape']}")
  if sum(s["count"] for s in m["shards"]) != m["count"]:
    raise ValueError(f"{path}: shard counts do not add up to count={m['count']}")
  return m


def check_shards(data_dir: str, manifest: dict, files: Sequence[str] | None = None,
                 verify_checksums: bool = False) -> None:
  """Checks that shards exist with the manifest's byte size (and sha256 if asked), and that
  their sidecars (written with each shard) agree with the manifest's shape and dtype."""
  by_name = {s["file"]: s for s in manifest["shards"]}
  for name in files if files is not None else list(by_name):
    s = by_name[name]
    path = os.path.join(data_dir, name)
    if not tf.io.gfile.exists(path):
      raise FileNotFoundError(f"{path}: shard listed in the manifest is missing")
    _check_sidecar(data_dir, manifest, path, s)
    size = tf.io.gfile.stat(path).length
    if size != s["bytes"]:
      raise ValueError(f"{path}: shard is {size} bytes but the manifest says {s['bytes']} "
                       "(truncated or corrupt; re-run dit_jax.prepare_latents for it)")
    if verify_checksums and sha256(path) != s["sha256"]:
      raise ValueError(f"{path}: sha256 does not match the manifest (corrupt shard)")


def _check_sidecar(data_dir: str, manifest: dict, path: str, entry: dict) -> None:
  side = path + ".json"
  if not tf.io.gfile.exists(side):
    return  # a dataset copied without its sidecars: only the manifest speaks for the shards
  try:
    with tf.io.gfile.GFile(side) as f:
      info = json.load(f)
  except ValueError as e:
    raise ValueError(f"{side}: not valid JSON ({e})") from None
  want = {"latent_shape": manifest["latent_shape"], "dtype": manifest["dtype"],
          "count": entry["count"], "bytes": entry["bytes"]}
  for key, value in want.items():
    if key in info and info[key] != value:
      raise ValueError(
          f"{os.path.join(data_dir, MANIFEST)}: {key} is {value} for {os.path.basename(path)}, "
          f"but the shard was written with {key} {info[key]} ({side}): the manifest was edited or "
          "belongs to other shards; write it again with records.write_manifest")


def example_spec() -> dict[str, Any]:
  return {
      "label": tf.io.FixedLenFeature([], tf.int64),
      "mean": tf.io.FixedLenFeature([], tf.string),
      "std": tf.io.FixedLenFeature([], tf.string),
  }


def decode_fn(manifest: dict):
  """Returns a tf function (serialized, filename) -> dict(label, mean, std) that checks sizes."""
  shape = [2] + list(manifest["latent_shape"])
  dt = tf.float16 if manifest["dtype"] == "float16" else tf.float32
  want = int(np.prod(shape)) * (2 if dt == tf.float16 else 4)

  def decode(serialized, filename):
    ex = tf.io.parse_single_example(serialized, example_spec())
    out = {"label": tf.cast(ex["label"], tf.int32)}
    for k in ("mean", "std"):
      n = tf.strings.length(ex[k])
      check = tf.debugging.Assert(
          tf.equal(n, want),
          [f"Latent record field {k!r} in", filename, "has", n,
           f"bytes; the manifest's latent_shape {shape[1:]} x2 orientations in "
           f"{manifest['dtype']} needs {want}"])
      with tf.control_dependencies([check]):
        out[k] = tf.reshape(tf.io.decode_raw(ex[k], dt, little_endian=True), shape)
    return out

  return decode


def read_all(data_dir: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """Reads a whole (small) dataset in manifest order: labels [N], mean/std [N, 2, h, w, c]."""
  m = read_manifest(data_dir)
  check_shards(data_dir, m)
  decode = decode_fn(m)
  labels, means, stds = [], [], []
  for s in m["shards"]:
    path = os.path.join(data_dir, s["file"])
    for rec in tf.data.TFRecordDataset(path):
      ex = decode(rec, tf.constant(path))
      labels.append(ex["label"].numpy())
      means.append(ex["mean"].numpy())
      stds.append(ex["std"].numpy())
  return np.array(labels), np.stack(means), np.stack(stds)

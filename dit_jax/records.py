"""Latent record format: sharded TFRecord files plus a JSON manifest.

One record per source image (a `tf.train.Example`):

  label  int64                       class index (0 for unconditional data)
  mean   bytes  [2, h, w, c]         VAE posterior mean, raw little-endian `dtype`
  std    bytes  [2, h, w, c]         VAE posterior standard deviation, same dtype
  NAME   bytes  [*shape]             optional named extras (see `Extra`), raw little-endian

Index 0 of the leading axis is the image, index 1 its horizontal flip, so the training
pipeline can draw the release's random flip and a fresh posterior sample
`(mean + std * noise) * scale_factor` every step at precomputed cost. Values are stored
UNSCALED; the normalisation lives in the manifest (dit_jax.latent_norm): the scale factor
(0.18215 for the SD VAE) and, for per-channel normalisation (the VA-VAE), `latent_stats`.

Extras are further per-example arrays for objectives that need more than the latents (a
center-cropped uint8 image for a representation encoder, precomputed encoder features).
Each declares how the train step's random horizontal flip applies to it (`flip`): 'width'
arrays are flipped along W on device, 'none' arrays are left alone. `batch_spec` and
`flip_modes` say what a batch holds and how each array flips; they need only numpy, so the
train step can use them where TensorFlow is not installed (TensorFlow is imported only by
the functions that read or write files).

Each shard `X.tfrecord` is written atomically (temporary file, then rename) together with
a sidecar `X.tfrecord.json` (count, byte size, sha256, shape, dtype, extras, the per-channel
moments of the stored posteriors, extra), so an interrupted writer can skip finished shards. `write_manifest` gathers the sidecars into
`manifest.json`:

  {"format": "dit_jax.latents.v1", "latent_shape": [h, w, c], "dtype": "float16",
   "count": N, "num_classes": K, "vae": "...", "scale_factor": 0.18215,
   "num_skipped": 0, "shards": [{"file", "count", "bytes", "sha256"}, ...],
   "latent_stats": {"mean": [c], "std": [c]},  # per-channel normalisation only
   "extras": {NAME: {"shape": [...], "dtype": "uint8", "flip": "width"[, "encoding": "png"]},
              ...},  # if any
   ...extra}
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from typing import Any, Mapping, Sequence

import numpy as np

from dit_jax import latent_norm

FORMAT = "dit_jax.latents.v1"
MANIFEST = "manifest.json"
SUPPORTED_DTYPES = ("float16", "float32")
EXTRA_DTYPES = ("uint8", "int32", "float16", "float32")
FLIPS = ("width", "none")
# How an extra is stored: 'raw' little-endian bytes, or 'png' (uint8 images [H, W] or
# [H, W, C], C in 1..4: lossless and compact; decoded on the host by the input pipeline).
ENCODINGS = ("raw", "png")
# The batch's own arrays, and the train step's names for the latent and the label dropout.
RESERVED_NAMES = ("label", "mean", "std", "x0", "drop")


@dataclasses.dataclass(frozen=True, eq=False)
class Extra:
  """A named per-example array stored beside the latents (see `write_shard`).

  Attributes:
    value: [n, ...] one row per record, dtype one of EXTRA_DTYPES (stored as is, no cast).
    flip: how the train step's random horizontal flip applies: 'width' for a spatial array
      [n, H, W] or [n, H, W, C], flipped along W (axis 2 of the batched array) together with
      the latents; 'none' for an array without a width axis (features, captions, ...).
    encoding: 'raw' (the bytes as they are) or 'png' (uint8 images, lossless; the manifest
      records it, and batches hold the decoded array).
  """
  value: np.ndarray
  flip: str
  encoding: str = "raw"


def sha256(path: str) -> str:
  """Hex sha256 of a (local or gs://) file, streamed."""
  import tensorflow as tf  # pylint: disable=import-outside-toplevel
  h = hashlib.sha256()
  with tf.io.gfile.GFile(path, "rb") as f:
    for chunk in iter(lambda: f.read(1 << 22), b""):
      h.update(chunk)
  return h.hexdigest()


def _atomic_write_text(path: str, text: str) -> None:
  import tensorflow as tf  # pylint: disable=import-outside-toplevel
  tmp = path + ".tmp"
  with tf.io.gfile.GFile(tmp, "w") as f:
    f.write(text)
  tf.io.gfile.rename(tmp, path, overwrite=True)


def _check_name(where: str, name: Any) -> None:
  if not isinstance(name, str) or not name.isidentifier() or name in RESERVED_NAMES:
    raise ValueError(f"{where}: extra name {name!r} must be a Python identifier other than "
                     f"{RESERVED_NAMES}")


def _check_extra(path: str, name: Any, extra: Any, n: int) -> np.ndarray:
  """Validates one extra of a shard of n records; returns its value, little-endian [n, ...]."""
  _check_name(path, name)
  if not isinstance(extra, Extra):
    raise TypeError(f"{path}: extra {name!r} must be a records.Extra(value, flip), "
                    f"got {type(extra).__name__}")
  value = np.asarray(extra.value)
  where = f"{path}: extra {name!r}"
  if value.dtype.name not in EXTRA_DTYPES:
    raise ValueError(f"{where} has dtype {value.dtype}, not one of {EXTRA_DTYPES} (cast it: "
                     "extras are stored without conversion)")
  if value.ndim < 1 or value.shape[0] != n:
    raise ValueError(f"{where} must be [n={n}, ...], got shape {value.shape}")
  if extra.flip not in FLIPS:
    raise ValueError(f"{where}: flip {extra.flip!r} not in {FLIPS}")
  if extra.encoding not in ENCODINGS:
    raise ValueError(f"{where}: encoding {extra.encoding!r} not in {ENCODINGS}")
  if extra.encoding == "png" and (value.dtype != np.uint8 or value.ndim not in (3, 4) or (
      value.ndim == 4 and not 1 <= value.shape[3] <= 4)):
    raise ValueError(f"{where}: 'png' stores uint8 images [n, H, W] or [n, H, W, C<=4], got "
                     f"{value.dtype} {value.shape}")
  if extra.flip == "width" and value.ndim < 3:
    raise ValueError(f"{where}: flip 'width' needs a spatial [n, H, W] or [n, H, W, C] array, "
                     f"got shape {value.shape}")
  if value.dtype.kind == "f" and not np.all(np.isfinite(value)):
    raise ValueError(f"{where} contains non-finite values")
  return value.astype(value.dtype.newbyteorder("<"), copy=False)


def write_shard(path: str, labels: np.ndarray, mean: np.ndarray, std: np.ndarray,
                *, dtype: str = "float16", extra: dict | None = None,
                extras: Mapping[str, Extra] | None = None) -> dict:
  """Writes one shard of latent records atomically and returns its sidecar dict.

  Args:
    path: destination `.tfrecord` path (local or gs://).
    labels: int [n].
    mean: float [n, 2, h, w, c]; [:, 0] the image, [:, 1] its horizontal flip.
    std: float [n, 2, h, w, c], same layout (zeros for a deterministic encoder).
    dtype: storage dtype of mean and std, one of SUPPORTED_DTYPES.
    extra: small JSON-serialisable dict kept in the sidecar (e.g. skipped files).
    extras: named per-example arrays stored in each record beside the latents, name ->
      Extra(value [n, ...], flip); every shard of a dataset must carry the same names with
      the same per-example shapes, dtypes and flips (`write_manifest` checks).
  """
  import tensorflow as tf  # pylint: disable=import-outside-toplevel
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
  extras = dict(extras or {})
  for name in extras:
    _check_name(path, name)  # before sorting, which needs str names
  # Sorted so that shards written from differently ordered dicts get identical sidecars.
  values = {name: _check_extra(path, name, extras[name], n) for name in sorted(extras)}

  tmp = path + ".tmp"
  with tf.io.TFRecordWriter(tmp) as w:
    for i in range(n):
      feats = {
          "label": tf.train.Feature(int64_list=tf.train.Int64List(value=[int(labels[i])])),
          "mean": tf.train.Feature(bytes_list=tf.train.BytesList(value=[mean[i].tobytes()])),
          "std": tf.train.Feature(bytes_list=tf.train.BytesList(value=[std[i].tobytes()])),
      }
      for name, value in values.items():
        if extras[name].encoding == "png":
          img = value[i] if value.ndim == 4 else value[i][..., None]
          data = tf.io.encode_png(img).numpy()
        else:
          data = value[i].tobytes()
        feats[name] = tf.train.Feature(bytes_list=tf.train.BytesList(value=[data]))
      w.write(tf.train.Example(features=tf.train.Features(feature=feats)).SerializeToString())
  tf.io.gfile.rename(tmp, path, overwrite=True)
  info = {
      "file": os.path.basename(path),
      "count": int(n),
      "bytes": int(tf.io.gfile.stat(path).length),
      "sha256": sha256(path),
      "latent_shape": [int(d) for d in mean.shape[2:]],
      "dtype": dtype,
      # 'encoding' only where it is not raw: manifests of raw extras keep their three fields.
      "extras": {name: {"shape": [int(d) for d in v.shape[1:]], "dtype": v.dtype.name,
                        "flip": extras[name].flip,
                        **({"encoding": extras[name].encoding}
                           if extras[name].encoding != "raw" else {})}
                 for name, v in values.items()},
      # Of the values as stored (after the cast): what training reads.
      "channel_moments": latent_norm.channel_moments(mean, std),
      "extra": extra or {},
  }
  _atomic_write_text(path + ".json", json.dumps(info, indent=1))
  return info


def shard_done(path: str) -> bool:
  """True if `path` and its sidecar exist and the file size matches the sidecar."""
  import tensorflow as tf  # pylint: disable=import-outside-toplevel
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
                   extra: dict | None = None, per_channel: bool = False) -> dict:
  """Gathers every shard sidecar in `out_dir` into `out_dir/manifest.json`.

  Every shard must have the same latent shape, dtype and extras. `extra` adds free-form
  top-level fields (class names, provenance). `per_channel`: the latents are normalised by
  their per-channel statistics over every shard (`latent_stats`), then times `scale_factor`.
  """
  import tensorflow as tf  # pylint: disable=import-outside-toplevel
  if extra and "extras" in extra:
    raise ValueError("write_manifest: 'extras' is gathered from the shards' sidecars; pass the "
                     "arrays to write_shard(extras=...) instead of a manifest field")
  sides = sorted(tf.io.gfile.glob(os.path.join(out_dir, "*.tfrecord.json")))
  if not sides:
    raise FileNotFoundError(f"{out_dir}: no finished shards (*.tfrecord.json) to list")
  shards, shape, dtype, extras, skipped, moments = [], None, None, None, 0, []
  for side in sides:
    with tf.io.gfile.GFile(side) as f:
      info = json.load(f)
    mine = info.get("extras", {})  # sidecars from before extras existed have none
    if shape is None:
      shape, dtype, extras = info["latent_shape"], info["dtype"], mine
    if info["latent_shape"] != shape or info["dtype"] != dtype:
      raise ValueError(f"{side}: shard has shape {info['latent_shape']} / {info['dtype']}, "
                       f"but other shards have {shape} / {dtype}")
    if mine != extras:
      raise ValueError(f"{side}: shard has extras {mine}, but other shards have {extras}; "
                       "every shard must carry the same extras (names, shapes, dtypes, flips)")
    skipped += int(info.get("extra", {}).get("skipped", 0))
    if per_channel:
      if "channel_moments" not in info:
        raise ValueError(f"{side}: the shard records no channel_moments (written before "
                         "per-channel statistics existed): rewrite it for per-channel "
                         "normalisation")
      moments.append(info["channel_moments"])
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
  if extras:  # absent when none, so datasets without extras keep their manifests unchanged
    manifest["extras"] = extras
  if per_channel:
    manifest["latent_stats"] = latent_norm.stats_from_moments(moments)
  manifest.update(extra or {})
  latent_norm.from_record(manifest, os.path.join(out_dir, MANIFEST)).check_channels(
      shape[-1], f"{out_dir}: the shards' latents")
  _atomic_write_text(os.path.join(out_dir, MANIFEST), json.dumps(manifest, indent=1))
  return manifest


def _check_extras_field(path: str, extras: Any) -> None:
  """Validates a manifest's `extras` field; errors name `path` and the extra."""
  if not isinstance(extras, dict):
    raise ValueError(f"{path}: extras must be a dict name -> {{shape, dtype, flip}}, "
                     f"got {extras!r}")
  for name, spec in extras.items():
    _check_name(path, name)
    where = f"{path}: extras[{name!r}]"
    if not isinstance(spec, dict) or not {"shape", "dtype", "flip"} <= set(spec) <= {
        "shape", "dtype", "flip", "encoding"}:
      raise ValueError(f"{where} must be {{'shape', 'dtype', 'flip'[, 'encoding']}}, "
                       f"got {spec!r}")
    if spec.get("encoding", "raw") not in ENCODINGS:
      raise ValueError(f"{where}: encoding {spec['encoding']!r} not in {ENCODINGS}")
    shape = spec["shape"]
    if not isinstance(shape, list) or not all(
        isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape):
      raise ValueError(f"{where}: shape must be a list of non-negative ints, got {shape!r}")
    if spec["dtype"] not in EXTRA_DTYPES:
      raise ValueError(f"{where}: dtype {spec['dtype']!r} not in {EXTRA_DTYPES}")
    if spec["flip"] not in FLIPS:
      raise ValueError(f"{where}: flip {spec['flip']!r} not in {FLIPS}")
    if spec["flip"] == "width" and len(shape) < 2:
      raise ValueError(f"{where}: flip 'width' needs a per-example shape [H, W] or [H, W, C], "
                       f"got {shape}")


def read_manifest(data_dir: str) -> dict:
  """Reads and validates `data_dir/manifest.json`; errors name the file and the field."""
  import tensorflow as tf  # pylint: disable=import-outside-toplevel
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
  if "extras" in m:
    _check_extras_field(path, m["extras"])
  latent_norm.from_record(m, path).check_channels(m["latent_shape"][-1], f"{path}: the latents")
  return m


def check_shards(data_dir: str, manifest: dict, files: Sequence[str] | None = None,
                 verify_checksums: bool = False) -> None:
  """Checks that shards exist with the manifest's byte size (and sha256 if asked), and that
  their sidecars (written with each shard) agree with the manifest's shape, dtype and extras."""
  import tensorflow as tf  # pylint: disable=import-outside-toplevel
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
  import tensorflow as tf  # pylint: disable=import-outside-toplevel
  side = path + ".json"
  if not tf.io.gfile.exists(side):
    return  # a dataset copied without its sidecars: only the manifest speaks for the shards
  try:
    with tf.io.gfile.GFile(side) as f:
      info = json.load(f)
  except ValueError as e:
    raise ValueError(f"{side}: not valid JSON ({e})") from None
  want = {"latent_shape": manifest["latent_shape"], "dtype": manifest["dtype"],
          "extras": manifest.get("extras", {}), "count": entry["count"], "bytes": entry["bytes"]}
  for key, value in want.items():
    if key in info and info[key] != value:
      raise ValueError(
          f"{os.path.join(data_dir, MANIFEST)}: {key} is {value} for {os.path.basename(path)}, "
          f"but the shard was written with {key} {info[key]} ({side}): the manifest was edited or "
          "belongs to other shards; write it again with records.write_manifest")


def batch_spec(manifest: dict, batch_size: int) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
  """Shape and dtype of every array in a batch of `batch_size` records from the pipeline.

  Returns:
    name -> (shape, dtype): label ([B], int32), mean and std ([B, 2, h, w, c], the manifest's
    dtype) and each extra ([B, *shape], its dtype), in that order.
  """
  b = int(batch_size)
  moments = ((b, 2, *(int(d) for d in manifest["latent_shape"])), np.dtype(manifest["dtype"]))
  spec = {"label": ((b,), np.dtype(np.int32)), "mean": moments, "std": moments}
  for name, e in manifest.get("extras", {}).items():
    spec[name] = ((b, *(int(d) for d in e["shape"])), np.dtype(e["dtype"]))
  return spec


def flip_modes(manifest: dict) -> dict[str, str]:
  """How the train step's per-example horizontal flip applies to each batch array.

  Returns:
    name -> mode for every array of `batch_spec` except label: 'pair' for mean and std
    ([B, 2, ...], index 1 of axis 1 the stored flipped orientation: select it), and each
    extra's flip: 'width' (reverse axis 2 of the batch array) or 'none' (leave it).
  """
  modes = {"mean": "pair", "std": "pair"}
  modes.update({name: e["flip"] for name, e in manifest.get("extras", {}).items()})
  return modes


def example_spec(extras: Mapping[str, Any] | None = None) -> dict[str, Any]:
  """tf.io parsing spec of a record with the manifest's `extras` (name -> {shape, dtype})."""
  import tensorflow as tf  # pylint: disable=import-outside-toplevel
  spec = {
      "label": tf.io.FixedLenFeature([], tf.int64),
      "mean": tf.io.FixedLenFeature([], tf.string),
      "std": tf.io.FixedLenFeature([], tf.string),
  }
  # An absent extra parses as b"", so decode_fn's size check reports it with the file named
  # (parse_single_example's own "required feature" error would not name it).
  for name in extras or {}:
    spec[name] = tf.io.FixedLenFeature([], tf.string, default_value="")
  return spec


def decode_fn(manifest: dict):
  """Returns a tf function (serialized, filename) -> dict(label, mean, std, *extras).

  label int32 [], mean/std [2, h, w, c] in the manifest dtype, each extra its manifest shape
  and dtype (see `batch_spec`). Every bytes field's size is checked, the error naming the
  field and the file.
  """
  import tensorflow as tf  # pylint: disable=import-outside-toplevel
  shape = [2] + list(manifest["latent_shape"])
  extras = manifest.get("extras", {})
  # field -> (shape, dtype, byte size, what the manifest says it is)
  fields = {}
  for k in ("mean", "std"):
    dt = np.dtype(manifest["dtype"])
    fields[k] = (shape, dt, int(np.prod(shape)) * dt.itemsize,
                 f"the manifest's latent_shape {shape[1:]} x2 orientations in {manifest['dtype']}")
  pngs = {}  # name -> shape of the 'png' extras, decoded and checked separately
  for name, e in extras.items():
    dt = np.dtype(e["dtype"])
    if e.get("encoding", "raw") == "png":
      pngs[name] = list(e["shape"])
      continue
    fields[name] = (list(e["shape"]), dt, int(np.prod(e["shape"], dtype=np.int64)) * dt.itemsize,
                    f"the manifest's extras[{name!r}] shape {list(e['shape'])} in {e['dtype']}")
  spec = example_spec(extras)

  def decode(serialized, filename):
    ex = tf.io.parse_single_example(serialized, spec)
    out = {"label": tf.cast(ex["label"], tf.int32)}
    for k, (field_shape, dt, want, what) in fields.items():
      n = tf.strings.length(ex[k])
      check = tf.debugging.Assert(
          tf.equal(n, want),
          [f"Latent record field {k!r} in", filename, "has", n, f"bytes; {what} needs {want}"])
      with tf.control_dependencies([check]):
        out[k] = tf.reshape(tf.io.decode_raw(ex[k], tf.as_dtype(dt), little_endian=True),
                            field_shape)
    for k, shape in pngs.items():
      img = tf.io.decode_png(ex[k], channels=shape[2] if len(shape) == 3 else 1)
      check = tf.debugging.Assert(
          tf.reduce_all(tf.equal(tf.shape(img)[:2], shape[:2])),
          [f"Latent record field {k!r} in", filename, "decodes to", tf.shape(img),
           f"; the manifest's extras[{k!r}] shape is {shape}"])
      with tf.control_dependencies([check]):
        out[k] = tf.reshape(img, shape)
    return out

  return decode

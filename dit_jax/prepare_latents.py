r"""Encodes an image dataset into VAE latent records for training (see `records.py`, docs/latents.md).

  python -m dit_jax.prepare_latents --source=/data/imagenet/train \
      --vae=/ckpt/sd-vae-ft-ema --out=/data/latents256 --image_size=256

`--source` is an ImageFolder tree (one sub-folder per class; labels are the indices of the sorted
folder names, as torchvision's ImageFolder) or `tfds:NAME` for a TFDS image dataset, e.g.
`tfds:imagenet2012 --split=train --tfds_manual_dir=/data/imagenet_tars`.

Every image goes through the release's ADM center crop (`preprocessing.py`); the image and its
horizontal flip are encoded together and the posterior mean and std of both are stored, unscaled.
The sorted example list is split into contiguous ranges, one per process, and each process cuts
its range into shards `latents-p{process:03d}-{shard:05d}.tfrecord` that it encodes with the batch
sharded over its own devices, so processes never wait for each other until the end. Finished
shards are skipped on a rerun; unreadable images are logged, skipped and counted. Process 0 writes
`manifest.json` once every expected shard exists.
"""
import collections
import concurrent.futures
import json
import os
import time
from typing import Any, Callable, Iterator, Sequence

from absl import app
from absl import flags
from absl import logging
import jax
from jax.experimental import multihost_utils
import jax.numpy as jnp
import numpy as np
import tensorflow as tf

from dit_jax import latent_norm
from dit_jax import preprocessing
from dit_jax import records
from dit_jax import runtime
from dit_jax import vae as vae_lib

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
SHARD_PATTERN = "latents-p{process:03d}-{shard:05d}.tfrecord"
# Seed of the one-time permutation of an ImageFolder's images across shards.
ORDER_SEED = 0
# Everything that changes the bytes of a shard; a rerun must agree with the sidecars on it.
RUN_KEYS = ("source", "split", "vae", "image_size", "shard_size", "process_count", "dtype",
            "with_images")

Example = tuple[str, Any, int]  # (name for logs, path or encoded bytes, label)
EncodeFn = Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]]


class ImageFolderSource:
  """A class-per-folder image tree (local or gs://), listed in torchvision ImageFolder order."""

  def __init__(self, root: str):
    if not tf.io.gfile.isdir(root):
      raise FileNotFoundError(f"--source={root!r} is not a directory (nor tfds:NAME)")
    self.classes = sorted(d.rstrip("/") for d in tf.io.gfile.listdir(root)
                          if tf.io.gfile.isdir(os.path.join(root, d)))
    if not self.classes:
      raise ValueError(f"--source={root!r} has no class sub-folders")
    self.items = []
    for label, name in enumerate(self.classes):
      for dirpath, _, files in sorted(tf.io.gfile.walk(os.path.join(root, name))):
        self.items += [(os.path.join(dirpath, f), label) for f in sorted(files)
                       if f.lower().endswith(IMAGE_EXTENSIONS)]
    if not self.items:
      raise ValueError(f"--source={root!r} has no images with extensions {IMAGE_EXTENSIONS}")
    # Folder order groups each class into a few consecutive shards; the training pipeline
    # shuffles shards and records only within a window, so mix the classes across shards once
    # (fixed seed, recorded in the manifest) to keep batches close to i.i.d.
    order = np.random.default_rng(ORDER_SEED).permutation(len(self.items))
    self.items = [self.items[i] for i in order]
    self.root = root
    self.num_classes = len(self.classes)

  def __len__(self) -> int:
    return len(self.items)

  def examples(self, start: int, stop: int) -> Iterator[Example]:
    for path, label in self.items[start:stop]:
      yield os.path.relpath(path, self.root), path, label


class TfdsSource:
  """A TFDS image dataset; images stay encoded (SkipDecoding) so PIL decodes them as in the release."""

  def __init__(self, name: str, split: str, data_dir: str | None, manual_dir: str | None,
               image_key: str = "image", label_key: str = "label"):
    import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
    self._tfds = tfds
    self.builder = tfds.builder(name, data_dir=data_dir)
    # Preparing (e.g. imagenet2012 from its tars) happens once, on process 0.
    if jax.process_index() == 0:
      self.builder.download_and_prepare(
          download_config=tfds.download.DownloadConfig(manual_dir=manual_dir))
    _barrier("tfds_prepared")
    features = self.builder.info.features
    if image_key not in features:
      raise ValueError(f"TFDS {name}: no image feature {image_key!r} (features: {list(features)})")
    self.split, self.image_key, self.label_key = split, image_key, label_key
    has_label = label_key in features
    self.classes = list(features[label_key].names) if has_label else ["unlabeled"]
    self.num_classes = len(self.classes)
    self._has_label = has_label
    self._has_file_name = "file_name" in features
    self._num = self.builder.info.splits[split].num_examples

  def __len__(self) -> int:
    return self._num

  def examples(self, start: int, stop: int) -> Iterator[Example]:
    ds = self.builder.as_dataset(split=f"{self.split}[{start}:{stop}]", shuffle_files=False,
                                 decoders={self.image_key: self._tfds.decode.SkipDecoding()})
    for i, ex in enumerate(ds.as_numpy_iterator(), start):
      name = ex["file_name"].decode() if self._has_file_name else f"{self.split}[{i}]"
      yield name, ex[self.image_key], int(ex[self.label_key]) if self._has_label else 0


def make_source(source: str, split: str = "train", data_dir: str | None = None,
                manual_dir: str | None = None):
  if source.startswith("tfds:"):
    return TfdsSource(source[len("tfds:"):], split, data_dir, manual_dir)
  return ImageFolderSource(source)


def make_encoder(vae: str, image_size: int, precision: str | None = "high",
                 norm: str = "auto") -> tuple[EncodeFn, dict[str, Any]]:
  """Returns (encode, info): encode maps images [B, H, W, 3] in [-1, 1] to (mean, std) [B, 2, h, w, c].

  Index 1 of axis 1 is the encoding of the horizontally flipped image. The batch is sharded over
  this process's devices (B must be a multiple of jax.local_device_count()). `vae` is a diffusers
  AutoencoderKL folder, a named VAE "NAME:WEIGHTS" (dit_jax.vae.named: the VA-VAE) or
  "identity" (latent = image, std = 0; for tests and debugging). `norm` (latent_norm.RULES):
  'channel' normalises by per-channel statistics (then a scale factor of 1, LightningDiT's
  latent_multiplier), 'scale' by the VAE's scale factor, 'auto' as the VAE's release trains.
  """
  if norm not in latent_norm.RULES:
    raise ValueError(f"--latent_norm={norm!r} must be one of {latent_norm.RULES}")
  mesh = jax.sharding.Mesh(np.array(jax.local_devices()), ("batch",))
  batch_sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("batch"))
  replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  if vae == "identity":
    module, params = None, None
    info = {"vae": "identity", "scale_factor": 1.0, "latent_shape": [image_size, image_size, 3],
            "downsample_factor": 1, "per_channel": norm == "channel"}
  else:
    spec = vae_lib.named(vae)
    config = vae_lib.load_config(vae)
    module, params = vae_lib.load(vae, precision=precision)
    f = module.downsample_factor
    if image_size % f:
      raise ValueError(f"--image_size={image_size} is not a multiple of the VAE's downsampling factor {f}")
    params = jax.device_put(params, replicated)
    name = spec[0] if spec else os.path.basename(os.path.normpath(vae))
    if norm == "auto":
      norm = vae_lib.LATENT_NORMS.get(spec[0] if spec else "", "scale")
    scale = (1.0 if norm == "channel" else
             float(config.get("scaling_factor", vae_lib.DEFAULT_SCALE_FACTOR)))
    info = {"vae": name, "vae_path": vae,
            "vae_config": {k: v for k, v in config.items() if not k.startswith("_")},
            "scale_factor": scale, "per_channel": norm == "channel",
            "latent_shape": [image_size // f, image_size // f, module.latent_channels],
            "downsample_factor": f}

  @jax.jit
  def encode_pairs(params, x):
    b = x.shape[0]
    both = jnp.stack([x, jnp.flip(x, axis=2)], axis=1).reshape(2 * b, *x.shape[1:])
    if module is None:
      mean, std = both, jnp.zeros_like(both)
    else:
      mean, logvar = module.apply(params, both, method=vae_lib.AutoencoderKL.encode)
      std = jnp.exp(0.5 * logvar)
    return mean.reshape(b, 2, *mean.shape[1:]), std.reshape(b, 2, *std.shape[1:])

  def encode(images: np.ndarray):
    return encode_pairs(params, jax.device_put(images, batch_sharding))

  return encode, info


def _barrier(name: str) -> None:
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices(name)


def process_range(n: int, process_index: int, process_count: int) -> tuple[int, int]:
  """Contiguous slice [start, stop) of n examples owned by a process."""
  return n * process_index // process_count, n * (process_index + 1) // process_count


def shard_plan(n: int, process_count: int, shard_size: int) -> list[tuple[int, int, int, int]]:
  """All shards of a run as (process, shard index, start, stop), in global example order."""
  plan = []
  for p in range(process_count):
    start, stop = process_range(n, p, process_count)
    for k, a in enumerate(range(start, stop, shard_size)):
      plan.append((p, k, a, min(a + shard_size, stop)))
  return plan


def _load(example: Example, image_size: int) -> tuple[str, np.ndarray | None, int]:
  name, data, label = example
  try:
    if isinstance(data, str):
      with tf.io.gfile.GFile(data, "rb") as f:
        data = f.read()
    return name, preprocessing.preprocess(data, image_size), label
  except Exception as e:  # pylint: disable=broad-except
    # One bad file must not end a day-long job: PIL raises many types (OSError, SyntaxError,
    # DecompressionBombError, ...). It is logged here and counted in the shard's sidecar.
    logging.warning("Skipping unreadable image %s: %s: %s", name, type(e).__name__, e)
    return name, None, label


def _loaded_batches(examples: Iterator[Example], batch_size: int, image_size: int,
                    pool: concurrent.futures.Executor, prefetch: int = 2):
  """Yields lists of (name, image or None, label), decoding `prefetch` batches ahead in `pool`."""
  pending = collections.deque()
  batch = []
  for ex in examples:
    batch.append(pool.submit(_load, ex, image_size))
    if len(batch) == batch_size:
      pending.append(batch)
      batch = []
      if len(pending) > prefetch:
        yield [f.result() for f in pending.popleft()]
  if batch:
    pending.append(batch)
  while pending:
    yield [f.result() for f in pending.popleft()]


def encode_shard(examples: Iterator[Example], encode: EncodeFn, latent_shape: Sequence[int],
                 batch_size: int, image_size: int, pool: concurrent.futures.Executor,
                 on_batch: Callable[[int], None] = lambda n: None, images: list | None = None):
  """Encodes one shard's examples: returns labels [n], mean/std [n, 2, h, w, c] and skipped names.
  `images` (a list), when given, receives each encoded image as uint8 [size, size, 3]."""
  labels, means, stds, skipped = [], [], [], []
  in_flight = None  # results of the previous batch, fetched after the next one is dispatched

  def collect(job):
    (mean, std), k = job
    means.append(np.asarray(mean)[:k])
    stds.append(np.asarray(std)[:k])
    on_batch(k)

  for batch in _loaded_batches(examples, batch_size, image_size, pool):
    ok = [(img, label) for _, img, label in batch if img is not None]
    skipped += [name for name, img, _ in batch if img is None]
    if not ok:
      continue
    x = np.zeros((batch_size, image_size, image_size, 3), np.float32)  # padded: one compiled shape
    x[:len(ok)] = np.stack([img for img, _ in ok])
    labels += [label for _, label in ok]
    if images is not None:  # the center crop the VAE saw, back in uint8 (x = u / 127.5 - 1)
      images += list(np.clip(np.rint((x[:len(ok)] + 1.0) * 127.5), 0, 255).astype(np.uint8))
    job = (encode(x), len(ok))
    if in_flight is not None:
      collect(in_flight)
    in_flight = job
  if in_flight is not None:
    collect(in_flight)
  empty = np.zeros((0, 2, *latent_shape), np.float32)
  return (np.asarray(labels, np.int64), np.concatenate(means) if means else empty,
          np.concatenate(stds) if stds else empty, skipped)


def _read_sidecar(path: str) -> dict:
  with tf.io.gfile.GFile(path + ".json") as f:
    return json.load(f)


def _check_same_run(path: str, run: dict) -> None:
  old = _read_sidecar(path).get("extra", {}).get("run", {})
  diff = {k: (old.get(k), run.get(k)) for k in RUN_KEYS if old.get(k) != run.get(k)}
  if diff:
    raise ValueError(f"{path} was written by a different run ({', '.join(f'{k}: {a!r} now {b!r}' for k, (a, b) in diff.items())}); "
                     "use a new --out directory or delete the old shards")


def prepare(source: str, vae: str, out: str, image_size: int = 256, batch_size: int = 64,
            shard_size: int = 1024, dtype: str = "float16", split: str = "train",
            tfds_data_dir: str | None = None, tfds_manual_dir: str | None = None,
            num_workers: int = 16, precision: str | None = "high",
            with_images: bool = False, latent_norm_rule: str = "auto") -> dict | None:
  """Writes this process's shards under `out`; process 0 then writes and returns the manifest.
  with_images: each record also stores its center-cropped image (PNG, the extra 'image',
  flipped with its latent), which REPA's encoder reads in the train step. latent_norm_rule:
  as make_encoder's `norm`; per-channel statistics are computed over every shard's stored
  posteriors once all are written, and recorded in the manifest."""
  if dtype not in records.SUPPORTED_DTYPES:
    raise ValueError(f"--dtype={dtype!r} must be one of {records.SUPPORTED_DTYPES}")
  if batch_size < 1 or shard_size < 1:
    raise ValueError(f"--batch_size={batch_size} and --shard_size={shard_size} must be positive")
  n_dev = jax.local_device_count()
  if batch_size % n_dev:
    batch_size += n_dev - batch_size % n_dev
    logging.info("Rounded --batch_size up to %d, a multiple of the %d local devices", batch_size, n_dev)
  src = make_source(source, split, tfds_data_dir, tfds_manual_dir)
  encode, info = make_encoder(vae, image_size, precision, latent_norm_rule)
  if info["vae"] != "identity":
    spec = vae_lib.named(vae)
    weights = spec[1] if spec else os.path.join(vae_lib.find_vae_dir(vae), vae_lib.WEIGHTS_NAME)
    info["vae_weights_sha256"] = records.sha256(weights) if tf.io.gfile.exists(weights) else None
  tf.io.gfile.makedirs(out)
  pc, pi = jax.process_count(), jax.process_index()
  run = {"source": source, "split": split if source.startswith("tfds:") else None, "vae": info["vae"],
         "image_size": image_size, "shard_size": shard_size, "process_count": pc, "dtype": dtype,
         **({"with_images": True} if with_images else {})}
  plan = shard_plan(len(src), pc, shard_size)
  mine = [s for s in plan if s[0] == pi]
  todo = []
  for p, k, a, b in mine:
    path = os.path.join(out, SHARD_PATTERN.format(process=p, shard=k))
    if records.shard_done(path):
      _check_same_run(path, run)
    else:
      todo.append((path, a, b))
  total = sum(b - a for _, a, b in todo)
  logging.info("Process %d/%d: %d examples in %d shards, %d shards (%d images) to encode, %d done",
               pi, pc, sum(b - a for *_, a, b in mine), len(mine), len(todo), total, len(mine) - len(todo))

  progress = {"done": 0, "t0": time.time(), "last": 0.0}

  def on_batch(k: int) -> None:
    progress["done"] += k
    now = time.time()
    if now - progress["last"] >= 30 or progress["done"] >= total:
      progress["last"] = now
      rate = progress["done"] / max(now - progress["t0"], 1e-9)
      eta = (total - progress["done"]) / max(rate, 1e-9)
      logging.info("%d/%d images, %.1f images/s, ETA %d:%02d:%02d", progress["done"], total, rate,
                   eta // 3600, eta % 3600 // 60, eta % 60)

  with concurrent.futures.ThreadPoolExecutor(num_workers) as pool:
    for path, a, b in todo:
      imgs = [] if with_images else None
      labels, mean, std, skipped = encode_shard(src.examples(a, b), encode, info["latent_shape"],
                                                batch_size, image_size, pool, on_batch, imgs)
      progress["done"] += len(skipped)
      extras = None
      if with_images:
        stacked = np.stack(imgs) if imgs else np.zeros((0, image_size, image_size, 3), np.uint8)
        extras = {"image": records.Extra(stacked, "width", "png")}
      records.write_shard(path, labels, mean, std, dtype=dtype, extras=extras, extra={
          "skipped": len(skipped), "skipped_files": skipped, "range": [a, b], "run": run})
      logging.info("Wrote %s: %d records, %d skipped", path, len(labels), len(skipped))

  _barrier("prepare_latents_shards_written")
  if pi != 0:
    return None
  return _write_manifest(out, plan, run, src, info)


def _write_manifest(out: str, plan, run: dict, src, info: dict) -> dict:
  expected = {SHARD_PATTERN.format(process=p, shard=k) for p, k, _, _ in plan}
  present = {os.path.basename(f)[:-len(".json")]
             for f in tf.io.gfile.glob(os.path.join(out, "*.tfrecord.json"))}
  missing = sorted(f for f in expected if not records.shard_done(os.path.join(out, f)))
  if missing:
    raise RuntimeError(f"{out}: {len(missing)} shard(s) not finished, e.g. {missing[:5]}; "
                       "rerun prepare_latents with the same flags to complete them")
  if present - expected:
    raise ValueError(f"{out}: shards from another run are present, e.g. {sorted(present - expected)[:5]}; "
                     "use a new --out directory")
  for name in sorted(expected):
    _check_same_run(os.path.join(out, name), run)
  extra = {"classes": src.classes, "image_size": run["image_size"], "source": run["source"],
           "split": run["split"], "preprocessing": "adm_center_crop",
           "example_order": (f"permutation(seed={ORDER_SEED})"
                             if isinstance(src, ImageFolderSource) else "source order"),
           **{k: v for k, v in info.items()
              if k not in ("vae", "scale_factor", "latent_shape", "per_channel")}}
  manifest = records.write_manifest(out, vae=info["vae"], scale_factor=info["scale_factor"],
                                    num_classes=src.num_classes, extra=extra,
                                    per_channel=info["per_channel"])
  logging.info("Wrote %s: %d records, %d skipped", os.path.join(out, records.MANIFEST),
               manifest["count"], manifest["num_skipped"])
  return manifest


_SOURCE = flags.DEFINE_string("source", None, "ImageFolder root (class sub-folders) or tfds:NAME.")
_VAE = flags.DEFINE_string("vae", None, "diffusers AutoencoderKL folder (config.json + safetensors), "
                           "a named VAE (vavae_f16d32, with --vae_weights), or 'identity'.")
_VAE_WEIGHTS = flags.DEFINE_string("vae_weights", None, "A named --vae's LDM checkpoint (.pt/.ckpt "
                                   "or .safetensors), e.g. vavae-imagenet256-f16d32-dinov2.pt.")
_LATENT_NORM = flags.DEFINE_enum("latent_norm", "auto", list(latent_norm.RULES),
                                 "How training normalises the latents: 'channel' by per-channel "
                                 "statistics computed here (LightningDiT's, for the VA-VAE), "
                                 "'scale' by the VAE's scale factor (DiT's 0.18215), 'auto' as "
                                 "the VAE's release does.")
_OUT = flags.DEFINE_string("out", None, "Output directory for shards and manifest.json (local or gs://).")
_IMAGE_SIZE = flags.DEFINE_integer("image_size", 256, "Side of the center-cropped images.")
_BATCH_SIZE = flags.DEFINE_integer("batch_size", 64, "Images per encoder call on this process "
                                   "(each is encoded twice: as is and flipped).")
_SHARD_SIZE = flags.DEFINE_integer("shard_size", 1024, "Images per output shard.")
_DTYPE = flags.DEFINE_enum("dtype", "float16", list(records.SUPPORTED_DTYPES), "Storage dtype.")
_SPLIT = flags.DEFINE_string("split", "train", "TFDS split (tfds: sources only).")
_TFDS_DATA_DIR = flags.DEFINE_string("tfds_data_dir", None, "TFDS data_dir.")
_TFDS_MANUAL_DIR = flags.DEFINE_string("tfds_manual_dir", None, "TFDS manual download dir "
                                       "(imagenet2012: ILSVRC2012_img_train.tar, ...).")
_NUM_WORKERS = flags.DEFINE_integer("num_workers", 16, "Image decoding threads per process.")
_WITH_IMAGES = flags.DEFINE_bool("with_images", False, "Also store each center-cropped image "
                                  "(PNG) beside its latent: the 'image' extra REPA reads.")
_PRECISION = flags.DEFINE_enum("precision", "high", ["default", "high", "highest"],
                               "Matmul/conv precision of the encoder (TPU: default = 1 bf16 pass).")
runtime.define_flags()  # --distributed, --coordinator_address, ... (multi-process jobs)


def main(argv: Sequence[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  runtime.setup()  # hides GPUs from TensorFlow; jax.distributed on pods / clusters
  vae = _VAE.value
  if vae in vae_lib.CONFIGS:
    if not _VAE_WEIGHTS.value:
      raise app.UsageError(f"--vae={vae} needs --vae_weights=PATH (its LDM checkpoint)")
    vae = f"{vae}{vae_lib.SPEC_SEPARATOR}{_VAE_WEIGHTS.value}"
  elif _VAE_WEIGHTS.value:
    raise app.UsageError(f"--vae_weights is for a named --vae ({', '.join(vae_lib.CONFIGS)}); "
                         f"--vae={vae!r} is a folder that holds its own weights")
  prepare(_SOURCE.value, vae, _OUT.value, image_size=_IMAGE_SIZE.value,
          batch_size=_BATCH_SIZE.value, shard_size=_SHARD_SIZE.value, dtype=_DTYPE.value,
          split=_SPLIT.value, tfds_data_dir=_TFDS_DATA_DIR.value, tfds_manual_dir=_TFDS_MANUAL_DIR.value,
          num_workers=_NUM_WORKERS.value, precision=_PRECISION.value,
          with_images=_WITH_IMAGES.value, latent_norm_rule=_LATENT_NORM.value)


def run() -> None:
  """Console script `dit-prepare-latents` (the same as python -m dit_jax.prepare_latents)."""
  flags.mark_flags_as_required(["source", "vae", "out"])
  runtime.run(main)  # errors as a few lines naming the file (--traceback for the rest)


if __name__ == "__main__":
  run()

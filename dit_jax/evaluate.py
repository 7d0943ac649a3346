"""Evaluates a sample batch like ADM's evaluator: FID, sFID, Inception Score, precision, recall.

  python -m dit_jax.evaluate --samples=samples.npz \
      --reference=VIRTUAL_imagenet256_labeled.npz \
      --inception=pt_inception-2015-12-05-6726825d.pth --out=metrics.json

--samples is an ADM sample batch: `arr_0` uint8 [N, H, W, 3] (`arr_1` labels are ignored).
--reference is an ADM reference batch .npz, an image folder or 'tfds:NAME[:SPLIT]'; its features
are cached next to --out (see docs/evaluation.md). On a multi-host TPU pod run the same command on
every host: jax.distributed is initialised as by the other entry points (dit_jax/runtime.py).
"""
import json
import os
import re

from absl import app, flags, logging
import jax
import tensorflow as tf

from dit_jax import image_io, runtime
from dit_jax.evaluation import convert, evaluator, reference

_SAMPLES = flags.DEFINE_string("samples", None, "Sample batch .npz (arr_0: uint8 [N, H, W, 3]).")
_REFERENCE = flags.DEFINE_string(
    "reference", None, "Reference: ADM reference batch .npz, image folder or tfds:NAME[:SPLIT].")
_INCEPTION = flags.DEFINE_string(
    "inception", None, "pt_inception-2015-12-05-6726825d.pth or its converted .npz.")
_OUT = flags.DEFINE_string("out", None, "Write the metrics here as JSON.")
_REFERENCE_CACHE = flags.DEFINE_string(
    "reference_cache", None, "Reference statistics cache (default: next to --out or --samples).")
_RESOLUTION = flags.DEFINE_integer(
    "reference_resolution", None, "ADM center crop size for folder/TFDS references (e.g. 256).")
_MAX_REFERENCE = flags.DEFINE_integer("reference_max_images", None,
                                      "Use at most this many folder/TFDS reference images.")
_BATCH = flags.DEFINE_integer("batch_size_per_device", 32, "Inception batch per device.")
_FID_METHOD = flags.DEFINE_enum(
    "fid_method", "sqrtm", ["sqrtm", "eigh"],
    "sqrtm: ADM's scipy sqrtm; eigh: same value, faster, robust for N < 2048.")
_DISTANCES = flags.DEFINE_enum(
    "distance_dtype", "float16", ["float16", "float32"],
    "Precision/recall pairwise distances: float16 as ADM's evaluator (comparable with published "
    "numbers), or float32.")
runtime.define_flags()


def default_cache_path(reference_source: str, out: str | None, samples: str) -> str:
  name = os.path.basename(reference_source.rstrip("/"))
  name = re.sub(r"[^A-Za-z0-9._-]+", "_", name[:-4] if name.endswith(".npz") else name)
  target = out or samples
  directory = os.path.dirname(target if "://" in target else os.path.abspath(target))
  return os.path.join(directory, f"{name}.inception_stats.npz")


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  runtime.setup()  # jax.distributed on pods; TensorFlow (TFDS references) off the accelerators
  num_samples = image_io.check_images(_SAMPLES.value)
  variables = convert.load_inception(_INCEPTION.value)
  cache = _REFERENCE_CACHE.value or default_cache_path(_REFERENCE.value, _OUT.value, _SAMPLES.value)
  logging.info("reference %s (cache %s)", _REFERENCE.value, cache)
  ref = reference.compute_reference(
      _REFERENCE.value, variables, resolution=_RESOLUTION.value, max_images=_MAX_REFERENCE.value,
      batch_size_per_device=_BATCH.value, cache_path=cache)
  logging.info("evaluating %d samples of %s on %d devices", num_samples, _SAMPLES.value,
               jax.device_count())
  result = evaluator.evaluate_samples(image_io.iter_npz_array(_SAMPLES.value), variables, ref,
                                      batch_size_per_device=_BATCH.value,
                                      fid_method=_FID_METHOD.value,
                                      distance_dtype=_DISTANCES.value)
  result.update(samples=_SAMPLES.value, reference=_REFERENCE.value)
  if jax.process_index() == 0:
    for key in ("inception_score", "fid", "sfid", "precision", "recall"):
      if key in result:
        print(f"{key}: {result[key]:.4f}")
    if _OUT.value:
      with tf.io.gfile.GFile(_OUT.value, "w") as f:  # local or gs://
        json.dump(result, f, indent=2)


def run() -> None:
  """Console script `dit-evaluate` (the same as python -m dit_jax.evaluate)."""
  flags.mark_flags_as_required(["samples", "reference", "inception"])
  runtime.run(main)  # errors as a few lines naming the file (--traceback for the rest)


if __name__ == "__main__":
  run()

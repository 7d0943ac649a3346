"""What the trainer knows about a dataset, from its manifest or, for planning, from a config.

Needs neither TensorFlow nor the records: `dit_jax.step` (and so benchmarks and the AOT planner)
builds the train step from a DataInfo alone; `input_pipeline.get_info` makes the real one.
"""

from __future__ import annotations

import dataclasses

import ml_collections


@dataclasses.dataclass(frozen=True)
class DataInfo:
  """What the trainer needs to know about a latent dataset."""
  latent_shape: tuple[int, int, int]
  num_classes: int
  scale_factor: float
  count: int              # records in the whole dataset
  local_count: int        # records read by this process
  files: tuple[str, ...]  # this process's shards
  manifest: dict


def synthetic_info(config: ml_collections.ConfigDict, num_classes: int = 1000,
                   extras: dict | None = None) -> DataInfo:
  """The DataInfo of a config's data without reading it: VAE latents (image_size /
  config.vae.downsample_factor square, config.vae.latent_channels deep: the SD-VAE's 8 and 4 by
  default; stored float16) or, for the built-in digits, the 1-channel float32 pixels.
  `extras`: the manifest's extra per-example arrays ({name: {"shape", "dtype", "flip"}},
  dit_jax.records), for planning an objective that reads them."""
  s = int(config.data.image_size)
  extras = dict(extras or {})
  if config.get("repa") and config.repa.encoder and config.repa.image not in extras:
    # REPA's encoder reads each image beside its latent (prepare_latents --with_images).
    channels = 1 if config.data.get("builtin") == "digits" else 3
    extras[config.repa.image] = {"shape": [s, s, channels], "dtype": "uint8", "flip": "width"}
  more = {"extras": extras} if extras else {}
  if config.data.get("builtin") == "digits":
    return DataInfo((s, s, 1), 10, 1.0, 0, 0, (), {"dtype": "float32",
                                                  "latent_shape": [s, s, 1], **more})
  vae = config.get("vae", {})
  f, c = int(vae.get("downsample_factor", 8)), int(vae.get("latent_channels", 4))
  return DataInfo((s // f, s // f, c), num_classes, 0.18215, 0, 0, (),
                  {"dtype": "float16", "latent_shape": [s // f, s // f, c],
                   "downsample_factor": f, **more})

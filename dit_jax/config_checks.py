"""Start-up checks of a training config's numeric fields, before anything is built or trained.

ml_collections already refuses a wrong type (`--config.total_steps=abc`); these catch values of
the right type that make no sense (`total_steps=0` would exit 0 having trained nothing). Each
error names the field, its value and what it must be, in one line.
"""

from __future__ import annotations

import math

import ml_collections

# (field, lowest allowed value, highest allowed value or None, what the field is for)
# Fields whose value 0 means "off" have 0 as their lowest value.
_RANGES = (
    ("total_steps", 1, None, "optimizer steps to train"),
    ("log_every_steps", 1, None, "steps between logged scalars"),
    ("steps_in_flight", 0, None, "steps dispatched ahead of the device (0 = unbounded)"),
    ("data.global_batch_size", 1, None, "images per step"),
    ("data.shuffle_buffer", 1, None, "records in the shuffle buffer"),
    ("data.cycle_length", 1, None, "shards read in parallel"),
    ("data.image_size", 1, None, "image resolution"),
    ("diffusion.steps", 1, None, "diffusion timesteps"),
    ("optim.learning_rate", 0.0, None, "learning rate"),
    ("optim.weight_decay", 0.0, None, "weight decay"),
    ("optim.b1", 0.0, 1.0, "Adam beta1"),
    ("optim.b2", 0.0, 1.0, "Adam beta2"),
    ("optim.eps", 0.0, None, "Adam epsilon"),
    ("optim.warmup_steps", 0, None, "warmup steps (0 = none)"),
    ("optim.grad_clip_norm", 0.0, None, "clipping threshold (0 = off)"),
    ("optim.microbatches", 0, None, "gradient-accumulation microbatches (0 = auto)"),
    ("optim.decay_steps", 0, None, "learning-rate decay steps (0 = to total_steps)"),
    ("optim.min_learning_rate", 0.0, None, "learning-rate floor of the decay"),
    ("profile.start_step", 0, None, "first profiled step"),
    ("profile.num_steps", 0, None, "profiled steps (0 = off)"),
    ("ema_decay", 0.0, 1.0, "EMA decay"),
    ("model.class_dropout_prob", 0.0, 1.0, "label dropout probability"),
    ("checkpoint.every_steps", 1, None, "steps between checkpoints"),
    ("checkpoint.keep", 1, None, "checkpoints kept"),
    ("checkpoint.keep_period", 0, None, "period of checkpoints kept for good (0 = none)"),
    ("checkpoint.restore_attempts", 1, None, "reads of a checkpoint before it is set aside"),
    ("checkpoint.restore_backoff_s", 0.0, None, "seconds before the first re-read"),
    ("sample.every_steps", 0, None, "steps between sample grids (0 = only at the end)"),
    ("sample.num_images", 0, None, "images per grid (0 = no grids)"),
    ("eval.every_steps", 0, None, "steps between evaluations (0 = off)"),
)
# Checked only where the feature is on: (switch field, fields).
_WHEN_ON = (
    ("sample.num_images", (("sample.steps", 0, None, "sampling steps (0 = the sampler's default)"),
                           ("sample.cfg_scale", 0.0, None, "guidance scale"))),
    ("eval.every_steps", (("eval.num_samples", 1, None, "images per evaluation"),
                          ("eval.batch_size", 1, None, "images per sampling call"),
                          ("eval.steps", 0, None, "sampling steps (0 = the sampler's default)"),
                          ("eval.cfg_scale", 0.0, None, "guidance scale"),
                          ("eval.inception_batch_per_device", 1, None,
                           "images per device per Inception call"))),
)


def _get(config: ml_collections.ConfigDict, field: str):
  node = config
  for part in field.split("."):
    node = node[part]
  return node


def _check(config, field, lo, hi, what) -> None:
  try:
    value = _get(config, field)
  except (KeyError, AttributeError):
    return  # an older or trimmed config without this field: nothing to check
  if value is None:
    return
  bad = isinstance(value, bool) or not isinstance(value, (int, float))
  bad = bad or (isinstance(value, float) and math.isnan(value)) or value < lo
  bad = bad or (hi is not None and value > hi)
  if bad:
    bounds = f"at least {lo}" if hi is None else f"between {lo} and {hi}"
    raise ValueError(f"config.{field}={value!r}: must be {bounds} ({what}); pass "
                     f"--config.{field}=VALUE")


def check(config: ml_collections.ConfigDict) -> None:
  """Raises ValueError naming the first field whose value is out of range."""
  for field, lo, hi, what in _RANGES:
    _check(config, field, lo, hi, what)
  for switch, fields in _WHEN_ON:
    if _get(config, switch):
      for field, lo, hi, what in fields:
        _check(config, field, lo, hi, what)
  from dit_jax import sharding  # pylint: disable=import-outside-toplevel
  sharding.Layout.from_config(config)  # config.sharding: names the field it rejects
  for axis in ("data", "fsdp"):
    size = config.mesh[axis]
    if size < -1 or (axis == "data" and size == 0):
      allowed = "-1 (the remaining devices) or a size" + (", or 0 (auto)" if axis == "fsdp" else "")
      raise ValueError(f"config.mesh.{axis}={size}: must be {allowed}")

"""The learning-rate schedule of config.optim, built from optax's schedules.

  warmup_steps > 0: linear from 0 to learning_rate over the warmup, then
  schedule 'constant': learning_rate (the release: 1e-4, no warmup);
           'cosine':   cosine decay to min_learning_rate at step decay_steps;
           'linear':   linear decay to min_learning_rate at step decay_steps;
  and min_learning_rate after decay_steps (0: config.total_steps).
"""

from __future__ import annotations

import ml_collections
import optax

SCHEDULES = ("constant", "cosine", "linear")


def learning_rate_schedule(config: ml_collections.ConfigDict) -> optax.Schedule:
  """step -> learning rate (errors name the config.optim field)."""
  o = config.optim
  peak, warmup = float(o.learning_rate), int(o.warmup_steps)
  kind = o.get("schedule", "constant")
  if kind not in SCHEDULES:
    raise ValueError(f"config.optim.schedule={kind!r}: expected one of {', '.join(SCHEDULES)}")
  if kind == "constant":
    if warmup:  # stays at the peak after the warmup
      return optax.linear_schedule(0.0, peak, warmup)
    return optax.constant_schedule(peak)
  floor = float(o.get("min_learning_rate", 0.0))
  end = int(o.get("decay_steps") or config.total_steps)
  if end <= warmup:
    raise ValueError(f"config.optim.decay_steps={end} (0: config.total_steps) must exceed "
                     f"config.optim.warmup_steps={warmup}")
  if kind == "cosine":
    decay = optax.cosine_decay_schedule(peak, end - warmup, alpha=floor / peak if peak else 0.0)
  else:
    decay = optax.linear_schedule(peak, floor, end - warmup)
  if not warmup:
    return decay
  return optax.join_schedules([optax.linear_schedule(0.0, peak, warmup), decay], [warmup])

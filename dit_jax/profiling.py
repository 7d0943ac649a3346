"""jax.profiler traces of configured training steps, for TensorBoard's profile tab.

`config.profile.num_steps` steps from `config.profile.start_step` are traced into
WORKDIR/profile (plugins/profile/<run>/<host>.xplane.pb, one file per process):

  tensorboard --logdir WORKDIR/profile     # then the PROFILE tab (pip install tensorboard-plugin-profile)

The trace starts before that step's batch is read and stops once the last traced step has run
on the device, so it holds the input pipeline, the host-to-device copies and the step itself.
"""

from __future__ import annotations

import logging
import os
from typing import Any

import jax


class Profiler:
  """Called once per step, before it runs, with the number of steps done; `close` at the end."""

  def __init__(self, options: Any, workdir: str):
    self.num_steps = int(options.num_steps) if options else 0
    self.start = int(options.start_step) if options else 0
    self.directory = os.path.join(workdir, "profile")
    self.active = False

  def __call__(self, step: int, state: Any = None) -> None:
    if not self.num_steps:
      return
    if not self.active and step == self.start:
      jax.profiler.start_trace(self.directory)
      self.active = True
      logging.info("Profiling steps %d to %d into %s", step + 1, step + self.num_steps,
                    self.directory)
    elif self.active and step >= self.start + self.num_steps:
      self.close(state)

  def close(self, state: Any = None) -> None:
    if self.active:
      if state is not None:
        jax.block_until_ready(state)  # the traced steps' device work belongs in the trace
      jax.profiler.stop_trace()
      self.active = False
      logging.info("Wrote the profile to %s", self.directory)

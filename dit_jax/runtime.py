"""Process start-up shared by the entry points (train, sample, convert, evaluate).

`define_flags()` adds the multi-process flags; `setup()` quiets Orbax's per-file logs, keeps
TensorFlow (tf.data only) off the accelerators, and calls jax.distributed.initialize when
coordinator flags are given or a multi-host TPU slice / SLURM / Open MPI job is detected.
"""

from __future__ import annotations

import logging as std_logging
import os

from absl import flags, logging


def define_flags() -> None:
  flags.DEFINE_string("coordinator_address", None, "host:port of process 0 (multi-process).")
  flags.DEFINE_integer("num_processes", None, "Number of processes (multi-process).")
  flags.DEFINE_integer("process_id", None, "This process's index (multi-process).")
  flags.DEFINE_bool("distributed", None, "Force (True) or skip (False) jax.distributed.initialize;"
                    " default: when coordinator flags are given or a TPU pod / cluster is found.")


class _QuietOrbax(std_logging.Filter):
  """Orbax logs every file it writes at INFO; keep its warnings and errors only."""

  def filter(self, record):
    return record.levelno >= std_logging.WARNING or "orbax" not in record.pathname


def cluster_detected() -> bool:
  hosts = os.environ.get("TPU_WORKER_HOSTNAMES", "")
  return ("," in hosts or os.environ.get("SLURM_NTASKS", "1") != "1"
          or os.environ.get("OMPI_COMM_WORLD_SIZE", "1") != "1")


def setup() -> None:
  logging.get_absl_handler().addFilter(_QuietOrbax())
  import tensorflow as tf  # pylint: disable=import-outside-toplevel
  tf.config.set_visible_devices([], "GPU")
  import jax  # pylint: disable=import-outside-toplevel
  f = flags.FLAGS
  if f.coordinator_address:
    jax.distributed.initialize(f.coordinator_address, f.num_processes, f.process_id)
  elif f.distributed or (f.distributed is None and cluster_detected()):
    jax.distributed.initialize()
  logging.info("JAX process %d/%d, %d local / %d global devices (%s)", jax.process_index(),
               jax.process_count(), jax.local_device_count(), jax.device_count(),
               jax.devices()[0].device_kind)

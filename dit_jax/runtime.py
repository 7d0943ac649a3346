"""Process start-up shared by the entry points (train, sample, convert, evaluate).

`define_flags()` adds the multi-process flags; `setup()` quiets Orbax's per-file logs, keeps
TensorFlow (tf.data only) off the accelerators, and calls jax.distributed.initialize when
coordinator flags are given or a multi-host TPU slice / SLURM / Open MPI job is detected.
"""

from __future__ import annotations

import io
import logging as std_logging
import os
import sys
import threading

from absl import flags, logging


def define_flags() -> None:
  flags.DEFINE_string("coordinator_address", None, "host:port of process 0 (multi-process).")
  flags.DEFINE_integer("num_processes", None, "Number of processes (multi-process).")
  flags.DEFINE_integer("process_id", None, "This process's index (multi-process).")
  flags.DEFINE_bool("distributed", None, "Force (True) or skip (False) jax.distributed.initialize;"
                    " default: when coordinator flags are given or a TPU pod / cluster is found.")


class _QuietOrbax(std_logging.Filter):
  """Orbax logs every file it writes at INFO; keep its warnings and errors only (but not the
  notice that dit_jax.checkpointing chose its own array handler)."""

  def filter(self, record):
    if "orbax" not in record.pathname:
      return True
    return record.levelno >= std_logging.WARNING and "overriding jax.Array" not in record.getMessage()


class _DropClosedLoopTracebacks(io.TextIOBase):
  """stderr, less the "RuntimeError: Event loop is closed" tracebacks that TensorStore's
  callbacks print after a failed Orbax restore (one per read still in flight, from many
  threads, hundreds of lines in all), which buried the one error that matters. Lines are
  parsed per writing thread; everything else passes through."""

  def __init__(self, stream):
    super().__init__()
    self._stream, self._lock = stream, threading.Lock()
    self._partial: dict[int, str] = {}
    self._held: dict[int, list[str]] = {}

  def write(self, text):
    tid = threading.get_ident()
    with self._lock:
      lines = (self._partial.pop(tid, "") + text).split("\n")
      if lines[-1]:
        self._partial[tid] = lines[-1]
      for line in lines[:-1]:
        self._line(tid, line + "\n")
    return len(text)

  def _line(self, tid, line):
    held = self._held.get(tid)
    if held is None:
      if line.startswith("Traceback (most recent call last):"):
        self._held[tid] = [line]
      else:
        self._stream.write(line)
      return
    held.append(line)
    if line[:1] in (" ", "\t"):
      return
    del self._held[tid]
    if not (line.startswith("RuntimeError: Event loop is closed") and
            any("asyncio" in frame for frame in held)):
      self._stream.write("".join(held))

  def flush(self):
    with self._lock:
      tid = threading.get_ident()
      if tid in self._partial and tid not in self._held:
        self._stream.write(self._partial.pop(tid))
      self._stream.flush()

  def __getattr__(self, name):  # fileno, isatty, encoding, ...
    return getattr(self._stream, name)


def cluster_detected() -> bool:
  hosts = os.environ.get("TPU_WORKER_HOSTNAMES", "")
  return ("," in hosts or os.environ.get("SLURM_NTASKS", "1") != "1"
          or os.environ.get("OMPI_COMM_WORLD_SIZE", "1") != "1")


def setup() -> None:
  logging.get_absl_handler().addFilter(_QuietOrbax())
  if not isinstance(sys.stderr, _DropClosedLoopTracebacks):
    sys.stderr = _DropClosedLoopTracebacks(sys.stderr)
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

"""Process start-up shared by the entry points (train, sample, convert, evaluate).

`define_flags()` adds the multi-process flags; `setup()` quiets Orbax's per-file logs, keeps
TensorFlow (tf.data only) off the accelerators, and calls jax.distributed.initialize when
coordinator flags are given or JAX's own cluster detection finds a cluster (Cloud TPU VMs and
pods, GKE, SLURM, Open MPI, Kubernetes). It stops before any work if several processes run
without jax.distributed.
"""

from __future__ import annotations

import logging as std_logging
import sys

from absl import flags, logging


def define_flags() -> None:
  flags.DEFINE_string("coordinator_address", None, "host:port of process 0 (multi-process).")
  flags.DEFINE_integer("num_processes", None, "Number of processes (multi-process).")
  flags.DEFINE_integer("process_id", None, "This process's index (multi-process).")
  flags.DEFINE_bool("distributed", None, "Force (True) or skip (False) jax.distributed.initialize;"
                    " default: when coordinator flags are given or JAX detects a cluster "
                    "(TPU VMs, GKE, SLURM, Open MPI).")


class _QuietOrbax(std_logging.Filter):
  """Orbax logs every file it writes at INFO; keep its warnings and errors only (but not the
  notice that dit_jax.checkpointing chose its own array handler)."""

  def filter(self, record):
    if "orbax" not in record.pathname:
      return True
    return record.levelno >= std_logging.WARNING and "overriding jax.Array" not in record.getMessage()


def _drop_closed_loop_errors(hook):
  """An unraisable-exception hook, less the "RuntimeError: Event loop is closed" that
  TensorStore's callbacks raise after a failed Orbax restore (one per read still in flight:
  hundreds of tracebacks, which buried the one error that matters)."""

  def unraisable(info):
    if not (isinstance(info.exc_value, RuntimeError) and
            str(info.exc_value) == "Event loop is closed"):
      hook(info)

  unraisable.dit_jax = True
  return unraisable


def detect_cluster() -> str | None:
  """The cluster environment JAX's own detection finds (GCE and GKE TPU VMs, SLURM, Open MPI,
  Kubernetes, ...), or None. On a TPU VM this asks the metadata server, as jax.distributed
  does; elsewhere it reads only environment variables."""
  from jax._src import clusters  # pylint: disable=import-outside-toplevel
  for env in clusters.ClusterEnv._cluster_types:  # pylint: disable=protected-access
    if getattr(env, "opt_in_only_method", False):
      continue
    try:
      if env.is_env_present():
        return env.__name__
    except Exception as e:  # pylint: disable=broad-except
      logging.warning("Cluster detection %s failed: %s", env.__name__, e)
  return None


def distributed_client_ready() -> bool:
  from jax._src import distributed  # pylint: disable=import-outside-toplevel
  return distributed.global_state.client is not None


def setup() -> None:
  logging.get_absl_handler().addFilter(_QuietOrbax())
  if not getattr(sys.unraisablehook, "dit_jax", False):
    sys.unraisablehook = _drop_closed_loop_errors(sys.unraisablehook)
  import tensorflow as tf  # pylint: disable=import-outside-toplevel
  tf.config.set_visible_devices([], "GPU")
  f = flags.FLAGS
  init_distributed(f.coordinator_address, f.num_processes, f.process_id, f.distributed)
  import jax  # pylint: disable=import-outside-toplevel
  logging.info("JAX process %d/%d, %d local / %d global devices (%s)", jax.process_index(),
               jax.process_count(), jax.local_device_count(), jax.device_count(),
               jax.devices()[0].device_kind)
  check_multiprocess()


def init_distributed(coordinator_address: str | None = None, num_processes: int | None = None,
                     process_id: int | None = None, distributed: bool | None = None) -> str | None:
  """jax.distributed.initialize from explicit flags, or where a cluster is detected (unless
  `distributed` is False); returns how the processes were found, None if not initialised."""
  import jax  # pylint: disable=import-outside-toplevel
  if coordinator_address:
    jax.distributed.initialize(coordinator_address, num_processes, process_id)
    return "flags"
  if distributed is False:
    return None
  how = detect_cluster() or ("--distributed=true" if distributed else None)
  if how:
    logging.info("Initialising jax.distributed (%s)", how)
    jax.distributed.initialize()
  return how


def check_multiprocess() -> None:
  """Several processes without jax.distributed (libtpu joins a pod's hosts by itself) would
  train without preemption sync or a barrier for Orbax's asynchronous checkpoints: stop."""
  import jax  # pylint: disable=import-outside-toplevel
  if jax.process_count() > 1 and not distributed_client_ready():
    raise RuntimeError(
        f"This is process {jax.process_index()} of {jax.process_count()}, but jax.distributed "
        "is not initialised, so preemption notices and checkpoint barriers would not work: "
        "run with --distributed=true, or pass --coordinator_address, --num_processes and "
        "--process_id")


def enable_compilation_cache(path: str, override: bool = False) -> None:
  """JAX's persistent compilation cache in `path` (local or gs://), so a restarted job (after a
  preemption, say) loads its compiled programs instead of compiling them again. A cache the
  user already chose (JAX_COMPILATION_CACHE_DIR) is kept unless `override`."""
  import jax  # pylint: disable=import-outside-toplevel
  if not path or (jax.config.jax_compilation_cache_dir and not override):
    return
  jax.config.update("jax_compilation_cache_dir", path)
  logging.info("JAX compilation cache: %s", path)

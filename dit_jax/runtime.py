"""Process start-up shared by the entry points (train, sample, convert, evaluate).

`define_flags()` adds the multi-process flags; `setup()` quiets Orbax's per-file logs, keeps
TensorFlow (tf.data only) off the accelerators, and calls jax.distributed.initialize when
coordinator flags are given or JAX's own cluster detection finds a cluster (Cloud TPU VMs and
pods, GKE, SLURM, Open MPI, Kubernetes). It stops before any work if several processes run
without jax.distributed.

`run(main)` replaces `app.run(main)` in the training and sampling entry points: flag and
config-override errors in one line, errors raised on purpose (a bad value, a damaged file, a
full disk) as their message without a traceback (`--traceback` shows it), and a prompt exit:
once the work is done (checkpoints committed, logs flushed) the process ends without
Python's interpreter teardown, whose TensorFlow destructors alone took 2.5-4 s.
"""

from __future__ import annotations

import atexit
import logging as std_logging
import os
import sys
import traceback
from typing import Callable

from absl import app, flags, logging


def define_flags() -> None:
  flags.DEFINE_string("coordinator_address", None, "host:port of process 0 (multi-process).")
  flags.DEFINE_integer("num_processes", None, "Number of processes (multi-process).")
  flags.DEFINE_integer("process_id", None, "This process's index (multi-process).")
  flags.DEFINE_bool("distributed", None, "Force (True) or skip (False) jax.distributed.initialize;"
                    " default: when coordinator flags are given or JAX detects a cluster "
                    "(TPU VMs, GKE, SLURM, Open MPI).")
  flags.DEFINE_bool("traceback", False, "Print the traceback of an error, not only its message.")
  flags.DEFINE_integer("heartbeat_timeout_s", 10, "Multi-process: a process without a heartbeat "
                       "for this long is declared lost, and the job ends on every host "
                       "(dit_jax/supervisor.py); JAX's own default is 100.")


class _QuietOrbax(std_logging.Filter):
  """Orbax logs every file it writes at INFO; keep its warnings and errors only (but not the
  notice that dit_jax.checkpointing chose its own array handler)."""

  FOLD_S = 60.0  # Orbax error lines within this many seconds of the first are folded into it
  _last_error = float("-inf")

  def filter(self, record):
    if "orbax" not in record.pathname:
      return True
    if record.levelno < std_logging.WARNING or "overriding jax.Array" in record.getMessage():
      return False
    # Orbax logs a failed background save with its traceback from each thread it passes
    # through (three 40-line tracebacks for one full disk); its message line is enough, the
    # error itself is raised (and shown) by dit_jax.checkpointing.
    if not (flags.FLAGS.is_parsed() and "traceback" in flags.FLAGS and flags.FLAGS.traceback):
      record.exc_info, record.exc_text = None, None
      # One failure is logged by each Orbax thread it passes through (3-6 E-lines for one
      # full disk); keep the first of a burst (the root cause, e.g. "No space left on
      # device"), which dit_jax.checkpointing then raises as one error naming the checkpoint.
      if record.levelno >= std_logging.ERROR:
        if record.created - self._last_error < self.FOLD_S:
          return False
        self._last_error = record.created
    return True


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
  init_distributed(f.coordinator_address, f.num_processes, f.process_id, f.distributed,
                   f.heartbeat_timeout_s)
  import jax  # pylint: disable=import-outside-toplevel
  logging.info("JAX process %d/%d, %d local / %d global devices (%s)", jax.process_index(),
               jax.process_count(), jax.local_device_count(), jax.device_count(),
               jax.devices()[0].device_kind)
  check_multiprocess()


def init_distributed(coordinator_address: str | None = None, num_processes: int | None = None,
                     process_id: int | None = None, distributed: bool | None = None,
                     heartbeat_timeout_s: int = 100) -> str | None:
  """jax.distributed.initialize from explicit flags, or where a cluster is detected (unless
  `distributed` is False); returns how the processes were found, None if not initialised."""
  import jax  # pylint: disable=import-outside-toplevel
  if coordinator_address:
    jax.distributed.initialize(coordinator_address, num_processes, process_id,
                               heartbeat_timeout_seconds=heartbeat_timeout_s)
    return "flags"
  if distributed is False:
    return None
  how = detect_cluster() or ("--distributed=true" if distributed else None)
  if how:
    logging.info("Initialising jax.distributed (%s)", how)
    jax.distributed.initialize(heartbeat_timeout_seconds=heartbeat_timeout_s)
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


# Errors raised on purpose, with a message that says what to do: shown without a traceback.
SHORT_ERRORS = (ValueError, RuntimeError, OSError, FloatingPointError)


def _one_line(err: BaseException) -> str:
  """ml_collections wraps a typo'd override's KeyError in an AttributeError whose text is the
  repr of "'name'\nDid you mean ...": unwrap it into one line."""
  while err.args and isinstance(err.args[0], BaseException):
    err = err.args[0]
  text = err.args[0] if len(err.args) == 1 and isinstance(err.args[0], str) else str(err)
  return " ".join(line.strip() for line in text.strip().splitlines() if line.strip())


def parse_flags(argv: list[str]) -> list[str]:
  """absl's flag parsing, with every error in two lines as absl gives its own (a config
  file that does not load, a field that does not exist: a 40-55-line traceback before)."""
  try:
    rest = flags.FLAGS(argv)
    if "config" in flags.FLAGS:
      flags.FLAGS.config  # pylint: disable=pointless-statement  (a config that failed to load raises here)
    return rest
  except (flags.Error, AttributeError, KeyError, OSError, ValueError, TypeError) as e:
    text = _one_line(e)
    if isinstance(e, (AttributeError, KeyError)):
      field = text.split()[0].strip("'\"")
      given = [a for a in argv if a.startswith("--config.") and f".{field}" in a.split("=")[0]]
      text = f"{given[0] if given else 'config'}: no such field {text}"
    sys.stderr.write(f"FATAL Flags parsing error: {text}\n"
                     "Pass --helpshort or --helpfull to see help on flags.\n")
    sys.exit(1)


def _exit_now(code: int) -> None:
  """Ends the process after its atexit work (jax.distributed's shutdown barrier, absl's log
  flush) but without interpreter teardown: Python's module cleanup and TensorFlow's C++
  destructors took 2.5-4 s after the last checkpoint was committed (more on a busy host),
  and background threads still alive then print "sys.meta_path is None" errors."""
  atexit._run_exitfuncs()  # pylint: disable=protected-access
  for stream in (sys.stdout, sys.stderr):
    try:
      stream.flush()
    except (OSError, ValueError):
      pass
  os._exit(code)  # pylint: disable=protected-access


def run(main: Callable[[list[str]], None]) -> None:
  """app.run(main) with one-line errors and a prompt exit (see the module docstring)."""

  def wrapped(argv):
    try:
      main(argv)
    except app.UsageError as e:
      sys.stderr.write(f"FATAL: {e}\nPass --helpshort or --helpfull to see help on flags.\n")
      _exit_now(e.exitcode)
    except SHORT_ERRORS as e:
      if flags.FLAGS.traceback:
        traceback.print_exc()
      else:
        logging.flush()
        sys.stderr.write(f"{type(e).__name__}: {_one_line(e)}\n"
                         "(--traceback shows where it was raised)\n")
      _exit_now(1)
    _exit_now(0)

  app.run(wrapped, flags_parser=parse_flags)

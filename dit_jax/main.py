"""Entry point: `python -m dit_jax.main --config=configs/xl2.py --workdir=DIR`.

The same command runs on every host of a TPU VM pod, on GPUs and on a CPU; any config field
can be overridden, e.g. `--config.data.dir=LATENTS --config.mesh.fsdp=8`. Multi-process
runs initialise jax.distributed automatically on TPU pods (see dit_jax/runtime.py), or from
--coordinator_address/--num_processes/--process_id. Errors are one line (`--traceback` for the
traceback); the process exits as soon as the last checkpoint is committed (runtime.run).
"""

import sys

from absl import app, flags
from ml_collections import config_flags

from dit_jax import config_checks, runtime, stopping, supervisor

FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", None, "Directory for checkpoints, TensorBoard and samples.")
config_flags.DEFINE_config_file("config", None, "Experiment config file.", lock_config=True)
runtime.define_flags()
flags.DEFINE_bool("supervise", True, "Multi-process: run training in a watched child process, so "
                  "that a lost process ends this one promptly with a short report "
                  "(dit_jax/supervisor.py).")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  config_checks.check(FLAGS.config)  # before any start-up work
  if supervisor.wanted(FLAGS):  # several processes: a lost one ends the others cleanly
    sys.exit(supervisor.run(sys.argv, FLAGS.workdir, FLAGS.heartbeat_timeout_s))
  # SIGTERM/SIGINT from here on: a clean exit at any moment, a checkpoint once training.
  stopping.install(FLAGS.workdir)
  stopping.starting("starting JAX")
  runtime.setup()
  from dit_jax import train  # pylint: disable=import-outside-toplevel
  train.train_and_evaluate(FLAGS.config, FLAGS.workdir)


def run() -> None:
  """Console script `dit-train` (the same as python -m dit_jax.main)."""
  runtime.run(main)


if __name__ == "__main__":
  run()

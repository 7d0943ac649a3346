"""Seconds from SIGTERM (a preemption notice) to the main job's exit, checkpoint included.

  python benchmarks/sigterm_exit.py                      # the demo on 8 fake CPU devices
  python benchmarks/sigterm_exit.py --after_step=50 --devices=1 -- --config.model.overrides.depth=8

Starts `python -m dit_jax.main` with configs/demo.py in a fresh workdir, waits until it logs
step `after_step`, sends SIGTERM, and prints the time until the process exited and the step of
the checkpoint it wrote. TPU VMs give about 30 s of notice.
"""

import argparse
import glob
import os
import signal
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def main():
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--after_step", type=int, default=20)
  p.add_argument("--devices", type=int, default=8)
  p.add_argument("extra", nargs="*", help="more --config.x=y flags")
  a = p.parse_args()
  workdir = tempfile.mkdtemp(prefix="dit_sigterm_")
  env = dict(os.environ, JAX_PLATFORMS="cpu", CUDA_VISIBLE_DEVICES="",
             XLA_FLAGS=f"--xla_force_host_platform_device_count={a.devices}")
  cmd = [sys.executable, "-m", "dit_jax.main", "--config=configs/demo.py", f"--workdir={workdir}",
         "--config.total_steps=1000000", "--config.checkpoint.every_steps=1000000",
         "--config.log_every_steps=1", "--config.sample.num_images=0", *a.extra]
  proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True)
  for line in proc.stdout:
    if f"] [{a.after_step}] " in line and "loss=" in line:
      break
  t0 = time.time()
  proc.send_signal(signal.SIGTERM)
  proc.stdout.read()
  proc.wait()
  dt = time.time() - t0
  saved = sorted(int(os.path.basename(d)) for d in glob.glob(f"{workdir}/checkpoints/*")
                 if os.path.basename(d).isdigit())
  print(f"exit code {proc.returncode}, checkpoint of step {saved[-1] if saved else None}")
  print(f"SIGTERM to exit: {dt:.1f} s")


if __name__ == "__main__":
  main()

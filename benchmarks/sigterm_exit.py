"""Seconds from SIGTERM (a preemption notice) or a normal end to the main job's exit.

  python benchmarks/sigterm_exit.py                         # SIGTERM, the demo on 8 fake CPU devices
  python benchmarks/sigterm_exit.py --mode=end              # a normal end (last step, last save)
  python benchmarks/sigterm_exit.py --load=1 --repeat=3     # beside one CPU-bound process
  python benchmarks/sigterm_exit.py --after_step=50 --devices=1 -- --config.model.overrides.depth=8

Starts `python -m dit_jax.main` with configs/demo.py in a fresh workdir, executed directly (no
shell in between). `--mode=sigterm` waits until it logs step `after_step` and sends SIGTERM;
`--mode=end` lets it run `after_step` steps to the end. It prints the step of the checkpoint
written and two times: signal (or last log line) to exit, and checkpoint commit to exit. The
commit time is the ctime of the checkpoint's directory, which Orbax renames into place when the
checkpoint is complete; nothing polls while the job runs (the reader blocks on the job's
output, then on its exit), so on a small machine the measurement does not compete with the
job. `--load=N` runs N busy Python processes at the job's priority for the whole
measurement. TPU VMs give about 30 s of notice; the bound to hold is 5 s from the commit.
"""

import argparse
import glob
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_once(a) -> tuple[int, int | None, float, float]:
  """(exit code, checkpoint step, seconds from signal/last line to exit, commit to exit)."""
  workdir = tempfile.mkdtemp(prefix="dit_exit_")
  env = dict(os.environ, JAX_PLATFORMS="cpu", CUDA_VISIBLE_DEVICES="",
             XLA_FLAGS=f"--xla_force_host_platform_device_count={a.devices}")
  total = a.after_step if a.mode == "end" else 1_000_000
  cmd = [sys.executable, "-m", "dit_jax.main", "--config=configs/demo.py", f"--workdir={workdir}",
         f"--config.total_steps={total}", "--config.checkpoint.every_steps=1000000",
         "--config.log_every_steps=1", "--config.sample.num_images=0", *a.extra]
  proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True)
  t0 = None
  for line in proc.stdout:
    if f"] [{a.after_step}] " in line and "loss=" in line:
      t0 = time.time()
      if a.mode == "sigterm":
        proc.send_signal(signal.SIGTERM)
      break
  tail = proc.stdout.read()
  proc.wait()
  t_exit = time.time()
  saved = sorted(int(os.path.basename(d)) for d in glob.glob(f"{workdir}/checkpoints/*")
                 if os.path.basename(d).isdigit())
  if t0 is None or not saved:
    sys.exit(f"the job did not reach step {a.after_step} or saved nothing:\n{tail[-3000:]}")
  committed = os.stat(f"{workdir}/checkpoints/{saved[-1]}").st_ctime
  return proc.returncode, saved[-1], t_exit - t0, t_exit - committed


def main():
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--mode", choices=("sigterm", "end"), default="sigterm")
  p.add_argument("--after_step", type=int, default=20)
  p.add_argument("--devices", type=int, default=8)
  p.add_argument("--load", type=int, default=0, help="busy processes running beside the job")
  p.add_argument("--repeat", type=int, default=1)
  p.add_argument("extra", nargs="*", help="more --config.x=y flags")
  a = p.parse_args()
  burners = [subprocess.Popen([sys.executable, "-c", "while True: pass"])
             for _ in range(a.load)]
  try:
    rows = []
    for _ in range(a.repeat):
      rc, step, from_signal, from_commit = run_once(a)
      rows.append((from_signal, from_commit))
      start = "SIGTERM" if a.mode == "sigterm" else "last log line"
      print(f"exit code {rc}, checkpoint of step {step}; {start} to exit: {from_signal:.1f} s, "
            f"checkpoint commit to exit: {from_commit:.1f} s", flush=True)
  finally:
    for b in burners:
      b.kill()
      b.wait()
  if a.repeat > 1:
    print(f"commit to exit, {a.repeat} runs, load {a.load}: median "
          f"{statistics.median(r[1] for r in rows):.1f} s, max {max(r[1] for r in rows):.1f} s")


if __name__ == "__main__":
  main()

"""Scaling-grid runner: the paper's 12 models (DiT-S/B/L/XL x patch 8/4/2) at 256 px.

Prints (or runs) one training job per model, each in ROOT/<config>, then the sampling +
evaluation commands that give the paper's table (FID-50K at 400K steps, no guidance).
Locally the jobs run one after another; with --tpu only the training jobs are started
(detached, through launch/tpu_vm.sh): rerun without --tpu and --models to sample later.

  python launch/grid.py --data=gs://B/latents256 --root=gs://B/grid                 # print
  python launch/grid.py --data=... --root=... --tpu=NAME --zone=Z --run             # launch
  python launch/grid.py --data=... --root=... --models=s2,b2 --run                  # local
"""

import argparse
import shlex
import subprocess
import sys

GRID = ("s8", "s4", "s2", "b8", "b4", "b2", "l8", "l4", "l2", "xl8", "xl4", "xl2")


def commands(args: argparse.Namespace) -> list[list[str]]:
  out = []
  for name in args.models.split(",") if args.models else GRID:
    if name not in GRID:
      raise SystemExit(f"--models: unknown {name!r}; choose from {','.join(GRID)}")
    workdir = f"{args.root.rstrip('/')}/{name}"
    extra = [f"--config.data.dir={args.data}", f"--config.total_steps={args.steps}"]
    if args.tpu:
      train = ["launch/tpu_vm.sh", args.tpu, args.zone, f"configs/{name}.py", workdir, *extra]
    else:
      train = [sys.executable, "-m", "dit_jax.main", f"--config=configs/{name}.py",
               f"--workdir={workdir}", *extra]
    sample = [sys.executable, "-m", "dit_jax.sample", f"--workdir={workdir}",
              "--num_samples=50000", "--cfg_scale=1.0", f"--out={workdir}/samples_50k.npz"]
    if args.vae:
      sample.append(f"--vae={args.vae}")
    evaluate = [sys.executable, "-m", "dit_jax.evaluate", f"--samples={workdir}/samples_50k.npz",
                f"--reference={args.reference}", f"--inception={args.inception}",
                f"--out={workdir}/metrics.json"]
    # On TPU VMs training runs detached on the slice: sample and evaluate after it finishes.
    out += [train] if args.tpu else [train, sample, evaluate]
  return out


def main(argv=None) -> None:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  p.add_argument("--data", required=True, help="latent directory (prepare_latents --out)")
  p.add_argument("--root", required=True, help="parent of the per-model workdirs")
  p.add_argument("--models", default="", help="comma list of config names (default: all 12)")
  p.add_argument("--steps", type=int, default=400_000, help="training steps (paper: 400K)")
  p.add_argument("--tpu", default="", help="TPU VM name: train through launch/tpu_vm.sh")
  p.add_argument("--zone", default="", help="TPU zone")
  p.add_argument("--vae", default="", help="SD VAE folder for decoding samples (default: the "
                 "one recorded in the latents' manifest)")
  p.add_argument("--reference", default="VIRTUAL_imagenet256_labeled.npz")
  p.add_argument("--inception", default="pt_inception-2015-12-05-6726825d.pth")
  p.add_argument("--run", action="store_true", help="run the commands instead of printing them")
  args = p.parse_args(argv)
  if args.tpu and not args.zone:
    p.error("--tpu needs --zone")
  for cmd in commands(args):
    print(shlex.join(cmd), flush=True)
    if args.run:
      subprocess.run(cmd, check=True)


if __name__ == "__main__":
  main()

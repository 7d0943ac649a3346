"""Thin wrapper kept for old command lines: the scaling grid lives in `python -m dit_jax.grid`.

  python launch/grid.py --data=gs://B/latents256 --root=gs://B/grid            # print commands
  python launch/grid.py --data=... --root=... --models=s2,b2 --run             # run them here
  python launch/grid.py --data=... --root=... --tpu=dit-{model} --zone=Z --run # TPU VMs

is `python -m dit_jax.grid run --preset=paper ...` with --mode=print unless --run is given; all
other flags pass through (see `python -m dit_jax.grid --help` and docs/grid.md).
"""

import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def main(argv=None) -> None:
  args = list(sys.argv[1:] if argv is None else argv)
  if "--run" in args:
    args.remove("--run")
  else:
    args.append("--mode=print")
  if not any(a.startswith("--preset") for a in args):
    args.append("--preset=paper")
  env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
  os.chdir(ROOT)
  os.execve(sys.executable, [sys.executable, "-m", "dit_jax.grid", "run", *args], env)


if __name__ == "__main__":
  main()

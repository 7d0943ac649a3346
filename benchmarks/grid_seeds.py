"""How much of a mini-grid's ranking is sampling noise? Re-scores final checkpoints, new seeds.

  python -m dit_jax.grid run --preset=mini --root=/tmp/dit_grid_mini
  python benchmarks/grid_seeds.py --root=/tmp/dit_grid_mini --seeds=1,2

Samples every model's final EMA weights again with other sampling seeds (the grid itself used
seed 0 and its metrics.json is not touched), and prints per model the proxy FID of each seed,
their mean and standard deviation, then Spearman's rho (Gflops vs proxy FID) and the paper's two
findings for each seed and for the mean over seeds. Writes ROOT/seeds.json.
"""

import dataclasses
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402
from absl import app, flags  # noqa: E402

from dit_jax.grid import presets, report, runner  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_string("root", None, "A grid directory written by `python -m dit_jax.grid run`.")
flags.DEFINE_list("seeds", ["1", "2"], "Extra sampling seeds (0 is the grid's own).")
flags.mark_flags_as_required(["root"])


def main(_):
  grid, found = report.load(FLAGS.root)
  fields = {f.name for f in dataclasses.fields(presets.Preset)} - {"name"}
  settings = {k: v for k, v in grid["settings"].items() if k in fields}
  settings["latent_shape"] = tuple(settings["latent_shape"])
  settings["models"] = tuple(settings["models"])
  settings["sampler_options"] = presets.settings_options(grid["settings"])
  preset = dataclasses.replace(presets.get_preset(grid["preset"]), **settings)
  if preset.metric != "proxy":
    raise app.UsageError("only proxy-metric grids (the mini preset) are re-scored here")
  seeds = [0] + [int(s) for s in FLAGS.seeds]
  finals = report.final(grid, found)
  fids = {}
  for m in found:
    if m["model"] not in finals:
      continue
    sampler = runner.ProxySampler(preset, os.path.join(FLAGS.root, m["model"]))
    fids[m["model"]] = [finals[m["model"]]["fid"]] + [
        sampler(preset.total_steps, seed)[2]["proxy_fid"] for seed in seeds[1:]]
    v = np.array(fids[m["model"]])
    print(f"{m['name']:9s} " + " ".join(f"{x:8.3f}" for x in v) +
          f"   mean {v.mean():8.3f}  std {v.std(ddof=1):6.3f}", flush=True)
  columns = {f"seed {s}": {k: v[i] for k, v in fids.items()} for i, s in enumerate(seeds)}
  columns["mean"] = {k: float(np.mean(v)) for k, v in fids.items()}
  summary = {}
  for label, values in columns.items():
    rows = {k: dict(finals[k], fid=values[k]) for k in values}
    rho = report.spearman(rows)[0]
    f = report.findings(rows)
    held = {kind: f"{sum(ok for *_, ok in pairs)}/{len(pairs)}" for kind, pairs in f.items()}
    summary[label] = {"spearman": rho, "patch_pairs": held["patch"], "size_pairs": held["size"]}
    print(f"{label:8s}: rho {rho:.3f}; smaller patch better {held['patch']} pairs; "
          f"bigger model better {held['size']} pairs")
  with open(os.path.join(FLAGS.root, "seeds.json"), "w", encoding="utf-8") as fh:
    json.dump({"seeds": seeds, "proxy_fid": fids, "summary": summary}, fh, indent=1)


if __name__ == "__main__":
  app.run(main)

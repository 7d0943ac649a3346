"""The mini-grid trained as a flow (SiT) beside the same grid trained with ADM diffusion.

  python -m dit_jax.grid run --preset=mini --root=/tmp/grid_adm
  python -m dit_jax.grid run --preset=mini --root=/tmp/grid_flow --set=objective.name=flow \
      --sampler=euler --sampler_steps=51
  python benchmarks/grid_seeds.py --root=/tmp/grid_adm --seeds=1,2
  python benchmarks/grid_seeds.py --root=/tmp/grid_flow --seeds=1,2
  python benchmarks/flow_vs_adm_grid.py --adm=/tmp/grid_adm --flow=/tmp/grid_flow

Equal training (the preset's steps and batch), equal NFE (ADM: 50 DDPM steps; flow: Euler on
SiT's grid of 51 points, 50 model calls), three sampling seeds each (grid_seeds.py's seeds.json).
Prints per model the mean proxy FID of each objective over the seeds, which one wins (and
whether the seed spread separates them), how many of the models flow wins, and Spearman's rho
between Gflops and proxy FID for each.
"""

import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402
from absl import app, flags  # noqa: E402
from scipy import stats  # noqa: E402

from dit_jax.grid import presets, report  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_string("adm", None, "Grid root trained with the ADM objective (with seeds.json).")
flags.DEFINE_string("flow", None, "Grid root trained with the flow objective (with seeds.json).")
flags.DEFINE_string("json", "", "Also write the comparison here.")
flags.mark_flags_as_required(["adm", "flow"])


def _load(root):
  path = os.path.join(root, "seeds.json")
  if not os.path.exists(path):
    raise app.UsageError(f"{path} is missing: run benchmarks/grid_seeds.py --root={root} first")
  with open(path, encoding="utf-8") as f:
    seeds = json.load(f)
  grid, found = report.load(root)
  return seeds, grid, report.final(grid, found)


def main(_):
  adm, adm_grid, adm_final = _load(FLAGS.adm)
  flow, flow_grid, _ = _load(FLAGS.flow)
  for name, grid in (("adm", adm_grid), ("flow", flow_grid)):
    s = grid["settings"]
    print(f"{name}: {s['total_steps']} steps, sampler {presets.sampler_name(s)}, "
          f"{s['num_samples']} samples, seeds {[0, 1, 2]}")
  models = [m for m in adm["proxy_fid"] if m in flow["proxy_fid"]]
  wins, rows = 0, []
  print(f"{'model':8s} {'Gflops':>8s} {'ADM mean (std)':>18s} {'flow mean (std)':>18s}  winner")
  for m in models:
    a, f = np.array(adm["proxy_fid"][m]), np.array(flow["proxy_fid"][m])
    win = f.mean() < a.mean()
    wins += win
    # "clear": the means differ by more than the two seed spreads together.
    clear = abs(f.mean() - a.mean()) > a.std(ddof=1) + f.std(ddof=1)
    rows.append({"model": m, "gflops": adm_final[m]["gflops"], "adm": a.tolist(),
                 "flow": f.tolist(), "flow_wins": bool(win), "clear": bool(clear)})
    print(f"{m:8s} {adm_final[m]['gflops']:8.4f} {a.mean():9.3f} ({a.std(ddof=1):5.3f})  "
          f"{f.mean():9.3f} ({f.std(ddof=1):5.3f})  {'flow' if win else 'ADM'}"
          f"{'' if clear else ' (within the seed spread)'}")
  rho = {}
  for name, key in (("adm", "adm"), ("flow", "flow")):
    g = [r["gflops"] for r in rows]
    v = [float(np.mean(r[key])) for r in rows]
    rho[name] = float(stats.spearmanr(g, v)[0])
  both = stats.spearmanr([np.mean(r["adm"]) for r in rows], [np.mean(r["flow"]) for r in rows])
  print(f"flow wins {wins} of {len(rows)} models "
        f"({sum(r['flow_wins'] and r['clear'] for r in rows)} beyond the seed spread; ADM "
        f"{sum((not r['flow_wins']) and r['clear'] for r in rows)})")
  print(f"Spearman's rho, Gflops vs mean proxy FID: ADM {rho['adm']:.3f}, flow {rho['flow']:.3f}; "
        f"between the two grids' rankings {both[0]:.3f}")
  if FLAGS.json:
    with open(FLAGS.json, "w", encoding="utf-8") as fh:
      json.dump({"rows": rows, "flow_wins": int(wins), "spearman_gflops": rho,
                 "spearman_between": float(both[0])}, fh, indent=1)


if __name__ == "__main__":
  app.run(main)

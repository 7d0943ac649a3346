"""The mini-grid trained as a flow (SiT) beside the same grid trained with ADM diffusion.

  python -m dit_jax.grid run --preset=mini --root=/tmp/grid_adm
  python -m dit_jax.grid run --preset=mini --root=/tmp/grid_flow --set=objective.name=flow \
      --sampler=euler --sampler_steps=51
  python benchmarks/grid_seeds.py --root=/tmp/grid_adm --seeds=1,2
  python benchmarks/grid_seeds.py --root=/tmp/grid_flow --seeds=1,2
  python benchmarks/flow_vs_adm_grid.py --adm=/tmp/grid_adm --flow=/tmp/grid_flow

--adm may instead name a JSON of per-model 3-seed means and standard deviations ({"models":
{"s8": {"mean": ..., "std": ...}, ...}}), e.g. docs/measurements/grid_mini_adm_3seeds.json, the
ADM mini-grid measured in docs/grid.md.

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
flags.DEFINE_string("adm", None, "Grid root trained with the ADM objective (with seeds.json), "
                    "or a JSON of its per-model seed means and standard deviations.")
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


def _adm_stats(path):
  """{model: (mean, std)} over the seeds, from a grid root or a JSON of them."""
  if path.endswith(".json"):
    with open(path, encoding="utf-8") as f:
      return {m: (v["mean"], v["std"]) for m, v in json.load(f)["models"].items()}
  seeds, _, _ = _load(path)
  return {m: (float(np.mean(v)), float(np.std(v, ddof=1))) for m, v in seeds["proxy_fid"].items()}


def main(_):
  adm = _adm_stats(FLAGS.adm)
  flow, flow_grid, flow_final = _load(FLAGS.flow)
  s = flow_grid["settings"]
  print(f"flow: {s['total_steps']} steps, sampler {presets.sampler_name(s)}, "
        f"{s['num_samples']} samples, seeds {flow['seeds']}; ADM from {FLAGS.adm}")
  models = [m for m in flow["proxy_fid"] if m in adm]
  wins, rows = 0, []
  print(f"{'model':8s} {'Gflops':>8s} {'ADM mean (std)':>18s} {'flow mean (std)':>18s}  winner")
  for m in models:
    (a_mean, a_std), f = adm[m], np.array(flow["proxy_fid"][m])
    win = f.mean() < a_mean
    wins += win
    # "clear": the means differ by more than the two seed spreads together.
    clear = abs(f.mean() - a_mean) > a_std + f.std(ddof=1)
    rows.append({"model": m, "gflops": flow_final[m]["gflops"], "adm_mean": a_mean,
                 "adm_std": a_std, "flow": f.tolist(), "flow_mean": float(f.mean()),
                 "flow_std": float(f.std(ddof=1)), "flow_wins": bool(win), "clear": bool(clear)})
    print(f"{m:8s} {flow_final[m]['gflops']:8.4f} {a_mean:9.3f} ({a_std:5.3f})  "
          f"{f.mean():9.3f} ({f.std(ddof=1):5.3f})  {'flow' if win else 'ADM'}"
          f"{'' if clear else ' (within the seed spread)'}")
  g = [r["gflops"] for r in rows]
  rho = {"adm": float(stats.spearmanr(g, [r["adm_mean"] for r in rows])[0]),
         "flow": float(stats.spearmanr(g, [r["flow_mean"] for r in rows])[0])}
  both = float(stats.spearmanr([r["adm_mean"] for r in rows], [r["flow_mean"] for r in rows])[0])
  print(f"flow wins {wins} of {len(rows)} models "
        f"({sum(r['flow_wins'] and r['clear'] for r in rows)} beyond the seed spread; ADM "
        f"{sum((not r['flow_wins']) and r['clear'] for r in rows)})")
  print(f"Spearman's rho, Gflops vs mean proxy FID: ADM {rho['adm']:.3f}, flow {rho['flow']:.3f}; "
        f"between the two grids' rankings {both:.3f}")
  if FLAGS.json:
    with open(FLAGS.json, "w", encoding="utf-8") as fh:
      json.dump({"rows": rows, "flow_wins": int(wins), "spearman_gflops": rho,
                 "spearman_between": both}, fh, indent=1)


if __name__ == "__main__":
  app.run(main)

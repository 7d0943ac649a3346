"""The grid's report: results.csv, report.md and the paper's three scaling figures.

Reads ROOT/grid.json (the preset and its settings, written by `run`) and, per model,
ROOT/<model>/model.json (params, Gflops) and metrics.json (step -> metrics). Writes:
  results.csv           one row per (model, evaluated step): params, Gflops, training compute
                        (Gflops x batch x steps x 3, the paper's convention), fid and the rest;
  report.md             the final-step table (beside the paper's Table 4 for the paper preset),
                        Spearman's rho between Gflops and FID, and the paper's two findings
                        checked pair by pair;
  fid_vs_steps.png      FID along training, one line per model (the paper's Figure 6);
  fid_vs_gflops.png     FID at the final step vs forward Gflops, log-log (Figure 8);
  fid_vs_compute.png    FID vs training compute, one line per model, log-log (Figure 9).
"""

from __future__ import annotations

import csv
import io
import os
from typing import Any

import numpy as np
import tensorflow as tf

from dit_jax.grid import presets, runner

SIZES = ("S", "B", "L", "XL")
PATCHES = (8, 4, 2)
COLORS = {"S": "#1f77b4", "B": "#2ca02c", "L": "#ff7f0e", "XL": "#d62728"}
LINESTYLES = {8: ":", 4: "--", 2: "-"}
MARKERS = {8: "s", 4: "^", 2: "o"}
# The paper's Table 4: 256x256, 400K steps, no guidance -> FID-50K (Gflops and params are in
# dit_jax.model_table.PAPER_256).
PAPER_FID_400K = {
    "DiT-S/8": 153.60, "DiT-S/4": 100.41, "DiT-S/2": 68.40, "DiT-B/8": 122.74,
    "DiT-B/4": 68.38, "DiT-B/2": 43.47, "DiT-L/8": 118.87, "DiT-L/4": 45.64, "DiT-L/2": 23.33,
    "DiT-XL/8": 106.41, "DiT-XL/4": 43.01, "DiT-XL/2": 19.47,
}



def fid_key(grid: dict) -> str:
  return "proxy_fid" if grid.get("settings", {}).get("metric") == "proxy" else "fid"


def fid_label(grid: dict, short: bool = False) -> str:
  s = grid.get("settings", {})
  n = s.get("num_samples")
  if s.get("metric") == "proxy":
    return f"proxy FID-{n}" + ("" if short else " (digits classifier features)")
  return f"FID-{n // 1000}K" if n and n % 1000 == 0 else f"FID-{n}"


def load(root: str) -> tuple[dict, list[dict]]:
  """(grid.json, [model.json + {'metrics': {step: {...}}, 'timing': {...}}]) in grid order."""
  grid = runner.read_json(os.path.join(root, runner.GRID_FILE))
  if grid is None:
    raise FileNotFoundError(f"{root}/{runner.GRID_FILE} not found: run `python -m dit_jax.grid "
                            f"run --root={root}` first")
  found = []
  for name in grid.get("models", []):
    workdir = os.path.join(root, name)
    info = runner.read_json(os.path.join(workdir, runner.MODEL_FILE))
    if info is None:
      continue
    info = dict(info, metrics=runner.read_metrics(workdir),
                timing=runner.read_json(os.path.join(workdir, "timing.json"), {}))
    found.append(info)
  order = {(s, p): i for i, (s, p) in enumerate((s, p) for s in SIZES for p in PATCHES)}
  found.sort(key=lambda m: order.get((m["size"], m["patch"]), len(order)))
  return grid, found


def rows(grid: dict, found: list[dict]) -> list[dict]:
  """One dict per (model, evaluated step), the columns of results.csv."""
  key = fid_key(grid)
  out = []
  for m in found:
    for step, values in sorted(m["metrics"].items()):
      row = {"model": m["model"], "name": m["name"], "size": m["size"], "patch": m["patch"],
             "params": m["params"], "gflops": m["gflops"], "batch": m["batch"],
             "step": step, "train_compute_gflops": m["gflops"] * m["batch"] * step * 3,
             "fid": values.get(key, float("nan"))}
      row.update({k: v for k, v in sorted(values.items()) if k != key and
                  isinstance(v, (int, float)) and not isinstance(v, bool)})
      out.append(row)
  return out


def final(grid: dict, found: list[dict]) -> dict[str, dict]:
  """{model: row} at the grid's final step, for the models evaluated there."""
  total = grid.get("settings", {}).get("total_steps")
  return {r["model"]: r for r in rows(grid, found) if r["step"] == total}


def spearman(final_rows: dict[str, dict], x: str = "gflops") -> tuple[float, float, int]:
  """Spearman's rho (and p-value) between `x` and FID over the models, and their count."""
  from scipy import stats  # pylint: disable=import-outside-toplevel
  pts = [(r[x], r["fid"]) for r in final_rows.values() if np.isfinite(r["fid"])]
  if len(pts) < 3:
    return float("nan"), float("nan"), len(pts)
  res = stats.spearmanr(*zip(*pts))
  return float(res.statistic), float(res.pvalue), len(pts)


def paper_spearman() -> float:
  from scipy import stats  # pylint: disable=import-outside-toplevel
  from dit_jax import model_table  # pylint: disable=import-outside-toplevel
  names = list(PAPER_FID_400K)
  return float(stats.spearmanr([model_table.PAPER_256[n][0] for n in names],
                               [PAPER_FID_400K[n] for n in names]).statistic)


def findings(final_rows: dict[str, dict]) -> dict[str, list[tuple[str, str, bool]]]:
  """The paper's two findings as pairwise comparisons of final FIDs (lower is better).

  'patch': at equal size, each halving of the patch (8 -> 4 -> 2) should lower the FID;
  'size': at equal patch, each bigger model (S -> B -> L -> XL) should lower the FID.
  Returns lists of (worse-expected model, better-expected model, holds).
  """
  fid = {(r["size"], r["patch"]): (r["model"], r["fid"]) for r in final_rows.values()}
  out = {"patch": [], "size": []}
  for size in SIZES:
    for a, b in zip(PATCHES, PATCHES[1:]):
      if (size, a) in fid and (size, b) in fid:
        out["patch"].append((fid[size, a][0], fid[size, b][0], fid[size, b][1] < fid[size, a][1]))
  for patch in PATCHES:
    for a, b in zip(SIZES, SIZES[1:]):
      if (a, patch) in fid and (b, patch) in fid:
        out["size"].append((fid[a, patch][0], fid[b, patch][0],
                            fid[b, patch][1] < fid[a, patch][1]))
  return out


def _write_bytes(path: str, data: bytes) -> None:
  with tf.io.gfile.GFile(path + ".tmp", "wb") as f:
    f.write(data)
  tf.io.gfile.rename(path + ".tmp", path, overwrite=True)


def write_csv(path: str, table: list[dict]) -> None:
  columns = []
  for r in table:
    columns += [k for k in r if k not in columns]
  buf = io.StringIO()
  w = csv.DictWriter(buf, fieldnames=columns, lineterminator="\n")
  w.writeheader()
  for r in table:
    w.writerow(r)
  _write_bytes(path, buf.getvalue().encode())


def _figure(path: str, draw) -> None:
  import matplotlib  # pylint: disable=import-outside-toplevel
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel
  fig, ax = plt.subplots(figsize=(6.4, 4.6), dpi=100)
  draw(ax)
  ax.grid(True, which="both", alpha=0.3)
  fig.tight_layout()
  buf = io.BytesIO()
  fig.savefig(buf, format="png")
  plt.close(fig)
  _write_bytes(path, buf.getvalue())


def _style(m: dict) -> dict:
  return dict(color=COLORS.get(m["size"], "k"), linestyle=LINESTYLES.get(m["patch"], "-"),
              marker=MARKERS.get(m["patch"], "o"), label=m["name"])


def plot(root: str, grid: dict, found: list[dict]) -> list[str]:
  """The three figures; returns their paths."""
  key, ylabel = fid_key(grid), fid_label(grid)
  paper = grid.get("preset") == "paper"
  finals = final(grid, found)
  paths = [os.path.join(root, f) for f in ("fid_vs_steps.png", "fid_vs_gflops.png",
                                           "fid_vs_compute.png")]

  def curve(m, x_of):
    steps = [s for s in sorted(m["metrics"]) if np.isfinite(m["metrics"][s].get(key, np.nan))]
    return [x_of(m, s) for s in steps], [m["metrics"][s][key] for s in steps]

  def steps_fig(ax):
    for m in found:
      x, y = curve(m, lambda m, s: s)
      if x:
        ax.plot(x, y, markersize=4, **_style(m))
    ax.set_xlabel("training steps")
    ax.set_ylabel(ylabel)
    ax.set_yscale("log")
    ax.set_title("FID along training")
    ax.legend(fontsize=7, ncol=2)

  def gflops_fig(ax):
    for m in found:
      r = finals.get(m["model"])
      if r is not None and np.isfinite(r["fid"]):
        st = _style(m)
        ax.plot([r["gflops"]], [r["fid"]], linestyle="none", marker=st["marker"],
                color=st["color"], label=m["name"], markersize=7)
        ax.annotate(m["name"].replace("DiT-", ""), (r["gflops"], r["fid"]), fontsize=7,
                    xytext=(4, 3), textcoords="offset points")
    if paper:
      from dit_jax import model_table  # pylint: disable=import-outside-toplevel
      ax.plot([model_table.PAPER_256[n][0] for n in PAPER_FID_400K], list(PAPER_FID_400K.values()),
              linestyle="none", marker="x", color="gray", label="paper, Table 4")
    rho, _, n = spearman(finals)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("transformer Gflops (forward multiply-accumulates per image)")
    ax.set_ylabel(ylabel)
    ax.set_title(f"FID at step {grid.get('settings', {}).get('total_steps')} vs Gflops "
                 f"(Spearman rho {rho:.2f}, {n} models)")
    ax.legend(fontsize=7, ncol=2)

  def compute_fig(ax):
    for m in found:
      x, y = curve(m, lambda m, s: m["gflops"] * m["batch"] * s * 3)
      if x:
        ax.plot(x, y, markersize=4, **_style(m))
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("training compute (Gflops x batch x steps x 3)")
    ax.set_ylabel(ylabel)
    ax.set_title("FID vs training compute")
    ax.legend(fontsize=7, ncol=2)

  for path, draw in zip(paths, (steps_fig, gflops_fig, compute_fig)):
    _figure(path, draw)
  return paths


def _fmt(x: Any, digits: int = 4) -> str:
  if isinstance(x, float):
    return "-" if not np.isfinite(x) else f"{x:.{digits}g}"
  return f"{x:,}" if isinstance(x, int) else str(x)


def markdown(grid: dict, found: list[dict]) -> str:
  s = grid.get("settings", {})
  paper = grid.get("preset") == "paper"
  finals = final(grid, found)
  total = s.get("total_steps")
  lines = [f"# DiT scaling grid: preset `{grid.get('preset')}`", "",
           f"{len(found)} models; {total:,} training steps each at batch "
           f"{found[0]['batch'] if found else '?'}; {fid_label(grid)}, sampled with "
           f"{presets.sampler_name(s)}, guidance {s.get('cfg_scale')}, evaluated every "
           f"{s.get('eval_every'):,} steps. Gflops: forward multiply-accumulates per image "
           "(dit_jax.model_table, the paper's convention); training compute = Gflops x batch x "
           "steps x 3.", ""]
  if s.get("metric") == "proxy":
    lines += ["The proxy FID is the Frechet distance in the features of a small classifier "
              "trained on the same digits (dit_jax/evaluation/proxy.py); comparable within this "
              "grid only, not with published FIDs.", ""]
  # Final-step table.
  extra = [k for k in ("precision", "recall", "class_accuracy", "sfid", "inception_score")
           if any(k in r for r in finals.values())]
  head = ["model", "patch", "tokens", "params", "Gflops", f"{fid_label(grid, True)} @ {total:,}",
          *extra]
  if paper:
    head += ["paper params", "paper Gflops", "paper FID-50K @ 400K"]
  lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
  for m in found:
    r = finals.get(m["model"], {})
    cells = [m["name"], str(m["patch"]), str(m.get("tokens", "")), f"{m['params']:,}",
             f"{m['gflops']:.4g}", _fmt(r.get("fid", float("nan")))]
    cells += [_fmt(float(r[k]), 3) if k in r else "-" for k in extra]
    if paper:
      from dit_jax import model_table  # pylint: disable=import-outside-toplevel
      g, p = model_table.PAPER_256.get(m["name"], (float("nan"), 0))
      cells += [f"{p:,}", f"{g:.2f}", _fmt(PAPER_FID_400K.get(m["name"], float("nan")))]
    lines.append("| " + " | ".join(cells) + " |")
  lines.append("")
  # Matrix view, as the paper's Figure 2/Table 4 reads: sizes x patches.
  fid = {(r["size"], r["patch"]): r["fid"] for r in finals.values()}
  if fid:
    lines += [f"{fid_label(grid, True)} at step {total:,} (rows: model size, columns: patch):", "",
              "| | " + " | ".join(f"/{p}" for p in PATCHES) + " |", "|---|---|---|---|"]
    for size in SIZES:
      lines.append(f"| {size} | " + " | ".join(_fmt(fid.get((size, p), float("nan")))
                                              for p in PATCHES) + " |")
    lines.append("")
  rho, pvalue, n = spearman(finals)
  lines += [f"Spearman's rho between Gflops and {fid_label(grid, True)} at step {total:,}: "
            f"**{_fmt(rho, 3)}** (p = {_fmt(pvalue, 2)}, {n} models). The paper's Table 4 "
            f"(FID-50K at 400K steps): {paper_spearman():.3f}.", ""]
  f = findings(finals)
  for kind, text in (("patch", "Smaller patch better at equal model size (8 -> 4 -> 2)"),
                     ("size", "Bigger model better at equal patch (S -> B -> L -> XL)")):
    pairs = f[kind]
    held = sum(ok for *_, ok in pairs)
    lines.append(f"- {text}: holds for {held} of {len(pairs)} pairs" +
                 ("" if held == len(pairs) else "; fails for " + ", ".join(
                     f"{a} -> {b}" for a, b, ok in pairs if not ok)) + ".")
  lines.append("")
  times = [(m["name"], m["timing"]) for m in found if m.get("timing")]
  if times:
    lines += ["Wall time per model (training / evaluation, seconds): " + "; ".join(
        f"{n} {t.get('train_seconds', 0):.0f} / {t.get('eval_seconds', 0):.0f}" for n, t in times)
              + ".", ""]
  lines += ["Figures: [FID vs training steps](fid_vs_steps.png), [FID vs Gflops]"
            "(fid_vs_gflops.png), [FID vs training compute](fid_vs_compute.png); all rows in "
            "results.csv.", ""]
  return "\n".join(lines)


def write_report(root: str) -> dict[str, Any]:
  """Writes results.csv, report.md and the figures under root; returns paths and key figures."""
  grid, found = load(root)
  table = rows(grid, found)
  write_csv(os.path.join(root, "results.csv"), table)
  figures = plot(root, grid, found)
  _write_bytes(os.path.join(root, "report.md"), markdown(grid, found).encode())
  finals = final(grid, found)
  return {"csv": os.path.join(root, "results.csv"), "markdown": os.path.join(root, "report.md"),
          "figures": figures, "rows": len(table), "spearman": spearman(finals)[0],
          "findings": findings(finals)}

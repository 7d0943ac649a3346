"""The generator of the planner's tables in the docs, from rows compiled by dit_jax.aot:

  - docs/performance.md's planner table (between its aot-table markers): the train step of
    every grid config and xl2_512 on five TPU slices in each state layout, the option studies
    on v5p-64 (remat, attention, layer scan), and the guided sampling step;
  - docs/performance.json: those rows, keyed by `row_key` (config, topology, --config
    overrides), each compiled in its own `python -m dit_jax.aot --json` process;
  - docs/grid.md's cost of the paper's grid (between its grid-cost markers), from the same rows.

Regenerated (compiling only the rows missing from docs/performance.json, or that failed) by

  python -m dit_jax.aot --table [--jobs=2] [--only='^xl2 v5p-64']
"""

from __future__ import annotations

import concurrent.futures
import json
import os
import re
import subprocess
import sys
import tempfile
import time

from dit_jax import hardware

# The grid's 12 configs and xl2_512 on five slices, then the option studies.
TABLE_CONFIGS = ("s8", "s4", "s2", "b8", "b4", "b2", "l8", "l4", "l2", "xl8", "xl4", "xl2",
                 "xl2_512")
TABLE_TOPOLOGIES = ("v5p-8", "v5p-64", "v5p-256", "v5e-256", "v6e-64")


OPTION_ROWS = (  # (config, overrides) compiled on v5p-64 beside each default
    ("xl2", ()), ("xl2", ("model.remat=full",)), ("xl2", ("model.remat=dots_saveable",)),
    ("xl2", ("model.remat=dots_with_no_batch_dims_saveable",)),
    ("xl2", ("model.attention_impl=splash",)),
    ("xl2", ("model.scan_layers=True",)), ("xl2", ("model.scan_layers=True", "model.remat=full")),
    ("xl2_512", ()), ("xl2_512", ("model.remat=none",)),
    ("xl2_512", ("model.remat=dots_saveable",)),
    ("xl2_512", ("model.remat=dots_with_no_batch_dims_saveable",)),
    ("xl2_512", ("model.remat=full",)),
    ("xl2_512", ("model.remat=full", "model.attention_impl=xla_tokens")),
    ("xl2_512", ("model.remat=none", "model.attention_impl=xla_tokens")),
    ("xl2_512", ("model.remat=dots_saveable", "model.attention_impl=xla_tokens")),
    ("xl2_512", ("model.remat=dots_with_no_batch_dims_saveable",
                 "model.attention_impl=xla_tokens")),
)


# Every part of the state replicated (at fsdp 1), no TPU overlap options, XLA's partitioner.
# Compiled beside each default row.
REPLICATED = ("sharding.params=compute", "sharding.opt_state=compute", "sharding.ema=compute",
              "mesh.overlap_collectives=False", "sharding.collectives=xla")
# The explicit step with the adaLN kernels gathered like every other parameter (the default,
# config.sharding.modulation='stationary', computes the modulations where the kernels are stored).
GATHERED = ("sharding.modulation=gathered",)
# The update layout with the collectives left to XLA's partitioner (the default writes them
# out in a shard_map: config.sharding.collectives='explicit').
XLA_UPDATE = ("sharding.collectives=xla",)
# That with the TPU overlap options on (XL/2 only).
OVERLAP = ("mesh.overlap_collectives=True", "sharding.collectives=xla")
# The default with splash attention at 256 px (XL/2 on the v5p slices; 'auto' picks it from
# 1,024 tokens: attention.SPLASH_MIN_TOKENS).
SPLASH = ("model.attention_impl=splash",)
SPLASH_TOPOLOGIES = ("v5p-8", "v5p-64", "v5p-256")
# The XLA attention path in the token-major layout [N, T, heads, head_dim] (the default XLA
# path is head-major). `overrides` adds it to the rows of the variants in TOKEN_MAJOR_ROWS,
# except xl2_512's, whose 'auto' attention is splash on TPUs.
TOKENS = ("model.attention_impl=xla_tokens",)
# Rows of the table, in order, with their labels.
VARIANTS = (((), "update"), (TOKENS, "update, token-major attention"),
            (GATHERED, "update, adaLN gathered"),
            (SPLASH, "update, splash attention"),
            (XLA_UPDATE, "update, XLA's collectives"),
            (OVERLAP, "update, XLA's collectives, overlap options"), (REPLICATED, "replicated"))
# The variants whose rows are compiled with the token-major XLA attention (TOKENS added by
# `overrides`): their cached rows in docs/performance.json are keyed with it.
TOKEN_MAJOR_ROWS = (GATHERED, XLA_UPDATE, OVERLAP, REPLICATED)


def overrides(config: str, variant: tuple[str, ...]) -> tuple[str, ...]:
  """The --config overrides of `variant`'s row for `config` (the variants in TOKEN_MAJOR_ROWS
  with the token-major XLA attention, TOKENS)."""
  if variant in TOKEN_MAJOR_ROWS and config != "xl2_512":
    return variant + TOKENS
  return variant


def option_overrides(config: str, option: tuple[str, ...]) -> tuple[str, ...]:
  """The --config overrides of an option study's row (replicated state, token-major XLA
  attention where the option leaves attention to 'auto' at 256 px)."""
  auto_xla = config != "xl2_512" and not any("attention_impl" in o for o in option)
  return option + REPLICATED + (TOKENS if auto_xla else ())


def table_rows() -> list[tuple[str, str, tuple[str, ...]]]:
  """(config, topology, --config overrides) of every row of docs/performance.md."""
  rows = [(c, t, overrides(c, o)) for c in TABLE_CONFIGS for t in TABLE_TOPOLOGIES
          for o in ((), TOKENS, GATHERED, XLA_UPDATE, REPLICATED)
          if not (o == TOKENS and c == "xl2_512")]
  rows += [("xl2", t, overrides("xl2", OVERLAP)) for t in TABLE_TOPOLOGIES]
  rows += [("xl2", t, SPLASH) for t in SPLASH_TOPOLOGIES]
  # The option studies keep the replicated layout, so that they compare with each other.
  return rows + [(c, "v5p-64", option_overrides(c, o)) for c, o in OPTION_ROWS if o]


def row_key(config: str, topology: str, overrides: tuple[str, ...]) -> str:
  return " ".join((config, topology) + tuple(overrides))


def _run_row(config: str, topology: str, overrides: tuple[str, ...], sampling: bool,
             timeout: float) -> dict:
  """One row in a fresh process (compiles do not accumulate; a crash costs one row)."""
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  with tempfile.TemporaryDirectory() as tmp:
    out = os.path.join(tmp, "row.json")
    cmd = [sys.executable, "-m", "dit_jax.aot", f"--config={root}/configs/{config}.py",
           f"--topology={topology}", f"--json={out}", f"--sampling={sampling}"]
    cmd += [f"--config.{o}" for o in overrides]
    t0 = time.time()
    try:
      proc = subprocess.run(cmd, cwd=root, capture_output=True, text=True, timeout=timeout,
                            check=False)
    except subprocess.TimeoutExpired:
      return {"error": f"compile took over {timeout:.0f} s"}
    if proc.returncode or not os.path.exists(out):
      tail = [l for l in (proc.stderr or "").strip().splitlines() if l.strip()][-1:]
      return {"error": (tail[0] if tail else f"exit {proc.returncode}")[:300]}
    with open(out) as f:
      row = json.load(f)
    row["wall_seconds"] = time.time() - t0
    return row


def run_table(cache: str, jobs: int, timeout: float, only: str = "") -> dict[str, dict]:
  """Compiles every missing row of `table_rows()` into the JSON `cache` (kept after each row,
  so an interrupted run resumes)."""
  rows = {}
  if os.path.exists(cache):
    with open(cache) as f:
      rows = json.load(f)
  todo = [r for r in table_rows() if row_key(*r) not in rows or "error" in rows[row_key(*r)]]
  todo = [r for r in todo if re.search(only, row_key(*r))]
  # XL/2 first (the headline figures), then the rest largest first, so that the
  # longest compiles do not come last when several run at once.
  order = ("xl2_512", "xl2") + tuple(reversed(TABLE_CONFIGS))
  todo.sort(key=lambda r: (order.index(r[0]), not r[2]))
  print(f"{len(rows)} rows cached in {cache}; compiling {len(todo)} with {jobs} process(es)")
  sampling = lambda c, t, o: (c in ("xl2", "xl2_512") and not o and
                              row_key(c, t, overrides(c, REPLICATED)) not in rows)
  with concurrent.futures.ThreadPoolExecutor(jobs) as pool:
    futures = {pool.submit(_run_row, *r, sampling(*r), timeout): r for r in todo}
    for fut in concurrent.futures.as_completed(futures):
      key = row_key(*futures[fut])
      rows[key] = fut.result()
      print(f"  {key}: " + (rows[key].get("error") or
                            f"{rows[key]['steps']['train step']['memory']['total']:.1f} GiB, "
                            f"{rows[key]['wall_seconds']:.0f} s"), flush=True)
      tmp = cache + ".tmp"
      with open(tmp, "w") as f:
        json.dump(rows, f, indent=1, sort_keys=True)
      os.replace(tmp, cache)
  return rows


def _fits(row: dict) -> bool:
  return row["steps"]["train step"]["memory"]["total"] <= row["hbm_gib"]


def _step_roofline(spec: hardware.Chip, st: dict) -> float:
  """A cached step's roofline, recomputed from its counts with at least the analytic FLOPs
  (XLA counts none in the splash kernels)."""
  return hardware.roofline_seconds(
      spec, max(st["flops"], st["analytic_flops"] or 0.0), st["bytes_accessed"],
      sum(st["collectives"].values()))


def _cells(row: dict) -> dict[str, str]:
  """Formatted facts of one row's train step."""
  tr = row["steps"]["train step"]
  spec = hardware.CHIPS.get(row["device_kind"])
  mem = tr["memory"]["total"]
  peak = row["peak_flops"]
  mesh = row["mesh"]
  data = mesh.get("slice", 1) * mesh.get("data", 1) * mesh.get("data_minor", 1)
  out = {"mesh": f"{data}x{mesh.get('fsdp', 1)}",
         "memory": f"{mem:.1f} / {row['hbm_gib']:.0f}" + ("" if _fits(row) else " **no fit**"),
         "flops": f"{tr['flops'] / tr['analytic_flops']:.2f}" if tr["analytic_flops"] else "",
         "coll": f"{sum(tr['collectives'].values()) / 2**20:.0f}",
         "compile": f"{tr['compile_seconds']:.0f}"}
  xla = tr.get("xla_seconds")
  out["xla"] = f"{xla * 1e3:.1f}" if xla else "invalid"
  if row["scan_layers"]:  # XLA's bytes, collectives and estimate count the loop body once
    out["roof"] = out["mfu"] = out["ips"] = out["xla"] = "n/a (loop)"
    out["coll"] = f"{out['coll']} (loop body once)"
  elif spec and peak:
    roof = _step_roofline(spec, tr)
    out["roof"] = f"{roof * 1e3:.1f}"
    out["mfu"] = f"{tr['analytic_flops'] / (roof * peak):.0%}"
    out["ips"] = f"{row['global_batch'] / roof:,.0f}"
  return out


def render_table(rows: dict[str, dict]) -> str:
  """The Markdown of docs/performance.md's generated part."""
  def get(c, t, o=()):
    return rows.get(row_key(c, t, overrides(c, o)))
  head = ("| config | topology | state | mesh data x fsdp | memory/chip GiB (of HBM) | "
          "FLOPs / analytic | collectives MiB/step | roofline ms/step | XLA's estimate ms | "
          "images/s at roofline | MFU at roofline | compile s |\n"
          "|---|---|---|---|---|---|---|---|---|---|---|---|")
  lines = ["### Train step: every grid config and xl2_512 on five slices (global batch 256, "
           "bf16, default layout and remat)", "",
           "state: `update` = the default (config.sharding: parameters, Adam moments and EMA "
           "sharded over the data-parallel chips of a slice; at fsdp 1 the data-parallel "
           "collectives written out in a shard_map, config.sharding.collectives='explicit', "
           "and the adaLN modulations computed where their kernels are stored, "
           "config.sharding.modulation='stationary', and the XLA attention path head-major); "
           "`update, token-major attention` = the same with the XLA attention path in the "
           "token-major layout (model.attention_impl='xla_tokens'); the rows below it keep "
           "that attention, as they were compiled (not xl2_512, whose attention is splash): "
           "`update, adaLN gathered` = the adaLN kernels gathered whole ('gathered'); "
           "`update, XLA's collectives` = the same layout with the collectives left to XLA's "
           "partitioner ('xla'); `..., overlap options` = that with "
           "config.mesh.overlap_collectives=True; `replicated` = the layout before them all "
           "(every part replicated, XLA's collectives).", "", head]
  for c in TABLE_CONFIGS:
    for t in TABLE_TOPOLOGIES:
      for o, label in VARIANTS:
        if (c, t, overrides(c, o)) not in table_rows():
          continue
        r = get(c, t, o)
        if not r or "error" in r:
          why = r["error"] if r else ("not compiled yet: python -m dit_jax.aot --table "
                                      f"--only='^{row_key(c, t, overrides(c, o))}$'")
          lines.append(f"| {c} | {t} | {label} | | {why} | | | | | | | |")
          continue
        x = _cells(r)
        name = f"{r['config']} {r['image_size']}px" + (f" (remat {r['remat']})"
                                                       if r["remat"] != "none" else "")
        lines.append(f"| {name} | {t} | {label} | {x['mesh']} | {x['memory']} | {x['flops']} | "
                     f"{x['coll']} | {x.get('roof', '')} | {x['xla']} | {x.get('ips', '')} | "
                     f"{x.get('mfu', '')} | {x['compile']} |")
  lines += ["", "### Options on v5p-64 (XL/2, 256 and 512 px): remat, attention, layer scan "
            "(replicated state)", "",
            "| config | option | memory/chip GiB | FLOPs / analytic | collectives MiB/step | "
            "roofline ms/step | MFU at roofline | compile s |", "|---|---|---|---|---|---|---|---|"]
  for c, o in OPTION_ROWS:
    r = rows.get(row_key(c, "v5p-64", option_overrides(c, o)))
    if not r:
      continue
    label = ", ".join(x.replace("model.", "") for x in o) or "default"
    if "error" in r:
      lines.append(f"| {c} | {label} | {r['error']} | | | | | |")
      continue
    x = _cells(r)
    attn = "xla" if r["attention"] in ("None", "auto") else r["attention"]
    lines.append(f"| {r['config']} {r['image_size']}px | {label}: remat {r['remat']}, attention "
                 f"{attn}{', scanned' if r['scan_layers'] else ''} | {x['memory']} | "
                 f"{x['flops']} | {x['coll']} | {x.get('roof', '')} | {x.get('mfu', '')} | "
                 f"{x['compile']} |")
  lines += ["", "### Guided sampling step (one model call on 2B latents, B = eval.batch_size; "
            "parameters replicated)", "",
            "| config | topology | memory/chip GiB | roofline ms/step | 50K samples, 250 steps, "
            "at roofline | compile s |", "|---|---|---|---|---|---|"]
  for c in ("xl2", "xl2_512"):
    for t in TABLE_TOPOLOGIES:
      # The sampling step replicates the EMA whatever the train state's layout: any row of
      # the config on the slice that compiled it will do.
      found = [r for r in (get(c, t), get(c, t, REPLICATED)) if r and "error" not in r and
               r["steps"].get("guided sampling step")]
      if not found:
        continue
      r = found[0]
      sm = r["steps"]["guided sampling step"]
      batch = int(re.search(r"batch (\d+)", sm["name"]).group(1))
      spec = hardware.CHIPS.get(r["device_kind"])
      per_call = _step_roofline(spec, sm) if spec else None
      total = per_call * 250 * -(-50_000 // batch) if per_call else None
      lines.append(f"| {r['config']} {r['image_size']}px | {t} | {sm['memory']['total']:.1f} | "
                   f"{per_call * 1e3:.1f} | {total / 60:.0f} min | {sm['compile_seconds']:.0f} |"
                   if per_call else f"| {c} | {t} | {sm['memory']['total']:.1f} | | | |")
  return "\n".join(lines)


def _step_seconds(row: dict) -> float | None:
  """A row's train step time: XLA's estimate where valid, else the roofline."""
  tr = row["steps"]["train step"]
  if tr.get("xla_seconds"):
    return tr["xla_seconds"]
  spec = hardware.CHIPS.get(row["device_kind"])
  return _step_roofline(spec, tr) if spec and not row["scan_layers"] else None


GRID_STEPS = 400_000
XL2_HEADLINE_STEPS = 7_000_000


def render_grid_cost(rows: dict[str, dict]) -> str:
  """docs/grid.md's cost of the paper's grid: chip-hours of 400K steps of each model (XL/2 also
  to 7M) on the slice of the table where it costs least, from the planner's rows."""
  lines = ["| model | slice (state layout) | step ms (XLA's estimate) | chip-hours, 400K steps | "
           "days on that slice |", "|---|---|---|---|---|"]
  total = 0.0
  for c in TABLE_CONFIGS[:-1]:
    best = None
    for t in TABLE_TOPOLOGIES:
      # Not the splash rows: XLA's estimate leaves the Pallas kernel's own cost out.
      for o, label in [v for v in VARIANTS if v[0] != SPLASH]:
        r = rows.get(row_key(c, t, overrides(c, o)))
        if not r or "error" in r or not _fits(r) or not _step_seconds(r):
          continue
        cost = _step_seconds(r) * r["chips"]
        if best is None or cost < best[0]:
          best = (cost, t, label, r)
      # (ties go to the default layout's row: it comes first)
    if best is None:
      lines.append(f"| {c} | not compiled yet | | | |")
      continue
    cost, t, label, r = best
    hours = cost * GRID_STEPS / 3600
    total += hours
    lines.append(f"| {r['config']} | {t} ({label}) | {_step_seconds(r) * 1e3:.1f} | "
                 f"{hours:,.0f} | {hours / r['chips'] / 24:.1f} |")
    if c == "xl2":
      more = cost * (XL2_HEADLINE_STEPS - GRID_STEPS) / 3600
      total += more
      lines.append(f"| DiT-XL/2, 400K -> 7M steps (the headline run) | {t} ({label}) | "
                   f"{_step_seconds(r) * 1e3:.1f} | {more:,.0f} | {more / r['chips'] / 24:.1f} |")
  lines.append(f"| all 12 to 400K, XL/2 to 7M | | | {total:,.0f} | |")
  return "\n".join(lines)


BEGIN, END = "<!-- aot-table:begin -->", "<!-- aot-table:end -->"
GRID_BEGIN, GRID_END = "<!-- grid-cost:begin -->", "<!-- grid-cost:end -->"


def write_table(md_path: str, rows: dict[str, dict], body: str | None = None,
                markers: tuple[str, str] = (BEGIN, END)) -> None:
  """Replaces the generated part of `md_path` (between the markers), keeping the rest."""
  begin, end = markers
  body = render_table(rows) if body is None else body
  text = open(md_path).read() if os.path.exists(md_path) else f"# Performance\n\n{begin}\n{end}\n"
  if begin not in text or end not in text:
    text = text.rstrip() + f"\n\n{begin}\n{end}\n"
  head, rest = text.split(begin, 1)
  _, tail = rest.split(end, 1)
  with open(md_path, "w") as f:
    f.write(head + begin + "\n" + body + "\n" + end + tail)

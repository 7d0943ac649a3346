"""The planner checked on the devices present: `dit-aot --config=C --measure`.

For each layout the planner can choose on this platform (the config's own, then one field
changed at a time: the attention kernel, the remat policy, the collectives, gradient
accumulation), compiles the main job's train step and the guided sampling step as `dit-aot`
does, runs each on synthetic inputs (warm-up, then `steps` timed runs, the median), and prints a
table: measured time, XLA's estimate, their ratio, and which layout is fastest. On a CPU it runs
on any small config (it is tested on the digits demo); on a new slice, run it first and send
the table back (docs/pods.md).
"""

from __future__ import annotations

import copy
import dataclasses
import statistics
import time
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from dit_jax import step


@dataclasses.dataclass
class Row:
  layout: str
  train_ms: float | None = None
  train_xla_ms: float | None = None
  sample_ms: float | None = None
  sample_xla_ms: float | None = None
  error: str = ""


def layouts(config: ml_collections.ConfigDict, platform: str) -> list[tuple[str, dict]]:
  """(label, config overrides): the config's layout, then one planner choice changed at a time."""
  out = [("config", {})]
  attention = ["xla", "xla_tokens"] + {"tpu": ["splash"], "gpu": ["cudnn"]}.get(platform, [])
  out += [(f"attention_impl={a}", {"model.attention_impl": a}) for a in attention
          if a != config.model.attention_impl]
  out += [(f"remat={r}", {"model.remat": r}) for r in
          ("none", "dots_with_no_batch_dims_saveable", "full") if r != config.model.remat]
  other = "xla" if config.sharding.get("collectives", "explicit") == "explicit" else "explicit"
  out.append((f"collectives={other}", {"sharding.collectives": other}))
  # microbatches 0 (auto) is 1 wherever the step fits: try 2 beside it.
  if int(config.optim.get("microbatches", 0)) in (0, 1):
    out.append(("microbatches=2", {"optim.microbatches": 2}))
  return out


def _timed(fn, steps: int) -> float:
  jax.block_until_ready(fn())  # warm-up (first run)
  times = []
  for _ in range(steps):
    t0 = time.perf_counter()
    jax.block_until_ready(fn())
    times.append(time.perf_counter() - t0)
  return statistics.median(times)


def _random_like(tree: Any, seed: int) -> Any:
  """Arrays shaped and placed like ShapeDtypeStructs: normal floats, small ints."""
  leaves, treedef = jax.tree.flatten(tree)
  out = []
  for i, x in enumerate(leaves):
    rng = np.random.default_rng(seed + i)
    if jnp.issubdtype(x.dtype, jnp.floating):
      v = rng.normal(size=x.shape).astype(np.float32)
    else:
      v = rng.integers(0, 2, size=x.shape)
    out.append(jax.device_put(np.asarray(v, x.dtype), x.sharding))
  return jax.tree.unflatten(treedef, out)


def measure(config: ml_collections.ConfigDict, devices: list[Any], plan: Any, steps: int = 5,
            sampling: bool = True, only: tuple[str, ...] = ()) -> list[Row]:
  """One Row per layout (`layouts`; those labelled in `only` when given); a layout that fails
  to compile or run keeps its error. plan: `dit_jax.aot.plan` (passed in: aot imports this
  module for its --measure flag)."""
  from dit_jax import data_info  # pylint: disable=import-outside-toplevel
  from dit_jax.grid import presets  # pylint: disable=import-outside-toplevel
  platform = devices[0].platform
  rows = []
  for label, overrides in layouts(config, platform):
    if only and label not in only:
      continue
    row = Row(label)
    rows.append(row)
    c = presets.apply_overrides(copy.deepcopy(config), overrides)
    try:
      setup, reports = plan(c, devices, sampling_step=sampling)
      info = data_info.synthetic_info(c)
      state = setup.init(jax.random.PRNGKey(0))
      spec = step.batch_spec(info, c.data.global_batch_size)
      batch = _random_like({k: jax.ShapeDtypeStruct(s, d, sharding=setup.batch_sh)
                            for k, (s, d) in spec.items()}, 1)
      if "std" in batch:
        batch["std"] = jnp.zeros_like(batch["std"])
      if setup.align is not None:  # REPA: random encoder weights (the time does not depend)
        setup.load_frozen(jax.tree.map(lambda x: np.zeros(x.shape, np.float32),
                                       nn.meta.unbox(setup.align.abstract_params())))
      holder = {"state": state}

      def train():
        holder["state"], m = setup.step(holder["state"], batch)
        return m["loss"]
      row.train_ms = 1e3 * _timed(train, steps)
      row.train_xla_ms = 1e3 * reports[0].xla_seconds if reports[0].xla_seconds else None
      if sampling:
        rep = reports[1]
        args = _random_like(rep.arguments, 2)
        row.sample_ms = 1e3 * _timed(lambda: rep.compiled(*args), steps)
        row.sample_xla_ms = 1e3 * rep.xla_seconds if rep.xla_seconds else None
    except Exception as e:  # pylint: disable=broad-except  (a layout this platform lacks)
      row.error = f"{type(e).__name__}: {str(e).splitlines()[0][:160]}"
  return rows


def format_table(rows: list[Row], devices: list[Any]) -> str:
  f = lambda v: "" if v is None else f"{v:.2f}"
  ratio = lambda m, x: "" if m is None or x is None else f"{m / x:.2f}"
  lines = [f"Measured on {len(devices)} x {devices[0].device_kind} (median of timed runs):", "",
           "| layout | train step ms | XLA's estimate ms | measured / estimate | sampling step ms "
           "| XLA's estimate ms | measured / estimate |", "|---|---|---|---|---|---|---|"]
  for r in rows:
    if r.error:
      lines.append(f"| {r.layout} | failed: {r.error} | | | | | |")
      continue
    lines.append(f"| {r.layout} | {f(r.train_ms)} | {f(r.train_xla_ms)} | "
                 f"{ratio(r.train_ms, r.train_xla_ms)} | {f(r.sample_ms)} | "
                 f"{f(r.sample_xla_ms)} | {ratio(r.sample_ms, r.sample_xla_ms)} |")
  ok = [r for r in rows if not r.error and r.train_ms is not None]
  if ok:
    best = min(ok, key=lambda r: r.train_ms)
    lines += ["", f"fastest train step: {best.layout} ({best.train_ms:.2f} ms)"]
    if any(r.train_xla_ms for r in ok):
      by_xla = min((r for r in ok if r.train_xla_ms), key=lambda r: r.train_xla_ms)
      lines.append(f"XLA's estimate would pick: {by_xla.layout}")
    else:
      lines.append("XLA's estimate: not given on this platform (TPU compiles give it)")
  return "\n".join(lines)

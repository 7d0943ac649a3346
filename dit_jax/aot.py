"""Ahead-of-time planner: what a config's train step and guided sampling step cost per chip on a
TPU topology (or the local devices), compiled on this machine; no TPU needed for TPU targets.

  python -m dit_jax.aot --config=configs/xl2.py --topology=v5p-64
  python -m dit_jax.aot --config=configs/xl2.py --topology=v5e-256 --config.mesh.fsdp=4
  python -m dit_jax.aot --config=configs/s2.py --topology=v5p-8 --slices=2
  python -m dit_jax.aot --config=configs/demo.py --topology=local
  python -m dit_jax.aot --table     # docs/performance.md (rows cached in docs/performance.json)
                                    # and docs/grid.md's grid cost: dit_jax.planner_table

Topologies are Cloud TPU slice names (v4-N and v5p-N count TensorCores, two per chip; v5e-N and
v6e-N count chips), a libtpu name ('v5p:2x2x1'), or 'local'. TPU targets need libtpu
(`pip install "jax[tpu]"` at the installed jax version). The train step is the main job's own
(`step.build`, with the config's layout: by default the one its memory allows); the sampling
step is one classifier-free-guided model call on [2B] latents (B = config.eval.batch_size),
parameters replicated, as dit_jax.sample and the in-job evaluation run it: a 250-step sampler
costs 250 of them.

Printed per chip: memory (arguments, outputs, temporaries) against the chip's HBM; FLOPs
against the analytic count (train: 3 x forward matmul FLOPs; so recomputation and waste show);
bytes moved by each kind of collective, read from the optimized HLO; compile time; and a
roofline time: max(FLOPs / peak, HBM bytes / bandwidth) + collective bytes / ICI bandwidth (no
overlap assumed, an upper bound of the ideal), beside XLA's own estimate where it is valid.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import json
import os
import re
import time
from typing import Any

from absl import app
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from dit_jax import (data_info, flops as flops_lib, guidance, hardware, objectives, sharding,
                     step)

# Chips of the standard Cloud TPU slices (3-D tori for v4/v5p, 2-D for v5e/v6e).
_3D = {4: "2x2x1", 8: "2x2x2", 16: "2x2x4", 32: "2x4x4", 64: "4x4x4", 128: "4x4x8",
       256: "4x8x8", 512: "8x8x8", 1024: "8x8x16", 2048: "8x16x16", 4096: "16x16x16"}
_2D = {1: "1x1", 4: "2x2", 8: "2x4", 16: "4x4", 32: "4x8", 64: "8x8", 128: "8x16",
       256: "16x16"}
_COLLECTIVES = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all", "collective-permute")
_DTYPE_BYTES = {"pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "f16": 2, "bf16": 2, "s32": 4,
                "u32": 4, "f32": 4, "s64": 8, "u64": 8, "f64": 8, "c64": 8, "c128": 16}


def libtpu_topology(name: str) -> str:
  """'v5p-64' -> 'v5p:4x4x4' (32 chips); libtpu names pass through."""
  if ":" in name:
    return name
  m = re.fullmatch(r"(v4|v5p|v5e|v6e)-(\d+)", name)
  if not m:
    raise ValueError(f"--topology={name!r}: expected e.g. v5p-64, v5e-256, v6e-64, v4-32, a libtpu "
                     "name such as v5p:2x2x1, or 'local'")
  kind, n = m.group(1), int(m.group(2))
  chips, shapes = (n // 2, _3D) if kind in ("v4", "v5p") else (n, _2D)
  if chips not in shapes:
    raise ValueError(f"--topology={name}: no standard {kind} slice of {chips} chips "
                     f"(known: {sorted(shapes)})")
  return f"{kind}:{shapes[chips]}"


def topology_devices(name: str, slices: int = 1) -> list[Any]:
  if name == "local":
    return jax.devices()
  os.environ.setdefault("TPU_ACCELERATOR_TYPE", "v5p-8")  # quiets libtpu's start-up checks
  os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
  from jax.experimental import topologies  # pylint: disable=import-outside-toplevel
  return list(topologies.get_topology_desc(platform="tpu", topology_name=libtpu_topology(name),
                                           num_slices=slices).devices)


def collectives(hlo_text: str) -> list[tuple[str, str, int]]:
  """(kind, dtype, bytes of the result) of each collective in an (optimized) HLO module's text.

  Asynchronous pairs are counted once, at their '-done' (whose result is the collective's
  output); collectives inside loop bodies are counted once per appearance, not per iteration.
  TPU compiles express a reduce-scatter as an all-reduce fused with the slice each device
  keeps (a fusion computation named all-reduce-scatter): counted as a reduce-scatter, with
  the all-reduce's result size (the bytes that enter it).
  """
  out = []
  pattern = re.compile(r"=\s*(.*?)\s+(" + "|".join(_COLLECTIVES) + r")(-start|-done)?\(")
  computation = ""
  for line in hlo_text.splitlines():
    head = re.match(r"\s*(?:ENTRY\s+)?%?([\w.-]+)\s.*\{\s*$", line)
    if head and "=" not in line.split("{")[0]:
      computation = head.group(1)
    m = pattern.search(line)
    if m and m.group(3) != "-start":
      kind = m.group(2)
      if kind == "all-reduce" and computation.startswith("all-reduce-scatter"):
        kind = "reduce-scatter"
      for dtype, dims in re.findall(r"\b([a-z]+\d*)\[([\d,]*)\]", m.group(1)):
        if dtype in _DTYPE_BYTES:
          out.append((kind, dtype,
                      _DTYPE_BYTES[dtype] * int(np.prod([int(d) for d in dims.split(",") if d]))))
  return out


def collective_bytes(hlo_text: str) -> dict[str, int]:
  """Bytes of the results of each kind of collective (see `collectives`)."""
  out: dict[str, int] = collections.defaultdict(int)
  for kind, _, n in collectives(hlo_text):
    out[kind] += n
  return dict(out)


def _source(op_name: str) -> str:
  """A JAX op_name as a short source label: 'fwd attn/qkv/dot_general' (blocks merged)."""
  s = re.sub(r"^jit\([^)]*\)/", "", op_name).replace("shard_map/", "")
  s = re.sub(r"blocks_\d+", "blocks", s)
  way = "bwd" if "transpose(" in s else "fwd" if "jvp(" in s else ""
  s = re.sub(r"(transpose|jvp)\(([^)]*)\)", r"\2", s)
  return f"{way} {'/'.join(s.split('/')[-3:])}".strip()


def cycles_by_source(hlo_text: str) -> list[tuple[str, float, int]]:
  """Where a TPU program's time goes, by XLA's own cost model: the `estimated_cycles` of each
  instruction of the entry computation, summed by the JAX source of the instruction
  (`_source` of its op_name) -> [(source, share of all the cycles, instructions)], largest
  first. Empty for programs without the estimates (CPU, GPU)."""
  totals = _cycles_by_key(hlo_text)
  whole = sum(c for c, _ in totals.values()) or 1
  return sorted(((k, c / whole, n) for k, (c, n) in totals.items()), key=lambda r: -r[1])


def _cycles_by_key(hlo_text: str) -> dict[str, list[int]]:
  """{source: [estimated cycles, instructions]} over the entry computation (cycles_by_source)."""
  inst = re.compile(r'^\s*(?:ROOT )?%\S+ = .*"estimated_cycles":"(\d+)"')
  totals: dict[str, list[int]] = collections.defaultdict(lambda: [0, 0])
  entry = False
  for line in hlo_text.splitlines():
    if line.startswith("ENTRY"):
      entry = True
    elif entry and line.startswith("}"):
      break
    elif entry and (m := inst.match(line)):
      name = re.search(r'op_name="([^"]*)"', line)
      opcode = re.search(r"\s([\w-]+)\(", line.split("= ", 1)[1])
      key = _source(name.group(1)) if name else opcode.group(1) if opcode else "?"
      totals[key][0] += int(m.group(1))
      totals[key][1] += 1
  return totals


@dataclasses.dataclass
class StepReport:
  name: str
  memory: dict[str, float]          # GiB per chip: arguments, outputs, temporaries, total
  flops: float                      # per chip, XLA's count
  analytic_flops: float | None      # per chip
  bytes_accessed: float             # per chip, XLA's count
  collectives: dict[str, int]       # bytes per chip per step
  compile_seconds: float
  roofline_seconds: float | None
  xla_seconds: float | None
  # The compiled program and abstract arguments (for `dit_jax.measure`; not in report_dict).
  compiled: Any = dataclasses.field(default=None, repr=False, compare=False)
  arguments: Any = dataclasses.field(default=None, repr=False, compare=False)


def _report(name: str, compiled: Any, compile_s: float, analytic: float | None,
            device: Any, flops: float | None = None) -> StepReport:
  """`flops` overrides XLA's count (which counts a scanned loop's body once)."""
  cost = flops_lib.xla_cost(compiled)
  mem = compiled.memory_analysis()
  gib = lambda b: b / 2**30
  memory = {"arguments": gib(mem.argument_size_in_bytes), "outputs": gib(mem.output_size_in_bytes),
            "temporaries": gib(mem.temp_size_in_bytes),
            "total": gib(mem.argument_size_in_bytes + mem.output_size_in_bytes +
                         mem.temp_size_in_bytes - mem.alias_size_in_bytes)}
  accessed = float(cost.get("bytes accessed", 0.0))
  flops = float(cost.get("flops", 0.0)) if flops is None else flops
  coll = collective_bytes(compiled.as_text())
  spec = hardware.chip(device)
  roofline = None
  if spec:
    roofline = hardware.roofline_seconds(spec, max(flops, analytic or 0.0), accessed,
                                         sum(coll.values()))
  xla = cost.get("optimal_seconds")
  xla = float(xla) if xla is not None and float(xla) > 0 else None  # negative = invalid
  return StepReport(name, memory, flops, analytic, accessed, coll, compile_s, roofline, xla)


def plan(config: ml_collections.ConfigDict, devices: list[Any], sampling_step: bool = True,
         sampler_loop: bool = False) -> tuple[step.TrainSetup, list[StepReport]]:
  """Compiles the train step (and the guided sampling step; and the whole guided sampler of
  config.eval) of `config` for `devices`."""
  setup = step.build(config, data_info.synthetic_info(config), devices=devices)
  chips = len(devices)
  fwd_macs = step.forward_flops(setup.model) / 2
  reports = [_report("train step", setup.compiled, setup.compile_seconds, setup.model_flops,
                     devices[0], flops=setup.flops)]
  if sampling_step:
    reports.append(_sampling_report(setup, config.eval.batch_size, config.sample.release_cfg,
                                    config.sample.matmul_precision, fwd_macs, chips, devices[0]))
  if sampler_loop:
    reports.append(_sampler_loop_report(setup, config.eval, config.sample.release_cfg,
                                        config.sample.matmul_precision, devices[0]))
  return setup, reports


def _sampling_report(setup: step.TrainSetup, batch_size: int, release_cfg: bool,
                     precision: str, fwd_macs: float, chips: int, device: Any) -> StepReport:
  """One guided model call on the doubled batch of `batch_size` images at matmul `precision`
  (the release's 3 guided channels with release_cfg)."""
  model, n = setup.model, 2 * batch_size
  if n % setup.mesh.size:
    n = setup.mesh.size * max(1, n // setup.mesh.size)
  repl = jax.tree.map(lambda _: setup.repl, setup.abstract.ema_params)
  params = jax.tree.map(lambda x, sh: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sh),
                        setup.abstract.ema_params, repl)
  h = model.input_size
  x = jax.ShapeDtypeStruct((n, h, h, model.in_channels), jnp.float32, sharding=setup.batch_sh)
  ints = jax.ShapeDtypeStruct((n,), jnp.int32, sharding=setup.batch_sh)
  t = jax.ShapeDtypeStruct((n,), setup.objective.time_dtype, sharding=setup.batch_sh)
  scale = jax.ShapeDtypeStruct((), jnp.float32, sharding=setup.repl)
  if release_cfg is None:  # the release's rule for ADM, every channel otherwise
    release_cfg = setup.objective.name == "adm"
  channels = guidance.RELEASE_GUIDED_CHANNELS if release_cfg else None

  def guided(p, x, t, y, s):
    if setup.objective.trained_guidance:  # no CFG pass: n images, h = t
      return model.apply({"params": p}, x, t, y, h=t)
    # y [n]: the first half holds the labels; the closure appends the null half itself.
    apply = lambda x, t, y: model.apply({"params": p}, x, t, y)
    return guidance.cfg_model_fn(apply, y[:n // 2], model.num_classes, s, channels)(x, t)
  step = jax.jit(guided, out_shardings=setup.batch_sh)
  t0 = time.time()
  # Under the mesh: splash attention shard_maps itself over it.
  with jax.default_matmul_precision(precision), jax.set_mesh(setup.mesh):
    compiled = step.lower(params, x, t, ints, scale).compile()
    compile_s = time.time() - t0
    flops = float(flops_lib.xla_cost(compiled).get("flops", 0.0))
    if model.scan_layers:  # XLA counts the scanned blocks' body once (see step._compile)
      macs = flops_lib.uncounted_loop_macs(step, params, x, t, ints, scale)
      flops += 2 * macs / setup.mesh.size
  report = _report(f"guided sampling step (batch {n // 2} x 2)", compiled, compile_s,
                   2 * fwd_macs * n / chips, device, flops=flops)
  report.compiled, report.arguments = compiled, (params, x, t, ints, scale)
  return report


def _sampler_loop_report(setup: step.TrainSetup, e: Any, release_cfg: bool, precision: str,
                         device: Any) -> StepReport:
  """The whole guided sampler of config.eval (`e`; e.g. DDPM, 250 steps) as dit_jax.sample
  runs it: one program whose loop body is the guided model call (the objective's sampler).
  Reported for its compile time and memory; its FLOPs are steps x the sampling step's."""
  n = max(setup.mesh.size, e.batch_size // setup.mesh.size * setup.mesh.size)
  fn = guidance.make_sample_fn(
      setup.objective, setup.model, **objectives.sampler_kwargs(e),
      release_cfg=release_cfg,
      in_shardings=(setup.repl, setup.repl, setup.batch_sh, setup.repl),
      out_shardings=setup.batch_sh)
  params = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=setup.repl),
                        setup.abstract.ema_params)
  key = jax.ShapeDtypeStruct((2,), jnp.uint32, sharding=setup.repl)
  labels = jax.ShapeDtypeStruct((n,), jnp.int32, sharding=setup.batch_sh)
  scale = jax.ShapeDtypeStruct((), jnp.float32, sharding=setup.repl)
  t0 = time.time()
  with contextlib.ExitStack() as context:
    context.enter_context(jax.default_matmul_precision(precision))
    # The mesh only for splash attention (it shard_maps itself): diffrax (the flow samplers)
    # runs small eager ops while tracing, which fail under a mesh of unattached devices.
    if "splash" in str(setup.model.attention_impl):
      context.enter_context(jax.set_mesh(setup.mesh))
    compiled = fn.lower(params, key, labels, scale).compile()
  sampler = e.sampler or setup.objective.default_sampler
  steps = e.steps or setup.objective.default_steps[sampler]
  return _report(f"whole sampler ({sampler}, {steps} steps, batch {n})", compiled,
                 time.time() - t0, None, device)


def format_reports(config: ml_collections.ConfigDict, name: str, devices: list[Any],
                   setup: step.TrainSetup, reports: list[StepReport]) -> str:
  hbm = hardware.memory_bytes(devices[0])
  lines = [f"{config.model.name} {config.data.image_size}px, global batch "
           f"{config.data.global_batch_size}, {config.model.dtype}, remat {setup.model.remat}, "
           f"{setup.microbatches} microbatch(es); state layout: parameters {setup.layout.params}, "
           f"Adam moments {setup.layout.opt_state}, EMA {setup.layout.ema}",
           f"{name}: {len(devices)} x {devices[0].device_kind} "
           f"({sharding.num_slices(devices)} slice(s)), mesh {dict(setup.mesh.shape)}"]
  for r in reports:
    m = r.memory
    fit = f" of {hbm / 2**30:.1f} GiB ({m['total'] * 2**30 / hbm:.0%})" if hbm else ""
    lines.append(f"\n{r.name}")
    lines.append(f"  memory/chip   {m['total']:.2f} GiB{fit}: arguments {m['arguments']:.2f}, "
                 f"outputs {m['outputs']:.2f}, temporaries {m['temporaries']:.2f}")
    ratio = f" = {r.flops / r.analytic_flops:.3f} x analytic {r.analytic_flops:.4g}" \
        if r.analytic_flops else ""
    lines.append(f"  FLOPs/chip    {r.flops:.4g}{ratio}")
    coll = ", ".join(f"{k} {v / 2**20:.1f} MiB" for k, v in sorted(r.collectives.items()))
    lines.append(f"  collectives   {coll or 'none'}")
    lines.append(f"  compile       {r.compile_seconds:.1f} s")
    est = (f"{r.roofline_seconds * 1e3:.2f} ms" if r.roofline_seconds else "n/a (unknown chip)")
    xla = f", XLA's estimate {r.xla_seconds * 1e3:.2f} ms" if r.xla_seconds else \
        ", XLA's estimate invalid"
    lines.append(f"  roofline      {est}{xla}")
  if setup.model.scan_layers:
    lines.append("\nscan_layers: FLOPs include every scanned block; XLA's bytes accessed (the "
                 "roofline's memory term) and its time estimate count the loop body once")
  return "\n".join(lines)


def report_dict(config: ml_collections.ConfigDict, topology: str, devices: list[Any],
                setup: step.TrainSetup, reports: list[StepReport]) -> dict:
  """One table row's facts, as JSON."""
  spec = hardware.chip(devices[0])
  return {"config": config.model.name, "image_size": int(config.data.image_size),
          "global_batch": int(config.data.global_batch_size), "dtype": config.model.dtype,
          "remat": str(setup.model.remat), "attention": str(setup.model.attention_impl),
          "scan_layers": bool(setup.model.scan_layers), "topology": topology,
          "chips": len(devices), "device_kind": devices[0].device_kind,
          "hbm_gib": (hardware.memory_bytes(devices[0]) or 0) / 2**30,
          "peak_flops": spec.peak_flops if spec else None,
          "mesh": {k: int(v) for k, v in setup.mesh.shape.items()},
          "layout": {"params": setup.layout.params, "opt_state": setup.layout.opt_state,
                     "ema": setup.layout.ema},
          "microbatches": int(setup.microbatches),
          "overlap": bool(config.mesh.get("overlap_collectives", False)),
          "collectives": "explicit" if setup.explicit else "xla",
          "steps": {r.name.split(" (")[0]: {f.name: getattr(r, f.name)
                                             for f in dataclasses.fields(r)
                                             if f.name not in ("compiled", "arguments")}
                    for r in reports}}


def main(argv: list[str]) -> None:
  del argv
  if FLAGS.table:
    # The table's generator imports this module: imported here, not at the top.
    from dit_jax import planner_table  # pylint: disable=import-outside-toplevel
    rows = planner_table.run_table(FLAGS.table_cache, FLAGS.jobs, FLAGS.row_timeout, FLAGS.only)
    planner_table.write_table(FLAGS.table_out, rows)
    planner_table.write_table(FLAGS.grid_cost_out, rows, planner_table.render_grid_cost(rows),
                              (planner_table.GRID_BEGIN, planner_table.GRID_END))
    print(f"wrote {FLAGS.table_out} and {FLAGS.grid_cost_out}")
    return
  if FLAGS.config is None:
    raise app.UsageError("--config is required (or --table)")
  if FLAGS.measure:  # the devices present, each layout compiled and timed
    from dit_jax import measure  # pylint: disable=import-outside-toplevel
    devices = jax.devices()
    rows = measure.measure(FLAGS.config, devices, plan, FLAGS.measure_steps, FLAGS.sampling)
    print(measure.format_table(rows, devices))
    return
  devices = topology_devices(FLAGS.topology, FLAGS.slices)
  setup, reports = plan(FLAGS.config, devices, sampling_step=FLAGS.sampling,
                    sampler_loop=FLAGS.sampler_loop)
  print(format_reports(FLAGS.config, FLAGS.topology, devices, setup, reports))
  if FLAGS.json:
    with open(FLAGS.json, "w") as f:
      json.dump(report_dict(FLAGS.config, FLAGS.topology, devices, setup, reports), f, indent=1)
  if FLAGS.hlo:
    with open(FLAGS.hlo, "w") as f:
      f.write(setup.compiled.as_text())
  if FLAGS.breakdown:
    text = setup.compiled.as_text()
    # The sum is comparable between two programs for one chip even where XLA's own total
    # (optimal_seconds) is invalid, as on v5e and v6e slices.
    whole = sum(c for c, _ in _cycles_by_key(text).values())
    print(f"train step, XLA's estimated cycles of the entry computation: {whole:,}; share by "
          "source (fwd/bwd, module, op):")
    for source, share, n in cycles_by_source(text)[:FLAGS.breakdown]:
      print(f"  {100 * share:5.1f}%  {n:4d} ops  {source}")


def run() -> None:
  """Console script `dit-aot` (the same as python -m dit_jax.aot): its flags, then main."""
  global FLAGS  # pylint: disable=global-statement  (main reads it)
  from absl import flags  # pylint: disable=g-import-not-at-top
  from ml_collections import config_flags  # pylint: disable=g-import-not-at-top
  FLAGS = flags.FLAGS
  config_flags.DEFINE_config_file("config", None, "Experiment config.", lock_config=False)
  flags.DEFINE_string("topology", "v5p-8", "v5p-64, v5e-256, v6e-64, v4-32, v5p:2x2x1 or local.")
  flags.DEFINE_integer("slices", 1, "Slices (multi-slice over the data-centre network).")
  flags.DEFINE_bool("sampling", True, "Also compile the guided sampling step.")
  flags.DEFINE_string("json", "", "Also write the figures to this JSON file.")
  flags.DEFINE_string("hlo", "", "Also write the train step's optimized HLO text to this file.")
  flags.DEFINE_integer("breakdown", 0, "Also print the N largest sources of the train step's "
                       "time by XLA's TPU cost model (cycles_by_source).")
  flags.DEFINE_bool("sampler_loop", False, "Also compile config.eval's whole guided sampler "
                    "(e.g. 250 DDPM steps): its compile time and memory.")
  flags.DEFINE_bool("table", False, "Compile every row of docs/performance.md and write it "
                    "(dit_jax.planner_table).")
  flags.DEFINE_string("table_out", "docs/performance.md", "--table: the Markdown to update.")
  flags.DEFINE_string("grid_cost_out", "docs/grid.md", "--table: the page whose cost of the "
                      "paper's grid (between its grid-cost markers) is rewritten from the rows.")
  flags.DEFINE_string("table_cache", "docs/performance.json",
                      "--table: rows compiled so far (rerunning compiles only missing rows).")
  flags.DEFINE_integer("jobs", 2, "--table: rows compiled at once (one process each).")
  flags.DEFINE_string("only", "", "--table: compile only rows whose key matches this regex "
                      "(e.g. '^xl2 v5p-64').")
  flags.DEFINE_bool("measure", False, "Time the train and sampling steps of every layout the "
                    "planner can choose on the devices present, beside XLA's estimates "
                    "(dit_jax.measure).")
  flags.DEFINE_integer("measure_steps", 5, "--measure: timed runs per step and layout.")
  flags.DEFINE_float("row_timeout", 1800, "--table: seconds before a row is given up.")
  app.run(main)


if __name__ == "__main__":
  run()

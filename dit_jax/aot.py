"""Ahead-of-time planner: what a config's train step and guided sampling step cost per chip on a
TPU topology (or the local devices), compiled on this machine; no TPU needed for TPU targets.

  python -m dit_jax.aot --config=configs/xl2.py --topology=v5p-64
  python -m dit_jax.aot --config=configs/xl2.py --topology=v5e-256 --config.mesh.fsdp=4
  python -m dit_jax.aot --config=configs/s2.py --topology=v5p-8 --slices=2
  python -m dit_jax.aot --config=configs/demo.py --topology=local
  python -m dit_jax.aot --table     # docs/performance.md (rows cached in docs/performance.json)

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
import concurrent.futures
import contextlib
import dataclasses
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from typing import Any

from absl import app
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from dit_jax import data_info, flops as flops_lib, hardware, models, sharding, step

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


def _roofline(spec: hardware.Chip, flops: float, accessed: float, collective: float) -> float:
  """Seconds: compute or HBM bound, plus the collectives with no overlap. `flops` should be at
  least the analytic count: XLA counts no FLOPs in Pallas kernels (splash attention)."""
  return (max(flops / spec.peak_flops, accessed / spec.hbm_bandwidth) +
          collective / spec.ici_bandwidth)


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
    roofline = _roofline(spec, max(flops, analytic or 0.0), accessed, sum(coll.values()))
  xla = cost.get("optimal_seconds")
  xla = float(xla) if xla is not None and float(xla) > 0 else None  # negative = invalid
  return StepReport(name, memory, flops, analytic, accessed, coll, compile_s, roofline, xla)


def plan(config: ml_collections.ConfigDict, devices: list[Any], sampling_step: bool = True,
         sampler_loop: bool = False) -> tuple[step.Built, list[StepReport]]:
  """Compiles the train step (and the guided sampling step; and the whole guided sampler of
  config.eval) of `config` for `devices`."""
  b = step.build(config, data_info.synthetic_info(config), devices=devices)
  chips = len(devices)
  fwd_macs = step.forward_flops(b.model) / 2
  reports = [_report("train step", b.compiled, b.compile_seconds, b.model_flops, devices[0],
                     flops=b.flops)]
  if sampling_step:
    reports.append(_sampling_report(config, b, fwd_macs, chips, devices[0]))
  if sampler_loop:
    reports.append(_sampler_loop_report(config, b, devices[0]))
  return b, reports


def _sampling_report(config: ml_collections.ConfigDict, b: step.Built, fwd_macs: float,
                     chips: int, device: Any) -> StepReport:
  model, n = b.model, 2 * config.eval.batch_size
  if n % b.mesh.size:
    n = b.mesh.size * max(1, n // b.mesh.size)
  repl = jax.tree.map(lambda _: b.repl, b.abstract.ema_params)
  params = jax.tree.map(lambda x, sh: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sh),
                        b.abstract.ema_params, repl)
  h = model.input_size
  x = jax.ShapeDtypeStruct((n, h, h, model.in_channels), jnp.float32, sharding=b.batch_sh)
  ints = jax.ShapeDtypeStruct((n,), jnp.int32, sharding=b.batch_sh)
  # t as the objective's samplers pass it (ADM: int32 timesteps, flow: float32 times).
  t_dtype = jax.eval_shape(lambda k: b.objective.sample_t(k, n), jax.random.PRNGKey(0)).dtype
  t = jax.ShapeDtypeStruct((n,), t_dtype, sharding=b.batch_sh)
  scale = jax.ShapeDtypeStruct((), jnp.float32, sharding=b.repl)
  step = jax.jit(lambda p, x, t, y, s: model.apply({"params": p}, x, t, y, s,
                                                   method=models.DiT.forward_with_cfg),
                 out_shardings=b.batch_sh)
  t0 = time.time()
  # Under the mesh: splash attention shard_maps itself over it.
  with jax.default_matmul_precision(config.sample.matmul_precision), jax.set_mesh(b.mesh):
    compiled = step.lower(params, x, t, ints, scale).compile()
    compile_s = time.time() - t0
    flops = float(flops_lib.xla_cost(compiled).get("flops", 0.0))
    if model.scan_layers:  # XLA counts the scanned blocks' body once (see step._compile)
      flops += 2 * flops_lib.uncounted_loop_macs(step, params, x, t, ints, scale) / b.mesh.size
  return _report(f"guided sampling step (batch {n // 2} x 2)", compiled, compile_s,
                 2 * fwd_macs * n / chips, device, flops=flops)


def _sampler_loop_report(config: ml_collections.ConfigDict, b: step.Built,
                         device: Any) -> StepReport:
  """The whole guided sampler of config.eval (e.g. DDPM, 250 steps) as dit_jax.sample runs it:
  one program whose loop body is the guided model call (the objective's sampler). Reported
  for its compile time and memory; its FLOPs are steps x the sampling step's."""
  e = config.eval
  n = max(b.mesh.size, e.batch_size // b.mesh.size * b.mesh.size)
  fn = b.objective.make_sample_fn(
      b.model, sampler=e.sampler, steps=e.steps, spacing=e.spacing,
      guidance_interval=tuple(e.guidance_interval), respacing=e.respacing or None,
      in_shardings=(b.repl, b.repl, b.batch_sh, b.repl), out_shardings=b.batch_sh)
  params = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=b.repl),
                        b.abstract.ema_params)
  key = jax.ShapeDtypeStruct((2,), jnp.uint32, sharding=b.repl)
  labels = jax.ShapeDtypeStruct((n,), jnp.int32, sharding=b.batch_sh)
  scale = jax.ShapeDtypeStruct((), jnp.float32, sharding=b.repl)
  t0 = time.time()
  with contextlib.ExitStack() as context:
    context.enter_context(jax.default_matmul_precision(config.sample.matmul_precision))
    # The mesh only for splash attention (it shard_maps itself): diffrax (the flow samplers)
    # runs small eager ops while tracing, which fail under a mesh of unattached devices.
    if "splash" in str(b.model.attention_impl):
      context.enter_context(jax.set_mesh(b.mesh))
    compiled = fn.lower(params, key, labels, scale).compile()
  sampler = e.sampler or b.objective.default_sampler
  steps = e.steps or b.objective.default_steps.get(sampler, 250)
  return _report(f"whole sampler ({sampler}, {steps} steps, batch {n})", compiled,
                 time.time() - t0, None, device)


def format_reports(config: ml_collections.ConfigDict, name: str, devices: list[Any],
                   b: step.Built, reports: list[StepReport]) -> str:
  hbm = hardware.memory_bytes(devices[0])
  lines = [f"{config.model.name} {config.data.image_size}px, global batch "
           f"{config.data.global_batch_size}, {config.model.dtype}, remat {b.model.remat}, "
           f"{b.microbatches} microbatch(es); state layout: parameters {b.layout.params}, "
           f"Adam moments {b.layout.opt_state}, EMA {b.layout.ema}",
           f"{name}: {len(devices)} x {devices[0].device_kind} "
           f"({sharding.num_slices(devices)} slice(s)), mesh {dict(b.mesh.shape)}"]
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
  if b.model.scan_layers:
    lines.append("\nscan_layers: FLOPs include every scanned block; XLA's bytes accessed (the "
                 "roofline's memory term) and its time estimate count the loop body once")
  return "\n".join(lines)


def report_dict(config: ml_collections.ConfigDict, topology: str, devices: list[Any],
                b: step.Built, reports: list[StepReport]) -> dict:
  """One table row's facts, as JSON."""
  spec = hardware.chip(devices[0])
  return {"config": config.model.name, "image_size": int(config.data.image_size),
          "global_batch": int(config.data.global_batch_size), "dtype": config.model.dtype,
          "remat": str(b.model.remat), "attention": str(b.model.attention_impl),
          "scan_layers": bool(b.model.scan_layers), "topology": topology,
          "chips": len(devices), "device_kind": devices[0].device_kind,
          "hbm_gib": (hardware.memory_bytes(devices[0]) or 0) / 2**30,
          "peak_flops": spec.peak_flops if spec else None,
          "mesh": {k: int(v) for k, v in b.mesh.shape.items()},
          "layout": {"params": b.layout.params, "opt_state": b.layout.opt_state,
                     "ema": b.layout.ema},
          "microbatches": int(b.microbatches),
          "overlap": bool(config.mesh.get("overlap_collectives", False)),
          "collectives": "explicit" if b.explicit else "xla",
          "steps": {r.name.split(" (")[0]: dataclasses.asdict(r) for r in reports}}


# --table: the grid's 12 configs and xl2_512 on five slices, then the option studies.
TABLE_CONFIGS = ("s8", "s4", "s2", "b8", "b4", "b2", "l8", "l4", "l2", "xl8", "xl4", "xl2",
                 "xl2_512")
TABLE_TOPOLOGIES = ("v5p-8", "v5p-64", "v5p-256", "v5e-256", "v6e-64")
REMATS = ("none", "full", "dots_saveable", "dots_with_no_batch_dims_saveable")


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


# The layout before weight-update sharding: every part of the state replicated (at fsdp 1),
# no TPU overlap options, XLA's partitioner. Compiled beside each default row.
REPLICATED = ("sharding.params=compute", "sharding.opt_state=compute", "sharding.ema=compute",
              "mesh.overlap_collectives=False", "sharding.collectives=xla")
# The explicit step with the adaLN kernels gathered like every other parameter (before
# config.sharding.modulation='stationary').
GATHERED = ("sharding.modulation=gathered",)
# The update layout with the collectives left to XLA's partitioner (before the explicit step).
XLA_UPDATE = ("sharding.collectives=xla",)
# That with the TPU overlap options on (XL/2 only).
OVERLAP = ("mesh.overlap_collectives=True", "sharding.collectives=xla")
# The default with splash attention at 256 px (XL/2 on the v5p slices; 'auto' picks it from
# 1,024 tokens: attention.SPLASH_MIN_TOKENS).
SPLASH = ("model.attention_impl=splash",)
SPLASH_TOPOLOGIES = ("v5p-8", "v5p-64", "v5p-256")
# The XLA attention path in the token-major layout (the default before the head-major one).
# The layouts above that predate it were compiled with it: `overrides` adds it to their rows,
# except xl2_512's, whose 'auto' attention is splash on TPUs.
TOKENS = ("model.attention_impl=xla_tokens",)
# Rows of the table, in order, with their labels.
VARIANTS = (((), "update"), (TOKENS, "update, token-major attention"),
            (GATHERED, "update, adaLN gathered"),
            (SPLASH, "update, splash attention"),
            (XLA_UPDATE, "update, XLA's collectives"),
            (OVERLAP, "update, XLA's collectives, overlap options"), (REPLICATED, "replicated"))
_BEFORE_HEADS_MAJOR = (GATHERED, XLA_UPDATE, OVERLAP, REPLICATED)


def overrides(config: str, variant: tuple[str, ...]) -> tuple[str, ...]:
  """The --config overrides of `variant`'s row for `config` (the older layouts with the
  attention they were compiled with)."""
  if variant in _BEFORE_HEADS_MAJOR and config != "xl2_512":
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
  # XL/2 first (the figures the issue asks for), then the rest largest first, so that the
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
  """A cached step's roofline, recomputed (rows cached by older code counted no splash FLOPs)."""
  return _roofline(spec, max(st["flops"], st["analytic_flops"] or 0.0), st["bytes_accessed"],
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
      # (the new default's rows win ties: they come first)
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


def main(argv: list[str]) -> None:
  del argv
  if FLAGS.table:
    rows = run_table(FLAGS.table_cache, FLAGS.jobs, FLAGS.row_timeout, FLAGS.only)
    write_table(FLAGS.table_out, rows)
    write_table(FLAGS.grid_cost_out, rows, render_grid_cost(rows), (GRID_BEGIN, GRID_END))
    print(f"wrote {FLAGS.table_out} and {FLAGS.grid_cost_out}")
    return
  if FLAGS.config is None:
    raise app.UsageError("--config is required (or --table)")
  devices = topology_devices(FLAGS.topology, FLAGS.slices)
  b, reports = plan(FLAGS.config, devices, sampling_step=FLAGS.sampling,
                    sampler_loop=FLAGS.sampler_loop)
  print(format_reports(FLAGS.config, FLAGS.topology, devices, b, reports))
  if FLAGS.json:
    with open(FLAGS.json, "w") as f:
      json.dump(report_dict(FLAGS.config, FLAGS.topology, devices, b, reports), f, indent=1)
  if FLAGS.hlo:
    with open(FLAGS.hlo, "w") as f:
      f.write(b.compiled.as_text())
  if FLAGS.breakdown:
    text = b.compiled.as_text()
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
  flags.DEFINE_bool("table", False, "Compile every row of docs/performance.md and write it.")
  flags.DEFINE_string("table_out", "docs/performance.md", "--table: the Markdown to update.")
  flags.DEFINE_string("grid_cost_out", "docs/grid.md", "--table: the page whose cost of the "
                      "paper's grid (between its grid-cost markers) is rewritten from the rows.")
  flags.DEFINE_string("table_cache", "docs/performance.json",
                      "--table: rows compiled so far (rerunning compiles only missing rows).")
  flags.DEFINE_integer("jobs", 2, "--table: rows compiled at once (one process each).")
  flags.DEFINE_string("only", "", "--table: compile only rows whose key matches this regex "
                      "(e.g. '^xl2 v5p-64').")
  flags.DEFINE_float("row_timeout", 1800, "--table: seconds before a row is given up.")
  app.run(main)


if __name__ == "__main__":
  run()

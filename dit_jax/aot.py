"""Ahead-of-time planner: what a config's train step and guided sampling step cost per chip on a
TPU topology (or the local devices), compiled on this machine; no TPU needed for TPU targets.

  python -m dit_jax.aot --config=configs/xl2.py --topology=v5p-64
  python -m dit_jax.aot --config=configs/xl2.py --topology=v5e-256 --config.mesh.fsdp=4
  python -m dit_jax.aot --config=configs/s2.py --topology=v5p-8 --slices=2
  python -m dit_jax.aot --config=configs/demo.py --topology=local

Topologies are Cloud TPU slice names (v4-N and v5p-N count TensorCores, two per chip; v5e-N and
v6e-N count chips), a libtpu name ('v5p:2x2x1'), or 'local'. TPU targets need libtpu
(`pip install "jax[tpu]"` at the installed jax version). The train step is the main job's own
(`train.build`, with the config's layout: by default the one its memory allows); the sampling
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
import dataclasses
import os
import re
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from dit_jax import hardware, input_pipeline, model_table, models, sharding, train

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


def _shape_bytes(text: str) -> int:
  total = 0
  for dtype, dims in re.findall(r"\b([a-z]+\d*)\[([\d,]*)\]", text):
    if dtype in _DTYPE_BYTES:
      total += _DTYPE_BYTES[dtype] * int(np.prod([int(d) for d in dims.split(",") if d]))
  return total


def collective_bytes(hlo_text: str) -> dict[str, int]:
  """Bytes of the results of each kind of collective in an (optimized) HLO module's text.

  Asynchronous pairs are counted once, at their '-done' (whose result is the collective's
  output); collectives inside loop bodies are counted once per appearance, not per iteration.
  """
  out: dict[str, int] = collections.defaultdict(int)
  pattern = re.compile(r"=\s*(.*?)\s+(" + "|".join(_COLLECTIVES) + r")(-start|-done)?\(")
  for line in hlo_text.splitlines():
    m = pattern.search(line)
    if m and m.group(3) != "-start":
      out[m.group(2)] += _shape_bytes(m.group(1))
  return dict(out)


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
            device: Any) -> StepReport:
  cost = compiled.cost_analysis() or {}
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  mem = compiled.memory_analysis()
  gib = lambda b: b / 2**30
  memory = {"arguments": gib(mem.argument_size_in_bytes), "outputs": gib(mem.output_size_in_bytes),
            "temporaries": gib(mem.temp_size_in_bytes),
            "total": gib(mem.argument_size_in_bytes + mem.output_size_in_bytes +
                         mem.temp_size_in_bytes - mem.alias_size_in_bytes)}
  flops, accessed = float(cost.get("flops", 0.0)), float(cost.get("bytes accessed", 0.0))
  coll = collective_bytes(compiled.as_text())
  spec = hardware.chip(device)
  roofline = None
  if spec:
    roofline = (max(flops / spec.peak_flops, accessed / spec.hbm_bandwidth) +
                sum(coll.values()) / spec.ici_bandwidth)
  xla = cost.get("optimal_seconds")
  xla = float(xla) if xla is not None and float(xla) > 0 else None  # negative = invalid
  return StepReport(name, memory, flops, analytic, accessed, coll, compile_s, roofline, xla)


def plan(config: ml_collections.ConfigDict, devices: list[Any],
         sampling_step: bool = True) -> tuple[train.Built, list[StepReport]]:
  """Compiles the train step (and the guided sampling step) of `config` for `devices`."""
  s = config.data.image_size // 8
  info = input_pipeline.DataInfo((s, s, 4), 1000, 0.18215, 0, 0, (), {"dtype": "float16"})
  b = train.build(config, info, devices=devices)
  chips, gbs = len(devices), config.data.global_batch_size
  fwd_macs = model_table.matmul_gmacs(b.model.clone(dtype=jnp.float32, remat=False)) * 1e9
  reports = [_report("train step", b.compiled, b.compile_seconds,
                     3 * 2 * fwd_macs * gbs / chips, devices[0])]
  if sampling_step:
    reports.append(_sampling_report(config, b, fwd_macs, chips, devices[0]))
  return b, reports


def _sampling_report(config: ml_collections.ConfigDict, b: train.Built, fwd_macs: float,
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
  scale = jax.ShapeDtypeStruct((), jnp.float32, sharding=b.repl)
  step = jax.jit(lambda p, x, t, y, s: model.apply({"params": p}, x, t, y, s,
                                                   method=models.DiT.forward_with_cfg),
                 out_shardings=b.batch_sh)
  t0 = time.time()
  with jax.default_matmul_precision(config.sample.matmul_precision):
    compiled = step.lower(params, x, ints, ints, scale).compile()
  return _report(f"guided sampling step (batch {n // 2} x 2)", compiled, time.time() - t0,
                 2 * fwd_macs * n / chips, device)


def format_reports(config: ml_collections.ConfigDict, name: str, devices: list[Any],
                   b: train.Built, reports: list[StepReport]) -> str:
  hbm = hardware.memory_bytes(devices[0])
  lines = [f"{config.model.name} {config.data.image_size}px, global batch "
           f"{config.data.global_batch_size}, {config.model.dtype}, remat {config.model.remat}",
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
  return "\n".join(lines)


def main(argv: list[str]) -> None:
  del argv
  devices = topology_devices(FLAGS.topology, FLAGS.slices)
  b, reports = plan(FLAGS.config, devices)
  print(format_reports(FLAGS.config, FLAGS.topology, devices, b, reports))


if __name__ == "__main__":
  from absl import app, flags  # pylint: disable=g-import-not-at-top
  from ml_collections import config_flags  # pylint: disable=g-import-not-at-top
  FLAGS = flags.FLAGS
  config_flags.DEFINE_config_file("config", None, "Experiment config.", lock_config=False)
  flags.DEFINE_string("topology", "v5p-8", "v5p-64, v5e-256, v6e-64, v4-32, v5p:2x2x1 or local.")
  flags.DEFINE_integer("slices", 1, "Slices (multi-slice over the data-centre network).")
  flags.mark_flags_as_required(["config"])
  app.run(main)

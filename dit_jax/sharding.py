"""Device mesh and sharding rules: the one place where layout is decided.

Mesh axes, outermost first:
  'slice'       the slices of a multi-slice TPU job (the data-centre network, DCN); 1 otherwise;
  'data', 'data_minor'  data parallelism within a slice (one data axis factored in two, so that
                a tensor none of whose dimensions divides by the whole data-parallel group can
                still be split over it: e.g. XL's [1152, 3456] qkv kernel on 256 chips is split
                16 x 16);
  'fsdp'        data parallel over the batch AND parameter sharding within a slice.
The batch is split over all four. `config.mesh.data` x `config.mesh.fsdp` lay out one slice
(ICI); several slices multiply the mesh by 'slice'.

Each part of the train state has its own layout (`Layout`, from `config.sharding`):
  * the parameters as the forward and backward use them ("compute" layout): `rules` map the
    model's logical axis names (dit_jax.models.LOGICAL_AXES) to mesh axes, by default the hidden
    width 'embed' to 'fsdp'. Where that dimension does not divide the largest dimension that does
    is sharded instead, and a tensor with none (biases, tiny layers) is replicated. With fsdp = 1
    the compute layout is replicated (plain data parallelism);
  * the stored float32 parameters, the Adam moments and the EMA each either in the compute
    layout, or in the "update" layout: the compute layout further split over the data-parallel
    axes of a slice, so that each device stores and updates 1/N of them (weight-update sharding,
    Xu et al. 2020, "Automatic Cross-Replica Sharding of Weight Update in Data-Parallel
    Training"). The step then reduce-scatters gradients into the update layout and all-gathers
    the updated parameters, in the dtype the forward uses them, into the compute layout. The
    'slice' axis never shards the state: only the gradient reduction crosses the DCN.
fsdp = 0 ("auto") is resolved by `step.build` from the compiled step's memory (`fsdp_candidates`).
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any, Sequence

import flax.linen as nn
import jax
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

MESH_AXES = ("slice", "data", "data_minor", "fsdp")
BATCH_AXES = MESH_AXES
# The data-parallel axes of one slice: the update layout splits the state over these.
UPDATE_AXES = ("data", "data_minor", "fsdp")
# Logical axis (see dit_jax.models.LOGICAL_AXES) -> mesh axis; unlisted: replicated.
DEFAULT_RULES = (("embed", "fsdp"),)
# Logical axes never sharded, not even by the fallbacks: the [depth] axis of scanned blocks
# (each scan iteration reads one layer; sharding it would gather the whole stack).
UNSHARDED = ("layers",)
LAYOUTS = ("compute", "update")
STATE_PARTS = ("params", "opt_state", "ema")
# How the data-parallel step moves parameters and gradients (`config.sharding.collectives`):
#   'explicit'  the forward and backward run per device in a shard_map, with the collectives
#               written out: an all-gather of each parameter (in its compute dtype) from the
#               stored layout, a reduce-scatter of each gradient back into it (`gather_local`,
#               `reduce_local`). Only for data-parallel compute layouts (fsdp 1); an FSDP layout
#               uses 'xla' whatever the setting.
#   'xla'       sharding constraints only: XLA's partitioner picks the collectives (on large TPU
#               slices it reduces gradients with all-reduces: docs/performance.md).
COLLECTIVES = ("explicit", "xla")
# Where the explicit step computes the adaLN modulations (`config.sharding.modulation`):
#   'stationary'  where their parameters are stored: each device multiplies its group's
#                 conditioning vectors by its own columns of each adaLN kernel
#                 (`stationary_matmul`); the kernels (a third of XL's parameters, float32 in
#                 the forward) are neither gathered nor their gradients reduce-scattered;
#   'gathered'    gathered whole on every device, as every other parameter.
MODULATIONS = ("stationary", "gathered")


@dataclasses.dataclass(frozen=True)
class Layout:
  """How each part of the train state is sharded (`config.sharding`)."""
  rules: tuple[tuple[str, str], ...] = DEFAULT_RULES
  params: str = "update"     # the float32 master parameters
  opt_state: str = "update"  # the Adam moments
  ema: str = "update"
  collectives: str = "explicit"  # see COLLECTIVES
  modulation: str = "stationary"  # see MODULATIONS

  @classmethod
  def from_config(cls, config: Any) -> "Layout":
    s = config.get("sharding")
    if s is None:
      return cls()
    rules = tuple((str(a), str(b)) for a, b in s.get("rules", DEFAULT_RULES))
    out = cls(rules, *(str(s.get(p, "update")) for p in STATE_PARTS),
              str(s.get("collectives", "explicit")), str(s.get("modulation", "stationary")))
    out.validate()
    return out

  def validate(self) -> None:
    for part in STATE_PARTS:
      if getattr(self, part) not in LAYOUTS:
        raise ValueError(f"config.sharding.{part}={getattr(self, part)!r}: choose 'update' "
                         "(sharded over the data-parallel devices of a slice) or 'compute' "
                         "(laid out as the forward uses the parameters)")
    if self.collectives not in COLLECTIVES:
      raise ValueError(f"config.sharding.collectives={self.collectives!r}: choose 'explicit' "
                       "(all-gather and reduce-scatter written out in a shard_map) or 'xla' "
                       "(XLA's partitioner picks them)")
    if self.modulation not in MODULATIONS:
      raise ValueError(f"config.sharding.modulation={self.modulation!r}: choose 'stationary' "
                       "(the adaLN modulations computed where their parameters are stored) or "
                       "'gathered' (their parameters gathered whole, as the others)")
    for logical, axis in self.rules:
      if axis not in MESH_AXES:
        raise ValueError(f"config.sharding.rules: ({logical!r}, {axis!r}) names no mesh axis; "
                         f"the mesh axes are {', '.join(MESH_AXES)}")


def mesh_shape(data: int, fsdp: int, num_devices: int) -> tuple[int, int]:
  """Resolves -1 entries ("the rest of the devices") and checks the product."""
  sizes = [data, fsdp]
  if sizes.count(-1) > 1:
    raise ValueError(f"config.mesh: at most one of data/fsdp may be -1, got data={data} fsdp={fsdp}")
  if -1 in sizes:
    known = int(np.prod([s for s in sizes if s != -1]))
    if known < 1 or num_devices % known:
      raise ValueError(f"config.mesh: {known} does not divide the {num_devices} devices")
    sizes[sizes.index(-1)] = num_devices // known
  if sizes[0] * sizes[1] != num_devices:
    raise ValueError(f"config.mesh: data={sizes[0]} x fsdp={sizes[1]} != {num_devices} devices; "
                     "set --config.mesh.data / --config.mesh.fsdp (or -1 for the rest)")
  return sizes[0], sizes[1]


def split_data(data: int) -> tuple[int, int]:
  """data = major x minor, minor the largest power of two whose square is at most `data`."""
  minor = 1
  while data % (2 * minor) == 0 and (2 * minor) ** 2 <= data:
    minor *= 2
  return data // minor, minor


def num_slices(devices: Sequence[Any]) -> int:
  return len({getattr(d, "slice_index", 0) for d in devices})


def create_mesh(data: int = -1, fsdp: int = 1, devices: Sequence[Any] | None = None) -> Mesh:
  """('slice', 'data', 'data_minor', 'fsdp') mesh: `data` x `fsdp` lay out one slice."""
  devices = list(jax.devices() if devices is None else devices)
  slices = num_slices(devices)
  if len(devices) % slices:
    raise ValueError(f"{len(devices)} devices do not split evenly into {slices} slices")
  if fsdp == 0:
    raise ValueError("config.mesh.fsdp=0 (auto) is resolved by step.build; pass a size here")
  d, f = mesh_shape(data, fsdp, len(devices) // slices)
  shape = (1, *split_data(d), f)
  auto = (jax.sharding.AxisType.Auto,) * len(MESH_AXES)
  if slices == 1:
    return jax.make_mesh(shape, MESH_AXES, axis_types=auto, devices=devices)
  grid = mesh_utils.create_hybrid_device_mesh(
      shape, (slices, 1, 1, 1), devices=devices, allow_split_physical_axes=True)
  return Mesh(grid, MESH_AXES, axis_types=auto)


def fsdp_candidates(devices: Sequence[Any], data: int = -1) -> list[int]:
  """fsdp sizes to try, smallest first: powers of two dividing the devices of one slice
  (only the one that completes an explicit `data`)."""
  per_slice = len(devices) // num_slices(devices)
  if data != -1:
    return [per_slice // data] if data > 0 and per_slice % data == 0 else []
  return [f for f in (2**i for i in range(per_slice.bit_length())) if per_slice % f == 0]


def batch_sharding(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P(BATCH_AXES))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def _axes(entry: Any) -> tuple[str, ...]:
  return () if entry is None else (entry,) if isinstance(entry, str) else tuple(entry)


def _ways(entry: Any, mesh: Mesh) -> int:
  return int(np.prod([mesh.shape[a] for a in _axes(entry)]))


def compute_spec(logical: P | None, shape: tuple[int, ...], mesh: Mesh,
                 rules: tuple[tuple[str, str], ...] = DEFAULT_RULES) -> P:
  """Mesh PartitionSpec of one parameter as the forward uses it, from its logical names."""
  if logical is None or not shape:
    return P()
  rules = dict(rules)
  names = tuple(logical)
  spec: list[Any] = [None] * len(shape)
  for i, name in enumerate(names):
    axis = rules.get(name)
    if axis and mesh.shape[axis] > 1 and axis not in spec and shape[i] % mesh.shape[axis] == 0:
      spec[i] = axis
  for axis in set(rules.values()):
    if axis in spec or mesh.shape[axis] == 1:
      continue
    if any(rules.get(n) == axis for n in names):  # wanted but did not divide: fall back
      for d in sorted(range(len(shape)), key=lambda d: -shape[d]):
        if names[d] not in UNSHARDED and spec[d] is None and shape[d] > 1 and \
            shape[d] % mesh.shape[axis] == 0:
          spec[d] = axis
          break
  return P(*spec)


def update_spec(spec: P, logical: P | None, shape: tuple[int, ...], mesh: Mesh) -> P:
  """`spec` further split over every data-parallel axis of a slice that some dimension can take
  (largest dimensions first; an axis goes minor to those already on a dimension)."""
  names = tuple(logical) if logical is not None else (None,) * len(shape)
  entries = [_axes(e) for e in tuple(spec)] + [()] * (len(shape) - len(tuple(spec)))
  used = {a for e in entries for a in e}
  for axis in UPDATE_AXES:
    if axis in used or mesh.shape[axis] == 1:
      continue
    for d in sorted(range(len(shape)), key=lambda d: -shape[d]):
      ways = _ways(entries[d], mesh) * mesh.shape[axis]
      if names[d] not in UNSHARDED and shape[d] % ways == 0:
        entries[d] = entries[d] + (axis,)
        used.add(axis)
        break
  return P(*[None if not e else e[0] if len(e) == 1 else e for e in entries])


def param_shardings(logical: Any, shapes: Any, mesh: Mesh, layout: Layout,
                    mode: str) -> Any:
  """NamedShardings of a tree shaped like the parameters (the parameters themselves, a moment,
  the EMA) in the 'compute' or 'update' layout; leaves without logical names are replicated."""
  def one(spec, x):
    shape = tuple(x.shape)
    s = compute_spec(spec, shape, mesh, layout.rules)
    if mode == "update" and shape:
      s = update_spec(s, spec, shape, mesh)
    return NamedSharding(mesh, s)
  return jax.tree.map(one, logical, shapes, is_leaf=lambda x: isinstance(x, P) or x is None)


def state_shardings(boxed_abstract_state: Any, mesh: Mesh, layout: Layout | None = None) -> Any:
  """NamedShardings of the UNBOXED version of a TrainState whose params are LogicallyPartitioned
  (from `jax.eval_shape` of an init function; optax moments inherit the boxes), each part in the
  layout `layout` gives it; leaves without names (step, rng, counts) are replicated."""
  layout = layout or Layout()
  logical = nn.get_partition_spec(boxed_abstract_state)
  shapes = nn.meta.unbox(boxed_abstract_state)
  part = lambda lg, sh, mode: param_shardings(lg, sh, mesh, layout, mode)
  out = part(logical, shapes, "compute")  # step, rng, flags: replicated
  fields = getattr(shapes, "__dataclass_fields__", None)
  if fields is None:  # a bare parameter tree
    return out
  return out.replace(params=part(logical.params, shapes.params, layout.params),
                     opt_state=part(logical.opt_state, shapes.opt_state, layout.opt_state),
                     ema_params=part(logical.ema_params, shapes.ema_params, layout.ema))


def compute_shardings(boxed_params: Any, mesh: Mesh, layout: Layout | None = None) -> Any:
  """NamedShardings of the parameters as the forward uses them (BOXED params in)."""
  layout = layout or Layout()
  return param_shardings(nn.get_partition_spec(boxed_params), nn.meta.unbox(boxed_params), mesh,
                         layout, "compute")


def is_replicated(shardings: Any) -> bool:
  """Whether every NamedSharding of a tree replicates its array (e.g. the compute layout at
  fsdp 1: plain data parallelism)."""
  return all(all(e is None for e in s.spec) for s in jax.tree.leaves(shardings))


# The explicit step's collectives over a group of at least this many devices are issued one
# mesh axis at a time. From the planner's TPU compiles: over a whole v5p-64 or v5p-256 slice
# (32 or 128 chips) one reduce-scatter or all-gather over the group becomes an all-reduce of
# the whole array, while per axis (8 x 4, 16 x 8) they stay reduce-scatters and all-gathers;
# on a v5p-8 (2 x 2) it is the other way round.
PER_AXIS_FROM = 16


def _groups(entry: Any, mesh: Mesh) -> list[Any]:
  """The collectives one sharded dimension takes: its axes together, or one by one (major
  first) from PER_AXIS_FROM devices."""
  axes = _axes(entry)
  if not axes:
    return []
  if len(axes) == 1 or _ways(axes, mesh) < PER_AXIS_FROM:
    return [axes]
  return [(a,) for a in axes]


def gather_local(x: jax.Array, spec: P, mesh: Mesh) -> jax.Array:
  """Inside a shard_map over `mesh`: this device's block of an array laid out by `spec` ->
  the whole array, by all-gathers over the mesh axes of each sharded dimension (`_groups`,
  minor first)."""
  for d, entry in enumerate(tuple(spec)):
    for axes in reversed(_groups(entry, mesh)):
      x = jax.lax.all_gather(x, axes, axis=d, tiled=True)
  return x


def reduce_local(g: jax.Array, spec: P, mesh: Mesh) -> jax.Array:
  """Inside a shard_map over `mesh`: the sum of `g` over every device, of which this device
  keeps the block `spec` gives it. Reduce-scatters over the mesh axes `spec` names (within
  a slice; major axes first, each on the block the previous one left), then an all-reduce of
  that block over the remaining axes (the DCN's 'slice' among them), so that only 1/N of the
  bytes crosses the slower network. Large groups go axis by axis (`_groups`; DiT-S/8 on
  v5p-64: 85.9 MiB of all-reduce per step with one group-wide collective, 10.5 MiB of
  all-reduce and 11.3 MiB of reduce-scatter results per axis)."""
  used: list[str] = []
  for d, entry in enumerate(tuple(spec)):
    for axes in _groups(entry, mesh):
      g = jax.lax.psum_scatter(g, axes, scatter_dimension=d, tiled=True)
      used += axes
  rest = tuple(a for a in mesh.axis_names if a not in used and mesh.shape[a] > 1)
  return jax.lax.psum(g, rest) if rest else g


def is_modulation(path: Any) -> bool:
  """Whether a parameter's tree path is inside an adaLN modulation (`models.Modulation`)."""
  return "adaLN_modulation" in {getattr(k, "key", None) for k in path}


def stationary_axes(params: Any, specs: Any) -> tuple[str, ...] | None:
  """The mesh axes over which every adaLN modulation's kernel and bias are split by their
  output columns only (kernel [.., D, kD] as P(.., None, X), bias [.., kD] as P(.., X)), when
  all share one such X: the explicit step then computes the modulations where they are stored
  (`stationary_matmul`). None when some adaLN parameter is laid out otherwise."""
  found = set()

  def visit(path, x, spec):
    if is_modulation(path):
      entries = (list(tuple(spec)) + [None] * x.ndim)[:x.ndim]
      ok = x.ndim and _axes(entries[-1]) and all(e is None for e in entries[:-1])
      found.add(_axes(entries[-1]) if ok else None)
  jax.tree_util.tree_map_with_path(visit, params, specs)
  return found.pop() if len(found) == 1 else None


def stationary_matmul(axes: tuple[str, ...], mesh: Mesh) -> Any:
  """Inside a shard_map over `mesh`: (x [B, D], kernel [D, F/G], bias [F/G]) -> x @ W + b
  [B, F], for a Linear whose kernel and bias each device holds a block of columns of (the G
  devices of `axes`). Rather than gathering the kernel (F x D floats per device, F/G x D
  stored), each device gathers the G devices' rows of x (G x B x D floats), multiplies them
  by its own columns, and an all-to-all returns each device its rows of every column block.
  For the adaLN modulations at a few images per device this moves ~1/1000 of the bytes; the
  backward follows by transposition (an all-to-all, then a reduce-scatter of x's gradient),
  and the kernel's gradient is already the group's sum over its rows: no reduce-scatter."""
  def matmul(x, kernel, bias):
    rows = x
    for group in reversed(_groups(axes, mesh)):  # minor first: rows in the group's order
      rows = jax.lax.all_gather(rows, group, axis=0, tiled=True)
    y = jax.numpy.dot(rows, kernel) + bias
    return jax.lax.all_to_all(y, axes, 0, 1, tiled=True)
  return matmul


def device_bytes(shardings: Any, shapes: Any) -> int:
  """Bytes one device holds of a tree of arrays laid out by `shardings`."""
  return sum(int(np.prod(s.shard_shape(tuple(x.shape)))) * np.dtype(x.dtype).itemsize
             for s, x in zip(jax.tree.leaves(shardings), jax.tree.leaves(shapes)))


def replicated_bytes(shardings: Any, shapes: Any) -> tuple[int, int]:
  """(bytes of arrays sharded over some mesh axis, bytes of fully replicated arrays)."""
  sharded = replicated_n = 0
  for s, x in zip(jax.tree.leaves(shardings), jax.tree.leaves(shapes)):
    n = int(np.prod(x.shape)) * np.dtype(x.dtype).itemsize
    if any(a is not None for a in s.spec):
      sharded += n
    else:
      replicated_n += n
  return sharded, replicated_n


def describe(shardings: Any, shapes: Any) -> str:
  """Short human summary: how many parameter bytes are sharded vs replicated."""
  sharded, repl = replicated_bytes(shardings, shapes)
  return f"{sharded / 2**20:,.1f} MiB sharded, {repl / 2**20:,.1f} MiB replicated"


def log_mesh(mesh: Mesh) -> None:
  logging.info("Mesh %s over %d devices (%d processes)", dict(mesh.shape), mesh.size,
               jax.process_count())


# XLA options of TPU compiles that overlap data-parallel collectives (the gradient
# reduce-scatter, the parameter all-gather) with compute: asynchronous collectives fused into
# the surrounding computation, over several steps of the schedule. Passed as compile options by
# `step.build`, so the planner's programs are the ones a pod runs.
TPU_OVERLAP_OPTIONS = {
    "xla_tpu_enable_data_parallel_all_reduce_opt": True,
    "xla_tpu_data_parallel_opt_different_sized_ops": True,
    "xla_tpu_enable_async_collective_fusion": True,
    "xla_tpu_enable_async_collective_fusion_fuse_all_gather": True,
    "xla_tpu_enable_async_collective_fusion_fuse_reduce_scatter": True,
    "xla_tpu_enable_async_collective_fusion_multiple_steps": True,
    "xla_tpu_overlap_compute_collective_tc": True,
    "xla_enable_async_all_gather": True,
}


def compiler_options(platform: str, overlap: bool = False) -> dict[str, Any] | None:
  """Compile options of the train step for a platform ('tpu', 'gpu', 'cpu')."""
  return dict(TPU_OVERLAP_OPTIONS) if platform == "tpu" and overlap else None

"""Device mesh and sharding rules: the one place where layout is decided.

Mesh axes: 'data' (pure data parallelism, e.g. across slices) and 'fsdp' (data parallel
over the batch AND parameter sharding). The batch is split over both. Parameters, the EMA
and the Adam moments follow `LOGICAL_RULES`: the model's hidden width 'embed' is sharded
over 'fsdp'. Where that dimension does not divide by the fsdp size the largest dimension
that does is sharded instead, and a tensor with none (biases, tiny layers) is replicated.
With fsdp = 1 every parameter is replicated (plain data parallelism).

`config.mesh.data` x `config.mesh.fsdp` lay out ONE slice (ICI); with several slices
(multi-slice TPU jobs, devices with distinct `slice_index`) the mesh is a hybrid ICI x DCN
mesh whose 'data' axis also spans the slices, so only data-parallel gradient reductions
cross the data-centre network. fsdp = 0 ("auto") is resolved by `step.build` from the
compiled step's memory (`fsdp_candidates`).
"""

from __future__ import annotations

import logging
from typing import Any, Sequence

import flax.linen as nn
import jax
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

MESH_AXES = ("data", "fsdp")
BATCH_AXES = ("data", "fsdp")
# Logical parameter axis (see dit_jax.models.LOGICAL_AXES) -> mesh axis. Unlisted: replicated.
LOGICAL_RULES = (("embed", "fsdp"),)
# Logical axes never sharded, not even by the fallback below: the [depth] axis of scanned
# blocks (each scan iteration reads one layer; sharding it would gather the whole stack).
UNSHARDED = ("layers",)


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


def num_slices(devices: Sequence[Any]) -> int:
  return len({getattr(d, "slice_index", 0) for d in devices})


def create_mesh(data: int = -1, fsdp: int = 1, devices: Sequence[Any] | None = None) -> Mesh:
  """(data, fsdp) mesh; `data` x `fsdp` lay out one slice, slices add to 'data' (DCN)."""
  devices = list(jax.devices() if devices is None else devices)
  slices = num_slices(devices)
  if len(devices) % slices:
    raise ValueError(f"{len(devices)} devices do not split evenly into {slices} slices")
  if fsdp == 0:
    raise ValueError("config.mesh.fsdp=0 (auto) is resolved by step.build; pass a size here")
  d, f = mesh_shape(data, fsdp, len(devices) // slices)
  if slices == 1:
    return jax.make_mesh((d, f), MESH_AXES, axis_types=(jax.sharding.AxisType.Auto,) * 2,
                         devices=devices)
  grid = mesh_utils.create_hybrid_device_mesh(
      (d, f), (slices, 1), devices=devices, allow_split_physical_axes=True)
  return Mesh(grid, MESH_AXES, axis_types=(jax.sharding.AxisType.Auto,) * 2)


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


def _leaf_spec(logical: P | None, shape: tuple[int, ...], mesh: Mesh) -> P:
  """Mesh PartitionSpec for one array from its logical names, checking divisibility."""
  if logical is None or not shape:
    return P()
  rules = dict(LOGICAL_RULES)
  spec: list[Any] = [None] * len(shape)
  for i, name in enumerate(tuple(logical)):
    axis = rules.get(name)
    if axis and mesh.shape[axis] > 1 and axis not in spec and shape[i] % mesh.shape[axis] == 0:
      spec[i] = axis
  names = tuple(logical)
  for axis in set(rules.values()):
    if axis in spec or mesh.shape[axis] == 1:
      continue
    if any(rules.get(n) == axis for n in names):  # wanted but did not divide: fall back
      dims = sorted(range(len(shape)), key=lambda d: -shape[d])
      for d in dims:
        if names[d] in UNSHARDED:
          continue
        if spec[d] is None and shape[d] % mesh.shape[axis] == 0 and shape[d] > 1:
          spec[d] = axis
          break
  return P(*spec)


def state_shardings(boxed_abstract_state: Any, mesh: Mesh) -> Any:
  """NamedShardings for the UNBOXED version of a state whose params are LogicallyPartitioned.

  `boxed_abstract_state` comes from `jax.eval_shape` of an init function that returns boxed
  params (optax moments inherit the boxes); leaves without names are replicated.
  """
  logical = nn.get_partition_spec(boxed_abstract_state)
  shapes = nn.meta.unbox(boxed_abstract_state)
  return jax.tree.map(
      lambda spec, x: NamedSharding(mesh, _leaf_spec(spec, tuple(x.shape), mesh)),
      logical, shapes, is_leaf=lambda x: isinstance(x, P))


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

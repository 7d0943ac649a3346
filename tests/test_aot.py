"""The AOT planner: topology names, collective accounting, a tiny DiT compiled for a TPU slice."""

import pytest

from dit_jax import aot
from test_train import digits_dir, tiny_config  # noqa: F401


def test_slice_names_map_to_libtpu_topologies():
  assert aot.libtpu_topology("v5p-8") == "v5p:2x2x1"  # v5p counts TensorCores: 4 chips
  assert aot.libtpu_topology("v5p-64") == "v5p:2x4x4"  # 32 chips
  assert aot.libtpu_topology("v5p-128") == "v5p:4x4x4"
  assert aot.libtpu_topology("v5e-256") == "v5e:16x16"  # v5e counts chips
  assert aot.libtpu_topology("v6e-64") == "v6e:8x8"
  assert aot.libtpu_topology("v5p:2x2x2") == "v5p:2x2x2"
  with pytest.raises(ValueError, match="no standard v5e slice of 3 chips"):
    aot.libtpu_topology("v5e-3")
  with pytest.raises(ValueError, match="expected e.g. v5p-64"):
    aot.libtpu_topology("tpu-big")


def test_collective_bytes_from_hlo_text():
  hlo = """
  %ar = f32[1024,256]{1,0} all-reduce(f32[1024,256]{1,0} %p), replica_groups={}
  %ags = (bf16[8,128]{1,0}, bf16[64,128]{1,0}) all-gather-start(bf16[8,128]{1,0} %x)
  %agd = bf16[64,128]{1,0} all-gather-done((bf16[8,128]{1,0}, bf16[64,128]{1,0}) %ags)
  %rs = (f32[16]{0}, f32[16]{0}) reduce-scatter(f32[128]{0} %a, f32[128]{0} %b)
  %add = f32[1024,256]{1,0} add(%ar, %ar)
  """
  assert aot.collective_bytes(hlo) == {"all-reduce": 1024 * 256 * 4,
                                       "all-gather": 64 * 128 * 2,  # once, at its -done
                                       "reduce-scatter": 2 * 16 * 4}


def test_plan_compiles_train_and_sampling_steps_for_a_tpu_slice(digits_dir):  # noqa: F811
  c = tiny_config(digits_dir, **{"data.image_size": 64, "eval.batch_size": 8,
                                 "mesh.fsdp": 2})
  devices = aot.topology_devices("v5p-8")
  b, (step, sample) = aot.plan(c, devices)
  assert dict(b.mesh.shape) == {"data": 2, "fsdp": 2}
  # The compiled FLOPs are the analytic 3 x forward matmuls plus elementwise work.
  assert 1.0 <= step.flops / step.analytic_flops < 1.5
  assert 1.0 <= sample.flops / sample.analytic_flops < 1.5
  assert 0 < step.memory["total"] < 1 and step.memory["arguments"] > 0
  # FSDP gathers parameters and reduce-scatters (or all-reduces) gradients.
  assert step.collectives.get("all-gather", 0) > 0
  assert step.roofline_seconds and step.roofline_seconds > 0
  text = aot.format_reports(c, "v5p-8", devices, b, [step, sample])
  assert "of 95.0 GiB" in text and "train step" in text and "guided sampling step" in text

"""The AOT planner: topology names, collective accounting, a tiny DiT compiled for a TPU slice."""

import json
import os
import re
import subprocess
import sys

import jax
import pytest

from dit_jax import aot, planner_table
from dit_jax import step as dit_step
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
  # TPU compiles fuse a reduce-scatter as an all-reduce and the slice each device keeps.
  fused = """
%all-reduce-scatter.4 (input.4: f32[64,128]) -> f32[64,32] {
  %input.4 = f32[64,128]{0,1} parameter(0)
  %all-reduce.128 = f32[64,128]{0,1:T(8,128)} all-reduce(%input.4), channel_id=64
  ROOT %dynamic-slice.162 = f32[64,32]{0,1} dynamic-slice(%all-reduce.128, %c, %m)
}

ENTRY %main.1 (p: bf16[8]) -> f32[64,32] {
  %ar = f32[] all-reduce(%x), to_apply=%add
}
"""
  assert aot.collectives(fused) == [("reduce-scatter", "f32", 64 * 128 * 4),
                                    ("all-reduce", "f32", 4)]


def test_plan_compiles_train_and_sampling_steps_for_a_tpu_slice(digits_dir):  # noqa: F811
  c = tiny_config(digits_dir, **{"data.builtin": "", "data.image_size": 64, "eval.batch_size": 8,
                                 "mesh.fsdp": 2})
  devices = aot.topology_devices("v5p-8")
  b, (step, sample) = aot.plan(c, devices)
  assert dict(b.mesh.shape) == {"slice": 1, "data": 2, "data_minor": 1, "fsdp": 2}
  # MFU's numerator: 3 x the forward's matmul FLOPs, per chip.
  assert b.model_flops == step.analytic_flops == pytest.approx(
      3 * dit_step.forward_flops(b.model) * c.data.global_batch_size / 4)
  # The compiled FLOPs are the analytic 3 x forward matmuls plus elementwise work.
  assert 1.0 <= step.flops / step.analytic_flops < 1.5
  assert 1.0 <= sample.flops / sample.analytic_flops < 1.5
  assert 0 < step.memory["total"] < 1 and step.memory["arguments"] > 0
  # FSDP gathers parameters and reduce-scatters (or all-reduces) gradients.
  assert step.collectives.get("all-gather", 0) > 0
  assert step.roofline_seconds and step.roofline_seconds > 0
  text = aot.format_reports(c, "v5p-8", devices, b, [step, sample])
  assert "of 95.0 GiB" in text and "train step" in text and "guided sampling step" in text
  # XLA's TPU cost model, by JAX source: shares of one whole, the model's matmuls among them
  # in both directions.
  parts = aot.cycles_by_source(b.compiled.as_text())
  assert sum(share for _, share, _ in parts) == pytest.approx(1.0)
  sources = {name for name, _, _ in parts}
  for layer in ("attn/btd,dknh->bknth/dot_general", "mlp/fc1/dot_general"):  # qkv, fc1
    assert {f"fwd {layer}", f"bwd {layer}"} <= sources, sorted(sources)


def test_cycles_by_source_labels():
  hlo = """
%fused (p: f32[8]) -> f32[8] {
  %x = f32[8]{0} add(%p, %p), backend_config={"estimated_cycles":"999"}
}

ENTRY %main (p: f32[8]) -> f32[8] {
  %a = f32[8]{0} fusion(%p), kind=kLoop, calls=%fused, metadata={op_name="jit(train_step)/shard_map/jvp(DiT)/blocks_3/mlp/fc1/dot_general"}, backend_config={"estimated_cycles":"300"}
  %b = f32[8]{0} fusion(%a), metadata={op_name="jit(train_step)/shard_map/transpose(jvp(DiT))/blocks_0/mlp/fc1/dot_general"}, backend_config={"estimated_cycles":"600"}
  ROOT %c = (f32[8]{0}, f32[8]{0}) tuple(%a, %b), backend_config={"estimated_cycles":"100"}
}
"""
  # Only the entry computation counts (fused computations are inside its fusions); blocks merge.
  assert aot.cycles_by_source(hlo) == [("bwd mlp/fc1/dot_general", 0.6, 1),
                                       ("fwd mlp/fc1/dot_general", 0.3, 1), ("tuple", 0.1, 1)]


def test_plan_with_scanned_blocks_and_splash_attention(digits_dir):  # noqa: F811
  c = tiny_config(digits_dir, **{"data.builtin": "", "data.image_size": 64, "eval.batch_size": 8,
                                 "mesh.fsdp": 2,
                                 "model.overrides.depth": 3, "model.scan_layers": True,
                                 "model.remat": "dots_saveable", "model.dtype": "bfloat16",
                                 "model.attention_impl": "splash"})
  devices = aot.topology_devices("v5p-8")
  b, (step, sample) = aot.plan(c, devices)
  # Every scanned block is counted (XLA alone counts the loop body once: ~1/3 here). XLA does
  # not count the splash kernels' FLOPs (measured: 1.08 train, 0.99 sampling; 1.22 / 1.06 with
  # the XLA attention path).
  assert 0.9 <= step.flops / step.analytic_flops < 1.5
  assert 0.9 <= sample.flops / sample.analytic_flops < 1.5
  assert "scan_layers" in aot.format_reports(c, "v5p-8", devices, b, [step, sample])


def test_step_and_planner_import_without_tensorflow_clu_or_orbax():
  # The exact train step must run where only JAX is installed (a GPU image, a TPU VM without
  # TensorFlow): benchmarks/accelerator_speed.py relies on it.
  code = ("import sys\n"
          "for m in ('tensorflow', 'clu', 'orbax', 'orbax.checkpoint', 'tensorflow_datasets'):\n"
          "  sys.modules[m] = None  # any import of them now fails\n"
          "import dit_jax.step, dit_jax.aot, dit_jax.planner_table, dit_jax.model_table\n"
          "print('ok')\n")
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                       check=False)
  assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-2000:]


def test_table_row_in_a_subprocess_and_the_markdown_around_it(tmp_path):
  # One real row: DiT-S/8 (one block) compiled for v5p-8 by the CLI in a fresh process.
  row = planner_table._run_row("s8", "v5p-8", ("model.overrides.depth=1",), sampling=False,
                               timeout=600)
  assert "error" not in row, row
  assert row["chips"] == 4 and row["mesh"] == {"slice": 1, "data": 2, "data_minor": 2, "fsdp": 1}
  assert row["layout"] == {"params": "update", "opt_state": "update", "ema": "update"}
  train = row["steps"]["train step"]
  assert 0 < train["memory"]["total"] < row["hbm_gib"] == pytest.approx(95.0)
  assert 1.0 <= train["flops"] / train["analytic_flops"] < 2.0
  md = tmp_path / "performance.md"
  md.write_text("# Performance\n\nHand-written intro.\n\n" + planner_table.BEGIN + "\nold\n" +
                planner_table.END + "\n\n## GPU\nkept\n")
  key = planner_table.row_key("s8", "v5p-8", ())
  failed = planner_table.row_key("s4", "v5p-8", ())
  planner_table.write_table(str(md), {key: row, failed: {"error": "too big"}})
  text = md.read_text()
  assert "Hand-written intro." in text and "## GPU\nkept" in text and "\nold\n" not in text
  assert "| DiT-S/8 256px | v5p-8 | update | 4x1 |" in text
  assert "| s4 | v5p-8 | update | | too big |" in text
  assert "| s8 | v5p-8 | replicated | | not compiled yet" in text


def test_table_run_compiles_only_missing_and_failed_rows(tmp_path, monkeypatch):
  rows = planner_table.table_rows()
  good, failed = planner_table.row_key(*rows[0]), planner_table.row_key(*rows[1])
  cache = tmp_path / "rows.json"
  cache.write_text(json.dumps({good: {"steps": {}}, failed: {"error": "timed out"}}))
  compiled = []

  def fake_row(config, topology, overrides, sampling, timeout):
    compiled.append(planner_table.row_key(config, topology, overrides))
    return {"error": "not compiled in this test"}
  monkeypatch.setattr(planner_table, "_run_row", fake_row)
  out = planner_table.run_table(str(cache), jobs=1, timeout=1, only="^(s8|s4) ")
  keys = [planner_table.row_key(*r) for r in rows]
  want = [k for k in keys if re.match("^(s8|s4) ", k)]
  assert sorted(compiled) == sorted(k for k in want if k != good)  # the failed row again
  assert failed in compiled and good not in compiled
  assert out[good] == {"steps": {}} and json.loads(cache.read_text()) == out


def test_measure_times_every_layout_on_the_cpu():
  """dit-aot --measure on a tiny demo model: every layout row is timed (or names its error),
  and the table says which is fastest."""
  from configs import demo
  from dit_jax import measure
  c = demo.get_config()
  c.model.overrides.hidden_size, c.model.overrides.depth, c.model.overrides.num_heads = 32, 2, 2
  c.data.global_batch_size, c.eval.batch_size = 16, 8
  labels = [label for label, _ in measure.layouts(c, "cpu")]
  assert labels[0] == "config" and "remat=full" in labels and "microbatches=2" in labels
  assert "collectives=xla" in labels and "attention_impl=xla_tokens" in labels
  assert "attention_impl=splash" in [label for label, _ in measure.layouts(c, "tpu")]
  # Three of them timed here (each compiles a train and a sampling step).
  rows = measure.measure(c, jax.devices()[:2], aot.plan, steps=2,
                         only=("config", "remat=full", "microbatches=2"))
  assert [r.layout for r in rows] == ["config", "remat=full", "microbatches=2"]
  for r in rows:
    assert not r.error, (r.layout, r.error)
    assert r.train_ms > 0 and r.sample_ms > 0
  table = measure.format_table(rows, jax.devices()[:2])
  assert "| remat=full |" in table and "fastest train step:" in table

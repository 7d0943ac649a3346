"""Pod readiness: cluster start-up (mocked), multi-slice meshes compiled for TPU topologies,
memory-driven layouts, per-process sample parts, gs://-style paths, nothing lost around
periodic sampling, compilation cache reuse, checkpoint retention and transient read errors."""

import glob
import os
import subprocess
import sys
import types

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
import tensorflow as tf

from dit_jax import step as dit_step
from dit_jax import (guidance, hardware, image_io, input_pipeline, periodic, runtime, sharding,
                     train)
from dit_jax.evaluation import reference
from test_main_cli import ROOT, _free_port, env, main_cmd, steps_saved
from test_train import digits_dir, tiny_config  # noqa: F401

CLUSTER_VARS = ("SLURM_JOB_ID", "SLURM_STEP_NODELIST", "SLURM_NTASKS", "SLURM_PROCID",
                "SLURM_LOCALID", "OMPI_MCA_orte_hnp_uri", "KUBERNETES_SERVICE_HOST",
                "TPU_WORKER_HOSTNAMES", "TPU_PROCESS_ADDRESSES", "MEGASCALE_COORDINATOR_ADDRESS")


@pytest.fixture
def no_network(monkeypatch):
  """Cluster detection must not reach a metadata server (or anything) from a test."""
  import requests

  def refuse(*args, **kwargs):
    raise AssertionError(f"a test tried to reach the network: {args} {kwargs}")

  monkeypatch.setattr(requests, "get", refuse)
  monkeypatch.setattr(requests.Session, "request", refuse)
  for var in CLUSTER_VARS:
    monkeypatch.delenv(var, raising=False)
  calls = []
  monkeypatch.setattr(jax.distributed, "initialize", lambda *a, **k: calls.append((a, k)))
  return calls


def test_no_cluster_means_one_process(no_network):
  assert runtime.detect_cluster() is None
  assert runtime.init_distributed() is None and no_network == []
  runtime.check_multiprocess()  # one process, no client: fine


def test_slurm_job_initialises_distributed(no_network, monkeypatch):
  for var, value in (("SLURM_JOB_ID", "7"), ("SLURM_STEP_NODELIST", "node[1-2]"),
                     ("SLURM_NTASKS", "2"), ("SLURM_PROCID", "1"), ("SLURM_LOCALID", "0")):
    monkeypatch.setenv(var, value)
  assert runtime.init_distributed() == "SlurmCluster"
  # JAX fills in coordinator, count and id itself; the heartbeat timeout is ours.
  assert no_network == [((), {"heartbeat_timeout_seconds": 100})]
  assert runtime.init_distributed(distributed=False) is None and len(no_network) == 1


def test_plain_cloud_tpu_vm_initialises_distributed(no_network, monkeypatch):
  # A GCE TPU VM pod sets no TPU_WORKER_HOSTNAMES; JAX asks the metadata server (mocked).
  from jax._src.clusters import cloud_tpu_cluster
  monkeypatch.setattr(cloud_tpu_cluster, "running_in_cloud_tpu_vm", True)
  monkeypatch.delenv("TPU_SKIP_MDS_QUERY", raising=False)  # JAX sets it where it finds no chip
  asked = []
  monkeypatch.setattr(cloud_tpu_cluster, "get_metadata",
                      lambda key: (asked.append(key), ("3", 200))[1])
  assert runtime.init_distributed() == "GceTpuCluster"
  assert asked == ["agent-worker-number"] and len(no_network) == 1


def test_several_processes_without_distributed_stop(no_network, monkeypatch):
  monkeypatch.setattr(jax, "process_count", lambda: 4)
  monkeypatch.setattr(runtime, "distributed_client_ready", lambda: False)
  with pytest.raises(RuntimeError, match="process 0 of 4, but jax.distributed is not initialised"):
    runtime.check_multiprocess()
  monkeypatch.setattr(runtime, "distributed_client_ready", lambda: True)
  runtime.check_multiprocess()


def tpu_devices(topology, slices=1):
  os.environ.setdefault("TPU_ACCELERATOR_TYPE", "v5p-8")
  from jax.experimental import topologies
  return topologies.get_topology_desc(platform="tpu", topology_name=topology,
                                      num_slices=slices).devices


def test_peak_flops_and_memory_by_device_kind():
  v5p = tpu_devices("v5p:2x2x1")[0]
  assert v5p.device_kind == "TPU v5"  # what JAX reports on v5p
  assert hardware.peak_flops(v5p) == 459e12 and hardware.memory_bytes(v5p) == 95 * 2**30
  v5e = tpu_devices("v5e:2x2")[0]
  assert hardware.peak_flops(v5e) == 197e12 and hardware.memory_bytes(v5e) == 16 * 2**30
  assert hardware.peak_flops(jax.devices()[0]) is None  # CPU: no MFU


def test_train_step_compiles_on_two_slices_with_default_config(digits_dir):  # noqa: F811
  devices = tpu_devices("v5p:2x2x2", slices=2)
  assert sorted({d.slice_index for d in devices}) == [0, 1]
  c = tiny_config(digits_dir)
  assert c.mesh.fsdp == 0 and c.mesh.data == -1  # the defaults: auto layout
  info = input_pipeline.get_info(digits_dir)
  b = dit_step.build(c, info, devices=devices)
  # Fits one v5p chip: data parallel over both slices, the DCN carrying only gradients.
  assert dict(b.mesh.shape) == {"slice": 2, "data": 4, "data_minor": 2, "fsdp": 1}
  assert 0 < b.memory_gib < 1 and b.flops > 0
  # The explicit step, the adaLN modulations computed within each slice (all-to-all).
  assert b.explicit and "all-to-all" in b.compiled.as_text()
  # The 'slice' axis is the DCN: each slice's devices sit under one index of it.
  for s in range(2):
    assert {d.slice_index for d in b.mesh.devices[s].flat} == {s}
  # The weight update is sharded within a slice, never over the DCN.
  for sh in jax.tree.leaves(b.state_sh.params) + jax.tree.leaves(b.state_sh.ema_params):
    assert "slice" not in str(sh.spec)
  assert any(sh.spec != jax.sharding.PartitionSpec() for sh in jax.tree.leaves(b.state_sh.params))
  # An explicit FSDP layout stays within a slice: every fsdp group is on one slice.
  b4 = dit_step.build(tiny_config(digits_dir, **{"mesh.fsdp": 4}), info, devices=devices)
  assert dict(b4.mesh.shape) == {"slice": 2, "data": 2, "data_minor": 1, "fsdp": 4}
  for row in b4.mesh.devices.reshape(-1, 4):
    assert len({d.slice_index for d in row}) == 1
  assert [row[0].slice_index for row in b4.mesh.devices.reshape(-1, 4)] == [0, 0, 1, 1]


def test_auto_layout_shards_only_as_much_as_memory_needs(digits_dir, monkeypatch):  # noqa: F811
  # XLA's collectives at every size, so that the search compares like with like (the tiny
  # model's explicit data-parallel step already needs about what its FSDP steps need).
  model = {"model.overrides.hidden_size": 256, "model.overrides.num_heads": 4,
           "sharding.collectives": "xla"}
  c = tiny_config(digits_dir, **model)
  info = input_pipeline.get_info(digits_dir)
  need = dit_step.build(tiny_config(digits_dir, **model, **{"mesh.fsdp": 1}),
                        info).memory_gib * 2**30
  # A device a little smaller than data parallelism needs: the smallest FSDP that fits.
  monkeypatch.setattr(hardware, "memory_bytes", lambda d: int(need))
  b = dit_step.build(c, info)
  assert b.mesh.shape["fsdp"] > 1
  assert b.memory_gib * 2**30 <= dit_step.MEMORY_HEADROOM * need
  smaller = dit_step.build(tiny_config(digits_dir, **model,
                                       **{"mesh.fsdp": b.mesh.shape["fsdp"] // 2}), info)
  assert smaller.memory_gib * 2**30 > dit_step.MEMORY_HEADROOM * need
  sharded, replicated = sharding.replicated_bytes(b.state_sh.params, b.abstract.params)
  assert sharded > 10 * replicated  # biases and norms only stay whole


def test_sample_parts_from_two_processes(digits_dir, tmp_path):  # noqa: F811
  wd = str(tmp_path / "run")
  train.train_and_evaluate(tiny_config(digits_dir, total_steps=2), wd)
  args = ["--num_samples=13", "--batch_size=8", "--respacing=4", "--cfg_scale=2", "--seed=5"]
  one = str(tmp_path / "one.npz")
  r = subprocess.run([sys.executable, "-m", "dit_jax.sample", f"--workdir={wd}", *args,
                      f"--out={one}"], cwd=ROOT, env=env(), capture_output=True, text=True,
                     timeout=600)
  assert r.returncode == 0, r.stderr[-3000:]
  two = str(tmp_path / "two.npz")
  port = _free_port()
  procs = [subprocess.Popen(
      [sys.executable, "-m", "dit_jax.sample", f"--workdir={wd}", *args, f"--out={two}",
       "--keep_parts", f"--coordinator_address=127.0.0.1:{port}", "--num_processes=2",
       f"--process_id={i}"], cwd=ROOT, env=env(devices=4), stdout=subprocess.PIPE,
      stderr=subprocess.STDOUT, text=True) for i in range(2)]
  outs = [p.communicate(timeout=600)[0] for p in procs]
  for p, out in zip(procs, outs):
    assert p.returncode == 0, out[-4000:]
  with np.load(one) as f:
    img1, lab1 = f["arr_0"], f["arr_1"]
  with np.load(two) as f:
    img2, lab2 = f["arr_0"], f["arr_1"]
  parts = sorted(glob.glob(str(tmp_path / "two.part-*-of-00002.npz")))
  assert len(parts) == 2
  sizes = [len(np.load(p)["arr_1"]) for p in parts]
  # Batches of 8 split 4 + 4 over the processes; 13 = 8 + 5: process 0 made 4 + 4, process 1
  # made 4 + 1. The merged file is process-major; the same images as one process made.
  assert sizes == [8, 5] and img2.shape == img1.shape == (13, 8, 8, 1)
  order = np.concatenate([np.r_[0:4, 8:12], np.r_[4:8, 12:13]])
  np.testing.assert_array_equal(lab2, lab1[order])
  np.testing.assert_allclose(img2.astype(int), img1[order].astype(int), atol=1)


def test_sample_and_evaluation_files_through_gfile():
  # ram:// is TensorFlow's in-memory filesystem: the same code path as gs://, no network.
  root = "ram://dit_jax_test"
  images = np.random.default_rng(0).integers(0, 255, (6, 8, 8, 3), dtype=np.uint8)
  image_io.save_npz(f"{root}/a.npz", arr_0=images[:4], arr_1=np.arange(4))
  image_io.save_npz(f"{root}/b.npz", arr_0=images[4:], arr_1=np.arange(4, 6))
  image_io.merge_npz_parts([f"{root}/a.npz", f"{root}/b.npz"], f"{root}/all.npz",
                           rows_per_read=3)
  assert image_io.check_images(f"{root}/all.npz") == 6
  got = np.concatenate(list(image_io.iter_npz_array(f"{root}/all.npz", batch_size=4)))
  np.testing.assert_array_equal(got, images)
  np.testing.assert_array_equal(
      np.concatenate(list(image_io.iter_npz_array(f"{root}/all.npz", "arr_1"))), np.arange(6))
  image_io.save_png(f"{root}/grid.png", image_io.make_grid(images))
  stats = reference.ReferenceStats(np.zeros(3), np.eye(3), np.zeros(2), np.eye(2), pool=None,
                                   source="x")
  stats.save(f"{root}/ref.npz")
  assert reference.ReferenceStats.load(f"{root}/ref.npz").source == "x"
  tf.io.gfile.makedirs(f"{root}/folder/a")
  from PIL import Image
  import io
  buf = io.BytesIO()
  Image.fromarray(images[0]).save(buf, format="PNG")
  with tf.io.gfile.GFile(f"{root}/folder/a/0.png", "wb") as f:
    f.write(buf.getvalue())
  folder = list(reference.folder_images(f"{root}/folder"))
  np.testing.assert_array_equal(folder[0], images[0])
  assert sorted(tf.io.gfile.listdir(root)) == ["a.npz", "all.npz", "b.npz", "folder",
                                               "grid.png", "ref.npz"]


def test_checkpoint_is_saved_before_the_sample_grid(digits_dir, tmp_path, monkeypatch):  # noqa: F811
  def broken(self, ema_params, step):
    raise MemoryError(f"out of memory in the sample grid at step {step}")

  monkeypatch.setattr(periodic.SampleGrid, "__call__", broken)
  c = tiny_config(digits_dir, total_steps=4, **{
      "checkpoint.every_steps": 2, "sample.every_steps": 2, "sample.num_images": 4,
      "sample.respacing": "2"})
  with pytest.raises(MemoryError, match="step 2"):
    train.train_and_evaluate(c, str(tmp_path))
  assert steps_saved(str(tmp_path)) == [2]  # the step that sampling failed on is kept


def test_sampler_errors_surface_before_training(digits_dir, tmp_path, monkeypatch):  # noqa: F811
  def sampler_that_fails_to_compile(*args, **kwargs):
    def sample(params, key, labels, cfg_scale):
      raise MemoryError("RESOURCE_EXHAUSTED: compiling the sampler")
    return jax.jit(sample)

  monkeypatch.setattr(guidance, "make_sample_fn", sampler_that_fails_to_compile)
  c = tiny_config(digits_dir, total_steps=6, **{"sample.num_images": 4,
                                                "sample.every_steps": 6})
  with pytest.raises(MemoryError, match="compiling the sampler"):
    train.train_and_evaluate(c, str(tmp_path))
  assert steps_saved(str(tmp_path)) == []  # not one training step was spent before it


def test_restart_reuses_the_compilation_cache(digits_dir, tmp_path):  # noqa: F811
  wd = str(tmp_path / "run")
  e = env()
  e.pop("JAX_COMPILATION_CACHE_DIR", None)  # the default: WORKDIR/compilation_cache
  first = subprocess.run(main_cmd(wd, digits_dir, "--config.total_steps=2"), cwd=ROOT, env=e,
                         capture_output=True, text=True, timeout=600)
  assert first.returncode == 0, first.stderr[-3000:]
  cache = os.path.join(wd, "compilation_cache")
  assert os.listdir(cache)
  again = subprocess.run(main_cmd(wd, digits_dir, "--config.total_steps=4"), cwd=ROOT,
                         env=dict(e, JAX_LOG_COMPILES="1"), capture_output=True, text=True,
                         timeout=600)
  assert again.returncode == 0, again.stderr[-3000:]
  assert "Persistent compilation cache hit for 'jit_train_step'" in again.stderr


def test_keep_period_keeps_the_grid_checkpoints(digits_dir, tmp_path):  # noqa: F811
  c = tiny_config(digits_dir, total_steps=10, **{
      "checkpoint.every_steps": 2, "checkpoint.keep": 1, "checkpoint.keep_period": 4})
  train.train_and_evaluate(c, str(tmp_path))
  assert steps_saved(str(tmp_path)) == [4, 8, 10]


def test_transient_read_error_does_not_demote_the_newest(digits_dir, tmp_path, monkeypatch,  # noqa: F811
                                                         caplog):
  wd = str(tmp_path)
  train.train_and_evaluate(tiny_config(digits_dir), wd)  # checkpoints 3 and 6
  real, failures = ocp.CheckpointManager.restore, []

  def flaky(self, step, *args, **kwargs):
    items = kwargs.get("args").keys() if kwargs.get("args") is not None else ()
    if step == 6 and len(failures) < 2 and "train" in items:
      failures.append(step)
      raise OSError("503 Service Unavailable (transient)")
    return real(self, step, *args, **kwargs)

  monkeypatch.setattr(ocp.CheckpointManager, "restore", flaky)
  hist = train.train_and_evaluate(
      tiny_config(digits_dir, total_steps=7, **{"checkpoint.restore_backoff_s": 0.01}), wd)
  assert failures == [6, 6] and sorted(hist) == [7]  # resumed from the newest, step 6
  assert "restore attempt 2/4 failed (OSError: 503" in caplog.text
  assert not os.path.exists(os.path.join(wd, "checkpoints_unreadable"))


def test_auto_remat_takes_the_lightest_policy_that_fits(digits_dir, monkeypatch):  # noqa: F811
  # The choice alone, with compiles faked by the policy's memory (real compiles of 'auto':
  # the xl2_512 rows of docs/performance.md, e.g. none on v5p-64).
  info = input_pipeline.get_info(digits_dir)
  gib = {"none": 3.0, "dots_with_no_batch_dims_saveable": 2.0, "full": 1.0}
  tried = []

  def fake_compile(config, info, model, diffusion, tx, schedule, init_fn, boxed, mesh, layout,
                   microbatches, align=None):
    tried.append((mesh.shape["fsdp"], model.remat))
    return types.SimpleNamespace(model=model, mesh=mesh, memory_gib=gib[model.remat])
  monkeypatch.setattr(dit_step, "_compile", fake_compile)
  auto = tiny_config(digits_dir, **{"model.remat": "auto", "mesh.fsdp": 1,
                                    "optim.microbatches": 1})
  assert dit_step.create_model(auto, info).remat == "none"
  # No known device memory (a CPU): no remat, one compile.
  assert dit_step.build(auto, info).model.remat == "none" and tried == [(1, "none")]
  # 2.5 GiB devices (2.25 usable): the lightest policy under that, tried in order.
  monkeypatch.setattr(hardware, "memory_bytes", lambda d: int(2.5 * 2**30))
  tried.clear()
  assert dit_step.build(auto, info).model.remat == "dots_with_no_batch_dims_saveable"
  assert tried == [(1, "none"), (1, "dots_with_no_batch_dims_saveable")]
  # Within each FSDP layout first: auto fsdp on 8 devices tries fsdp 1 with every policy.
  monkeypatch.setattr(hardware, "memory_bytes", lambda d: int(1.05 * 2**30))
  tried.clear()
  both = tiny_config(digits_dir, **{"model.remat": "auto", "mesh.fsdp": 0,
                                    "optim.microbatches": 1})
  assert dit_step.build(both, info).model.remat == "full"
  assert tried[:3] == [(1, r) for r in dit_step.REMAT_AUTO] and tried[3][0] > 1
  # An explicit policy is never changed.
  tried.clear()
  assert dit_step.build(tiny_config(digits_dir, **{"model.remat": "none", "mesh.fsdp": 1,
                                                   "optim.microbatches": 1}),
                        info).model.remat == "none"
  assert tried == [(1, "none")]


def test_auto_microbatches_only_when_nothing_else_fits(digits_dir, monkeypatch):  # noqa: F811
  # Compiles faked: memory falls with remat and with the microbatch count.
  info = input_pipeline.get_info(digits_dir)
  gib = {"none": 3.0, "dots_with_no_batch_dims_saveable": 2.0, "full": 1.6}
  tried = []

  def fake_compile(config, info, model, diffusion, tx, schedule, init_fn, boxed, mesh, layout,
                   microbatches, align=None):
    tried.append((model.remat, microbatches))
    return types.SimpleNamespace(model=model, mesh=mesh, microbatches=microbatches,
                                 memory_gib=gib[model.remat] / microbatches)
  monkeypatch.setattr(dit_step, "_compile", fake_compile)
  c = tiny_config(digits_dir, **{"model.remat": "auto", "mesh.fsdp": 1, "optim.microbatches": 0,
                                 "data.global_batch_size": 32})
  # No known memory: no remat, no accumulation.
  assert dit_step.build(c, info).microbatches == 1 and tried == [("none", 1)]
  # 1.5 GiB devices (1.35 usable): every policy first, then 2 microbatches with remat full.
  monkeypatch.setattr(hardware, "memory_bytes", lambda d: int(1.5 * 2**30))
  tried.clear()
  b = dit_step.build(c, info)
  assert (b.model.remat, b.microbatches) == ("full", 2)
  assert tried == [(r, 1) for r in dit_step.REMAT_AUTO] + [("full", 2)]
  # An explicit count is kept: 4 per device (32 images on 8 devices) allows 1, 2 or 4.
  tried.clear()
  b = dit_step.build(tiny_config(digits_dir, **{"model.remat": "none", "mesh.fsdp": 1,
                                                "optim.microbatches": 4,
                                                "data.global_batch_size": 32}), info)
  assert b.microbatches == 4 and tried == [("none", 4)]

"""The main job: real train steps, sharding invariance, resume, bad input."""

import glob
import os

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from configs import demo
from dit_jax import checkpointing, convert, demo_data, input_pipeline, models, records, train
from dit_jax import step as dit_step


@pytest.fixture(scope="session")
def digits_dir(tmp_path_factory):
  out = str(tmp_path_factory.mktemp("digits"))
  demo_data.write_digits(out)
  return out


def tiny_config(data_dir, **overrides):
  c = demo.get_config()
  c.data.dir = data_dir
  c.data.global_batch_size = 16
  c.data.shuffle_buffer = 256
  c.model.overrides.hidden_size = 32
  c.model.overrides.depth = 2
  c.model.overrides.num_heads = 2
  c.total_steps = 6
  c.log_every_steps = 1
  c.checkpoint.every_steps = 3
  c.sample.every_steps = 0
  c.sample.num_images = 0
  c.optim.warmup_steps = 0
  for k, v in overrides.items():
    node = c
    *path, last = k.split(".")
    for p in path:
      node = node[p]
    node[last] = v
  return c


def final_params(workdir):
  mngr = ocp.CheckpointManager(os.path.abspath(os.path.join(workdir, "checkpoints")),
                               item_names=("train", "ema", "meta"))
  step = mngr.latest_step()
  out = mngr.restore(step, args=ocp.args.Composite(train=ocp.args.StandardRestore(),
                                                   ema=ocp.args.StandardRestore()))
  return step, out["train"]["params"], out["ema"]


def losses(history):
  return np.array([history[s]["loss"] for s in sorted(history)])


@pytest.mark.parametrize("name", ["DiT-S/2", "DiT-B/4", "DiT-L/8", "DiT-XL/2"])
def test_one_step_each_family(digits_dir, tmp_path, name):
  c = tiny_config(digits_dir, total_steps=1)
  c.model.name = name
  # Keep the family's head count (and patch size) at head_dim 8, one block.
  heads = models.get_model(name).num_heads
  c.model.overrides.num_heads = heads
  c.model.overrides.hidden_size = 8 * heads
  c.model.overrides.depth = 1
  hist = train.train_and_evaluate(c, str(tmp_path))
  assert list(hist) == [1]
  assert np.isfinite(hist[1]["loss"]) and hist[1]["grad_norm"] > 0
  step, params, ema = final_params(str(tmp_path))
  assert step == 1
  # adaLN-Zero: at init only the final linear layer has a gradient; Adam's first step
  # moves each of its weights by ~lr and leaves the zero-initialised blocks' adaLN at 0.
  w = np.abs(params["final_layer"]["linear"]["kernel"]).max()
  assert 0.5 * c.optim.learning_rate < w <= 1.01 * c.optim.learning_rate
  assert np.abs(params["blocks_0"]["adaLN_modulation"]["kernel"]).max() == 0
  np.testing.assert_allclose(ema["final_layer"]["linear"]["kernel"],
                             (1 - c.ema_decay) * params["final_layer"]["linear"]["kernel"],
                             rtol=1e-5, atol=1e-12)


def test_loss_decreases_on_digits(digits_dir, tmp_path):
  c = tiny_config(digits_dir, total_steps=40, **{"checkpoint.every_steps": 40})
  hist = train.train_and_evaluate(c, str(tmp_path))
  l = losses(hist)
  assert l[-8:].mean() < 0.6 * l[:4].mean(), l


def test_same_losses_on_1_and_8_devices(digits_dir, tmp_path):
  c1 = tiny_config(digits_dir, total_steps=4, **{"mesh.data": 1, "mesh.fsdp": 1})
  h1 = train.train_and_evaluate(c1, str(tmp_path / "one"), devices=jax.devices()[:1])
  c8 = tiny_config(digits_dir, total_steps=4, **{"mesh.data": 4, "mesh.fsdp": 2})
  h8 = train.train_and_evaluate(c8, str(tmp_path / "eight"))
  assert jax.device_count() == 8
  np.testing.assert_allclose(losses(h1), losses(h8), rtol=1e-4)
  _, p1, _ = final_params(str(tmp_path / "one"))
  _, p8, _ = final_params(str(tmp_path / "eight"))
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-5), p1, p8)


def test_stop_and_resume_matches_uninterrupted(digits_dir, tmp_path):
  full = train.train_and_evaluate(tiny_config(digits_dir), str(tmp_path / "full"))
  part = str(tmp_path / "part")
  first = train.train_and_evaluate(tiny_config(digits_dir, total_steps=3), part)
  # Resume on a different mesh (8 devices, fsdp 2) from the 3-step checkpoint.
  rest = train.train_and_evaluate(tiny_config(digits_dir, **{"mesh.fsdp": 2}), part)
  assert sorted(first) == [1, 2, 3] and sorted(rest) == [4, 5, 6]
  np.testing.assert_allclose(losses({**first, **rest}), losses(full), rtol=1e-4)
  _, pa, ea = final_params(str(tmp_path / "full"))
  _, pb, eb = final_params(part)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6), pa, pb)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6), ea, eb)


def test_data_stream_resumes_in_place(digits_dir):
  info = input_pipeline.get_info(digits_dir)
  mk = lambda start: input_pipeline.iterate(input_pipeline.create_dataset(
      info, local_batch_size=500, seed=3, start_step=start, shuffle_buffer=300))
  it = mk(0)
  full = [next(it)["label"] for _ in range(6)]  # crosses two epoch boundaries (1797 records)
  it = mk(4)
  np.testing.assert_array_equal(next(it)["label"], full[4])
  np.testing.assert_array_equal(next(it)["label"], full[5])
  assert not np.array_equal(full[0], full[4])


def test_corrupt_latest_checkpoint_falls_back(digits_dir, tmp_path):
  wd = str(tmp_path)
  train.train_and_evaluate(tiny_config(digits_dir), wd)  # checkpoints at 3 and 6
  for f in glob.glob(os.path.join(wd, "checkpoints", "6", "train", "**", "d", "*"), recursive=True):
    with open(f, "r+b") as fh:
      fh.truncate(max(1, os.path.getsize(f) // 3))
  hist = train.train_and_evaluate(
      tiny_config(digits_dir, total_steps=7, **{"checkpoint.restore_backoff_s": 0.0}), wd)
  assert sorted(hist) == [4, 5, 6, 7]  # resumed from 3, the newest readable checkpoint
  # The damaged step was set aside, not deleted, and rewritten by the resumed run.
  assert os.listdir(os.path.join(wd, "checkpoints_unreadable"))[0].startswith("6-")
  assert os.path.isdir(os.path.join(wd, "checkpoints", "7"))


def test_patch_size_that_does_not_divide(digits_dir, tmp_path):
  c = tiny_config(digits_dir, **{"model.overrides.patch_size": 3})
  with pytest.raises(ValueError, match="patch"):
    train.train_and_evaluate(c, str(tmp_path))


def _copy_dataset(src, dst):
  os.makedirs(dst)
  for f in os.listdir(src):
    with open(os.path.join(src, f), "rb") as a, open(os.path.join(dst, f), "wb") as b:
      b.write(a.read())


def test_truncated_shard_is_named(digits_dir, tmp_path):
  d = str(tmp_path / "data")
  _copy_dataset(digits_dir, d)
  shard = sorted(glob.glob(os.path.join(d, "*.tfrecord")))[1]
  with open(shard, "r+b") as f:
    f.truncate(os.path.getsize(shard) - 100)
  with pytest.raises(ValueError, match=os.path.basename(shard)):
    train.train_and_evaluate(tiny_config(d), str(tmp_path / "wd"))


def test_misshaped_record_is_named(tmp_path):
  d = str(tmp_path / "data")
  os.makedirs(d)
  good = np.zeros((8, 2, 8, 8, 1), np.float32)
  records.write_shard(os.path.join(d, "a.tfrecord"), np.arange(8) % 10, good, good,
                      dtype="float32")
  bad = np.zeros((8, 2, 4, 8, 1), np.float32)  # half the rows
  info = records.write_shard(os.path.join(d, "b.tfrecord"), np.arange(8) % 10, bad, bad,
                             dtype="float32")
  info["latent_shape"] = [8, 8, 1]  # lie in the sidecar so the manifest accepts it
  import json
  with open(os.path.join(d, "b.tfrecord.json"), "w") as f:
    json.dump(info, f)
  records.write_manifest(d, vae="identity", scale_factor=1.0, num_classes=10)
  with pytest.raises(ValueError, match="b.tfrecord"):
    train.train_and_evaluate(tiny_config(d, **{"data.global_batch_size": 16}), str(tmp_path / "w"))


def test_missing_data_dir_is_explained(tmp_path):
  c = tiny_config(str(tmp_path / "nowhere"))
  with pytest.raises(FileNotFoundError, match="manifest.json"):
    train.train_and_evaluate(c, str(tmp_path / "w"))


def test_periodic_evaluation_logs_fid(digits_dir, tmp_path):
  from sklearn.datasets import load_digits
  from dit_jax.evaluation import inception
  from dit_jax.evaluation.convert import save_variables
  rng = np.random.default_rng(0)

  def draw(path, x):  # random FID-Inception weights: He-scaled kernels, identity batch norm
    name = path[-1].key
    if name == "kernel":
      return (rng.standard_normal(x.shape) * np.sqrt(2 / np.prod(x.shape[:-1]))).astype(np.float32)
    return np.full(x.shape, 1.0 if name in ("scale", "var") else 0.0, np.float32)

  variables = jax.tree_util.tree_map_with_path(draw, inception.abstract_variables())
  save_variables(variables, str(tmp_path / "inception.npz"))
  real = (load_digits().images[:16] * 255 / 16).astype(np.uint8)[..., None]
  np.savez(tmp_path / "ref.npz", arr_0=real)
  c = tiny_config(digits_dir, total_steps=2, **{
      "eval.every_steps": 2, "eval.num_samples": 8, "eval.batch_size": 8, "eval.respacing": "4",
      "eval.inception_batch_per_device": 1,
      "eval.inception": str(tmp_path / "inception.npz"), "eval.reference": str(tmp_path / "ref.npz")})
  hist = train.train_and_evaluate(c, str(tmp_path / "wd"))
  ev = hist[2]
  assert ev["eval/num_samples"] == 8
  assert np.isfinite(ev["eval/fid"]) and ev["eval/fid"] > 0
  assert 0 <= ev["eval/precision"] <= 1 and 0 <= ev["eval/recall"] <= 1
  assert os.path.exists(tmp_path / "wd" / "eval_reference_stats.npz")


def test_workdir_of_another_model_is_refused(digits_dir, tmp_path):
  train.train_and_evaluate(tiny_config(digits_dir, total_steps=1), str(tmp_path))
  other = tiny_config(digits_dir, total_steps=2, **{"model.overrides.depth": 3})
  with pytest.raises(ValueError, match="depth=2 there, 3 now"):
    train.train_and_evaluate(other, str(tmp_path))


def test_bf16_and_remat_train_steps(digits_dir, tmp_path):
  ref = train.train_and_evaluate(tiny_config(digits_dir, total_steps=3), str(tmp_path / "f32"))
  remat = train.train_and_evaluate(
      tiny_config(digits_dir, total_steps=3, **{"model.remat": "full"}), str(tmp_path / "remat"))
  np.testing.assert_allclose(losses(remat), losses(ref), rtol=1e-5)
  bf16 = train.train_and_evaluate(
      tiny_config(digits_dir, total_steps=3, **{"model.dtype": "bfloat16"}), str(tmp_path / "bf16"))
  np.testing.assert_allclose(losses(bf16), losses(ref), rtol=5e-2)
  _, params, _ = final_params(str(tmp_path / "bf16"))
  assert all(x.dtype == np.float32 for x in jax.tree.leaves(params))  # bf16 activations only


def test_scan_layers_resume_across_layouts(digits_dir, tmp_path):
  full = train.train_and_evaluate(tiny_config(digits_dir), str(tmp_path / "full"))
  part = str(tmp_path / "part")
  first = train.train_and_evaluate(tiny_config(digits_dir, total_steps=3), part)
  # The per-block checkpoint of step 3 resumes with scanned blocks (remat inside the scan).
  rest = train.train_and_evaluate(tiny_config(digits_dir, **{
      "model.scan_layers": True, "model.remat": "dots_with_no_batch_dims_saveable"}), part)
  assert sorted(rest) == [4, 5, 6]
  np.testing.assert_allclose(losses({**first, **rest}), losses(full), rtol=1e-4)
  _, pa, ea = final_params(str(tmp_path / "full"))
  _, pb, eb = final_params(part)
  assert "blocks" in pb and "blocks_0" not in eb  # written in the scanned layout
  pb, eb = convert.unstack_blocks((pb, eb))
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6), pa, pb)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6), ea, eb)
  # The sampler's loader builds the scanned model from the checkpoint's meta.
  model, params, _ = checkpointing.load_ema_model(
      part, jax.sharding.SingleDeviceSharding(jax.devices()[0]))
  assert model.scan_layers and params["blocks"]["mlp"]["fc1"]["kernel"].shape[0] == 2


def test_scanned_step_flops_count_every_block(digits_dir):
  info = input_pipeline.get_info(digits_dir)
  c = tiny_config(digits_dir, **{"model.overrides.depth": 4, "model.overrides.hidden_size": 64})
  unrolled = dit_step.build(c, info)
  scanned = dit_step.build(tiny_config(digits_dir, **{
      "model.overrides.depth": 4, "model.overrides.hidden_size": 64, "model.scan_layers": True}),
      info)
  # XLA's cost analysis counts a loop body once; build adds the other 3 blocks' matmuls.
  assert 0.9 < scanned.flops / unrolled.flops <= 1.0, (scanned.flops, unrolled.flops)


def test_profile_trace_of_configured_steps(digits_dir, tmp_path):
  workdir = str(tmp_path)
  c = tiny_config(digits_dir, **{"total_steps": 5, "checkpoint.every_steps": 5,
                                 "profile.start_step": 2, "profile.num_steps": 2})
  train.train_and_evaluate(c, workdir)
  traces = glob.glob(os.path.join(workdir, "profile", "plugins", "profile", "*", "*.xplane.pb"))
  assert len(traces) == 1 and os.path.getsize(traces[0]) > 0
  # Off by default: no trace directory.
  other = str(tmp_path / "off")
  train.train_and_evaluate(tiny_config(digits_dir, total_steps=2), other)
  assert not os.path.exists(os.path.join(other, "profile"))

"""REPA: the alignment loss in closed form, the projector and depth rule, the release's SiT
against a PyTorch reference (diffusers' DiT with REPA's projector MLP), images flipped with
their latents, the REPA step on 8 devices against 1, and REPA through dit_jax.main with kill -9."""

import os
import subprocess

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from dit_jax import (checkpointing, convert, guidance, input_pipeline, models, repa, step,
                     train)
from dit_jax.encoders import digits_teacher
from test_main_cli import (ROOT, assert_same_params, env, kill_9_after_step_4, main_cmd,
                           steps_saved)
from test_convert import _reference as _dit_reference
from test_train import final_params, tiny_config


# ------------------------------------------------------------------------ the loss and rule
def test_alignment_loss_closed_form():
  rng = np.random.default_rng(0)
  p = rng.normal(size=(3, 5, 8)).astype(np.float32)
  scale = rng.uniform(0.1, 10, size=(3, 5, 1)).astype(np.float32)
  np.testing.assert_allclose(repa.alignment_loss(p, p * scale), -1.0, atol=1e-6)
  np.testing.assert_allclose(repa.alignment_loss(p, -p * scale), 1.0, atol=1e-6)
  # Half the tokens aligned, half opposed: 0 on average.
  f = np.concatenate([p[:, :2], -p[:, 2:4]], axis=1)
  np.testing.assert_allclose(repa.alignment_loss(p[:, :4], f), 0.0, atol=1e-6)
  # Orthogonal features: cos 0.
  e = np.zeros((1, 2, 4), np.float32)
  e[0, 0, 0] = e[0, 1, 1] = 1.0
  o = np.zeros_like(e)
  o[0, 0, 2] = o[0, 1, 3] = 3.0
  np.testing.assert_allclose(repa.alignment_loss(e, o), 0.0, atol=1e-7)
  # Against the formula REPA writes: -mean_t <p/|p|, f/|f|>.
  f = rng.normal(size=p.shape).astype(np.float32)
  want = -np.mean(np.sum(p / np.linalg.norm(p, axis=-1, keepdims=True) *
                         f / np.linalg.norm(f, axis=-1, keepdims=True), -1), -1)
  np.testing.assert_allclose(repa.alignment_loss(p, f), want, rtol=1e-5)


def test_depth_rule():
  assert repa.block_depth(0, 28) == 8  # REPA's SiT-XL/2
  assert repa.block_depth(0, 12) == 3 and repa.block_depth(0, 24) == 7
  assert repa.block_depth(0, 4) == 1 and repa.block_depth(0, 2) == 1
  assert repa.block_depth(5, 12) == 5
  with pytest.raises(ValueError, match="config.repa.depth=13"):
    repa.block_depth(13, 12)


def test_projector_trains_and_is_left_out_of_sampling_and_release():
  model = models.DiT(input_size=8, patch_size=2, in_channels=4, hidden_size=32, depth=3,
                     num_heads=2, num_classes=10, projector_dim=24, projector_hidden=16,
                     projector_depth=2)
  x = jnp.ones((2, 8, 8, 4))
  t = jnp.zeros((2,), jnp.int32)
  params = nn.meta.unbox(model.init(jax.random.PRNGKey(0), x, t, t))["params"]
  assert params["projector"]["fc3"]["kernel"].shape == (16, 24)
  out, proj = model.apply({"params": params}, x, t, t, project=True)
  assert proj.shape == (2, 16, 24) and out.shape == (2, 8, 8, 8)
  # The projection is the projector of the hidden states after block 2 (capture index 1).
  _, hidden = model.apply({"params": params}, x, t, t, capture=1)
  want = models.Projector(16, 24).apply({"params": params["projector"]}, hidden)
  np.testing.assert_allclose(proj, want, rtol=1e-6, atol=1e-6)
  plain, plain_params = models.without_projector(model, params)
  assert "projector" not in plain_params and plain.projector_dim == 0
  np.testing.assert_allclose(plain.apply({"params": plain_params}, x, t, t), out, atol=1e-6)
  sd = convert.to_official(params, model)
  assert not [k for k in sd if "projector" in k]
  with pytest.raises(ValueError, match="project=True needs a projector"):
    plain.apply({"params": plain_params}, x, t, t, project=True)


# ------------------------------------------------------------ REPA's released SiT checkpoints
def _repa_reference(depth=3, heads=2, head_dim=16, patch=2, size=8, classes=10, z_dim=24,
                    hidden=32, encoder_depth=2):
  """A REPA SiT as torch modules: diffusers' DiT without learned sigma (test_convert's
  reference, in the release's keys) and REPA's projector MLP (Linear, SiLU, Linear, SiLU,
  Linear) for the hidden states after block encoder_depth; the state dict in REPA's keys."""
  ref, sd, _ = _dit_reference(depth, heads, head_dim, patch, size, classes, out_channels=4)
  torch.manual_seed(1)
  proj = torch.nn.Sequential(torch.nn.Linear(heads * head_dim, hidden), torch.nn.SiLU(),
                             torch.nn.Linear(hidden, hidden), torch.nn.SiLU(),
                             torch.nn.Linear(hidden, z_dim))
  out = dict(sd)
  for j in (0, 2, 4):
    for s in ("weight", "bias"):
      out[f"projectors.0.{j}.{s}"] = getattr(proj[j], s).detach().numpy()
  return ref, proj, out


def test_release_sit_gives_the_references_output_and_projection():
  depth = 2
  ref, proj, sd = _repa_reference(encoder_depth=depth)
  model, params = repa.from_release(sd, encoder_depth=depth, input_size=8, num_classes=10,
                                    num_heads=2)
  assert (model.learn_sigma, model.projector_dim, model.projector_depth) == (False, 24, 2)
  rng = np.random.default_rng(0)
  x = rng.normal(size=(3, 4, 8, 8)).astype(np.float32)
  t = np.array([0.0, 0.3, 0.97], np.float32)  # REPA's time: 0 data, 1 noise
  y = np.array([1, 5, 10])  # 10: the null class
  hidden = {}
  hook = ref.transformer_blocks[depth - 1].register_forward_hook(
      lambda m, a, o: hidden.setdefault("h", o))
  with torch.no_grad():
    want = ref(torch.from_numpy(x), timestep=torch.from_numpy(t),
               class_labels=torch.from_numpy(y)).sample.numpy()
    want_z = proj(hidden["h"]).numpy()
  hook.remove()
  out, z = repa.forward_with_projection(model, params, jnp.asarray(x.transpose(0, 2, 3, 1)),
                                        jnp.asarray(t), jnp.asarray(y))
  np.testing.assert_allclose(np.asarray(out).transpose(0, 3, 1, 2), want, atol=3e-5, rtol=0)
  np.testing.assert_allclose(np.asarray(z), want_z, atol=3e-5, rtol=0)
  with pytest.raises(ValueError, match="one projector"):
    repa.from_release({k: v for k, v in sd.items() if "projectors" not in k}, 2, 8, 10, 2)


# ------------------------------------------------------------------------------ the step
@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
  """The digits teacher after a few steps (its numbers, not its quality, matter here)."""
  out = str(tmp_path_factory.mktemp("teacher"))
  digits_teacher.train(out, steps=20, batch_size=64, log_every=20)
  return out


def repa_config(workdir_data, teacher_dir, **overrides):
  return tiny_config(workdir_data, **{"data.with_images": True, "repa.encoder": "digits_teacher",
                                      "repa.encoder_path": teacher_dir,
                                      "repa.projector_hidden": 32, **overrides})


@pytest.fixture(scope="module")
def images_dir(tmp_path_factory):
  from dit_jax import demo_data
  return demo_data.ensure("digits", str(tmp_path_factory.mktemp("wd")), with_images=True)


def test_images_are_flipped_with_their_latents(images_dir):
  """The digits' image extra is pixel x 15 and the latent pixel / 8 - 1: after the step's
  random flip each image must still be its latent, example by example."""
  info = input_pipeline.get_info(images_dir, 0, 1)
  assert info.manifest["extras"]["image"] == {"shape": [8, 8, 1], "dtype": "uint8",
                                               "flip": "width"}
  ds = input_pipeline.create_dataset(info, local_batch_size=64, seed=0, process_index=0,
                                     start_step=0, shuffle_buffer=256, cycle_length=2)
  batch = {k: jnp.asarray(v) for k, v in next(iter(ds)).items()}
  from dit_jax import records
  x0, extras = step.sample_latents(batch, jax.random.PRNGKey(3), 1.0, True,
                                   records.flip_modes(info.manifest))
  flipped = np.asarray(x0) != np.asarray(batch["mean"][:, 0])
  assert flipped.any(axis=(1, 2, 3)).sum() > 10  # some examples were flipped ...
  assert (~flipped.any(axis=(1, 2, 3))).sum() > 10  # ... and some not
  np.testing.assert_array_equal(np.asarray(extras["image"]).astype(np.float32),
                                (np.asarray(x0) + 1) * 8 * 15)


# On 8 devices: the data-parallel step with explicit collectives; and FSDP with microbatches,
# scanned blocks and LightningDiT's parts (the 1-device reference keeps the model fields).
LAYOUTS = {"explicit": ({}, {}),
           "fsdp_micro_scan_lightning": ({"model.scan_layers": True, "model.norm": "rmsnorm",
                                          "model.mlp": "swiglu", "model.rope": True},
                                         {"mesh.fsdp": 2, "optim.microbatches": 2})}


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_repa_step_on_8_devices_equals_1(images_dir, teacher, tmp_path, layout):
  model_fields, eight = LAYOUTS[layout]
  c = repa_config(images_dir, teacher, total_steps=2, **{"data.random_flip": True},
                  **model_fields)
  info = input_pipeline.get_info(images_dir, 0, 1)
  batch = next(iter(input_pipeline.create_dataset(info, local_batch_size=16, seed=0,
                                                  process_index=0, start_step=0,
                                                  shuffle_buffer=256, cycle_length=2)))
  batch = {k: np.asarray(v) for k, v in batch.items()}
  _, enc_params = digits_teacher.load(teacher)
  out = []
  for devices in (jax.devices()[:1], jax.devices()[:8]):
    if len(devices) == 8:
      c = repa_config(images_dir, teacher, total_steps=2, **{"data.random_flip": True},
                      **model_fields, **eight)
    setup = step.build(c, info, devices)
    assert setup.explicit == (layout == "explicit" or len(devices) == 1)
    assert setup.model.projector_depth == 1 and setup.model.projector_dim == 64
    setup.load_frozen(enc_params)
    state = setup.init(jax.random.PRNGKey(0))
    metrics = []
    for _ in range(2):
      state, m = setup.step(state, {k: jax.device_put(v, setup.batch_sh)
                                    for k, v in batch.items()})
      metrics.append(jax.device_get(m))
    out.append((jax.device_get(state.params), metrics))
  (p1, m1), (p8, m8) = out
  for a, b in zip(m1, m8):
    assert -1.0 <= a["repa"] <= 1.0
    np.testing.assert_allclose(a["repa"], b["repa"], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(a["loss"], b["loss"], rtol=1e-5)
  # The projector trains: its parameters moved, the same on both meshes.
  init = jax.device_get(setup.init(jax.random.PRNGKey(0)).params)
  assert np.abs(p1["projector"]["fc3"]["kernel"] - init["projector"]["fc3"]["kernel"]).max() > 0
  for u, v in zip(jax.tree.leaves(p1), jax.tree.leaves(p8)):
    np.testing.assert_allclose(u, v, rtol=2e-5, atol=2e-6)


def test_repa_needs_the_image_extra_and_matching_tokens(images_dir, teacher, tmp_path):
  info = input_pipeline.get_info(images_dir, 0, 1)
  c = repa_config(images_dir, teacher, **{"repa.image": "photo"})
  with pytest.raises(ValueError, match="config.repa.image='photo'.*prepare_latents --with_images"):
    step.build(c, info, jax.devices()[:1])
  c = repa_config(images_dir, teacher, **{"model.overrides.patch_size": 4})
  with pytest.raises(ValueError, match="16 patch tokens.*the model has 4"):
    step.build(c, info, jax.devices()[:1])
  c = repa_config(images_dir, teacher, **{"objective.name": "meanflow"})
  with pytest.raises(ValueError, match="jvp"):
    step.build(c, info, jax.devices()[:1])
  c = repa_config(images_dir, teacher, **{"repa.encoder_path": str(tmp_path / "none")})
  with pytest.raises(FileNotFoundError, match="encoder_path"):
    repa.load_encoder(c, step.build(c, info, jax.devices()[:1]).align)


@pytest.mark.parametrize("objective", ["flow", "edm"])
def test_repa_trains_with_other_objectives(images_dir, teacher, tmp_path, objective):
  # With a sample grid at step 2: the periodic sampler runs without the projector.
  c = repa_config(images_dir, teacher, total_steps=2, **{
      "objective.name": objective, "model.learn_sigma": False, "sample.every_steps": 2,
      "sample.num_images": 10, "sample.steps": 4})
  wd = str(tmp_path / objective)
  hist = train.train_and_evaluate(c, wd, devices=jax.devices()[:2])
  assert all(np.isfinite(hist[s]["repa"]) and -1 <= hist[s]["repa"] <= 1 for s in hist)
  assert os.path.exists(os.path.join(wd, "samples", "step_00000002.png"))


def test_repa_through_main_resumes_after_kill_9_and_samples(images_dir, teacher, tmp_path):
  flags = ["--config.data.with_images=True", "--config.repa.encoder=digits_teacher",
           f"--config.repa.encoder_path={teacher}", "--config.repa.projector_hidden=32",
           "--config.checkpoint.every_steps=2"]
  wd = str(tmp_path / "run")
  saved = kill_9_after_step_4(wd, images_dir, *flags)
  total = saved[-1] + 3
  resumed = subprocess.run(main_cmd(wd, images_dir, f"--config.total_steps={total}", *flags),
                           cwd=ROOT, env=env(), capture_output=True, text=True, timeout=600)
  assert resumed.returncode == 0, resumed.stderr[-3000:]
  ref = str(tmp_path / "ref")
  train.train_and_evaluate(repa_config(images_dir, teacher, total_steps=total,
                                       **{"checkpoint.every_steps": 2}), ref)
  assert steps_saved(wd)[-1] == total
  assert "projector" in final_params(wd)[1]  # the projector is in the checkpoint
  assert_same_params(wd, ref)
  # Its checkpoints sample, without the projector.
  dev = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  model, params, meta = checkpointing.load_ema_model(wd, dev)
  assert "projector" not in params and model.projector_dim == 0
  assert meta["model_kwargs"]["projector_depth"] == 1
  fn = guidance.make_sample_fn(checkpointing.read_objective(meta), model, steps=4,
                               release_cfg=False)
  x = fn(params, jax.random.PRNGKey(0), jnp.arange(4, dtype=jnp.int32), jnp.float32(2.0))
  assert x.shape == (4, 8, 8, 1) and np.isfinite(np.asarray(x)).all()


def test_network_time_repa_samples_as_sits_time():
  """A network in REPA's time g(x, t') = -f(x, 1 - t') samples what f does in SiT's time."""
  from dit_jax import objectives
  from configs import demo
  f = lambda x, t: -x * (1.5 - t.reshape(-1, 1, 1, 1)) + 0.3
  g = lambda x, t: -f(x, 1.0 - t)
  noise = jax.random.normal(jax.random.PRNGKey(0), (4, 8, 8, 1))
  out = []
  for time, fn in (("sit", f), ("repa", g)):
    c = demo.get_config()
    c.objective.name, c.objective.network_time, c.model.learn_sigma = "flow", time, False
    obj = objectives.from_config(c)
    assert obj.to_meta().get("network_time", "sit") == time
    out.append(obj.sample(fn, noise, jax.random.PRNGKey(1), sampler="euler", steps=11))
  np.testing.assert_allclose(out[0], out[1], atol=1e-5)


def test_dit_convert_reads_a_repa_checkpoint_and_it_samples(tmp_path):
  _, _, sd = _repa_reference(depth=2, heads=6, head_dim=64, size=8, classes=10, z_dim=24,
                             hidden=32, encoder_depth=1)  # DiT-S widths (384 = 6 x 64)
  path = str(tmp_path / "repa.pt")
  torch.save({"ema": {k: torch.from_numpy(v) for k, v in sd.items()}}, path)
  out = str(tmp_path / "converted")
  model, params = convert.convert_repa(path, out, 1, 8, 10)
  loaded, loaded_params = convert.load_converted(out)
  assert loaded.projector_depth == 1 and loaded.projector_dim == 24
  for u, v in zip(jax.tree.leaves(params), jax.tree.leaves(loaded_params)):
    np.testing.assert_array_equal(u, v)
  record = convert.converted_objective(out)
  assert record["name"] == "flow" and record["network_time"] == "repa"
  from dit_jax import objectives
  obj = objectives.from_meta({"objective": record, "model_kwargs": {"learn_sigma": False}})
  plain, plain_params = models.without_projector(loaded, loaded_params)
  fn = guidance.make_sample_fn(obj, plain, sampler="euler", steps=4, release_cfg=False)
  x = fn(plain_params, jax.random.PRNGKey(0), jnp.arange(2, dtype=jnp.int32), jnp.float32(1.5))
  assert x.shape == (2, 8, 8, 4) and np.isfinite(np.asarray(x)).all()


def test_the_digits_teacher_is_trained_into_the_workdir_when_no_path_is_given(
    images_dir, tmp_path, monkeypatch):
  calls = []
  original = digits_teacher.train

  def short(out, **kw):
    calls.append(out)
    return original(out, steps=5, batch_size=32, log_every=5)
  monkeypatch.setattr(digits_teacher, "train", short)
  wd = str(tmp_path / "run")
  c = repa_config(images_dir, "", total_steps=2)
  hist = train.train_and_evaluate(c, wd, devices=jax.devices()[:1])
  assert calls == [os.path.join(wd, "digits_teacher")] and sorted(hist) == [1, 2]
  assert os.path.exists(os.path.join(wd, "digits_teacher", "params.msgpack"))
  # A resumed run reuses it.
  train.train_and_evaluate(repa_config(images_dir, "", total_steps=3), wd,
                           devices=jax.devices()[:1])
  assert len(calls) == 1


def test_repa_flops_are_the_encoders_forward_and_3x_the_projectors(images_dir, teacher):
  """The step's analytic FLOPs with REPA: + the teacher's forward (counted by hand) + 3 x the
  projector's forward, per image."""
  info = input_pipeline.get_info(images_dir, 0, 1)
  c = repa_config(images_dir, teacher)
  setup = step.build(c, info, jax.devices()[:1])
  base = step.build(tiny_config(images_dir), info, jax.devices()[:1])
  t, d, h, layers = 17, 64, 256, 4  # 16 patches + CLS, the teacher's width, MLP, depth
  encoder = 16 * 4 * 1 * d + layers * (t * d * 3 * d + 2 * t * t * d + t * d * d + 2 * t * d * h)
  dit_d, hidden, z = 32, 32, 64
  projector = 16 * (dit_d * hidden + hidden * hidden + hidden * z)
  per_image = 2 * (encoder + 3 * projector)
  gbs = c.data.global_batch_size
  assert setup.model_flops - base.model_flops == pytest.approx(per_image * gbs, rel=1e-9)

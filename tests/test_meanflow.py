"""MeanFlow (dit_jax/objectives/meanflow.py): the average velocity of Gaussian data in closed
form, the JVP against finite differences, r = t as flow matching, and the objective through
the step (1 vs 8 devices, resume), the main job and dit-sample."""
import os
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dit_jax import checkpointing, flow, guidance, models, objectives, step, train
from dit_jax.objectives import meanflow
from test_main_cli import (ROOT, assert_same_params, env, kill_9_after_step_4, main_cmd,
                           steps_saved)
from test_train import digits_dir, final_params, tiny_config  # noqa: F401  (fixture)

MU, S = 0.3, 0.6  # data x ~ N(MU, S^2) per element; noise e ~ N(0, 1); z_t = (1 - t) x + t e


def _sigma(tau):
  return jnp.sqrt((1 - tau) ** 2 * S ** 2 + tau ** 2)


def _flow_map(z, t, r):
  """z_r on the probability-flow ODE through z at time t (affine for Gaussian data)."""
  t, r = (a.reshape(a.shape + (1,) * (z.ndim - 1)) for a in (t, r))
  return (1 - r) * MU + _sigma(r) / _sigma(t) * (z - (1 - t) * MU)


def _velocity(z, t):
  """The marginal velocity field v(z, t) = dz_t/dt (t = 1 noise, v = e - x on average)."""
  tt = t.reshape(t.shape + (1,) * (z.ndim - 1))
  dsigma = (-(1 - tt) * S ** 2 + tt) / _sigma(tt)
  return -MU + dsigma / _sigma(tt) * (z - (1 - tt) * MU)


def _average_velocity(z, t, h):
  """The exact u(z, t, r = t - h) = (z - z_r) / h."""
  return (z - _flow_map(z, t, t - h)) / h.reshape(h.shape + (1,) * (z.ndim - 1))


def _times(n, key=0):
  a, b = jax.random.uniform(jax.random.PRNGKey(key), (2, n), minval=0.05, maxval=0.95)
  return jnp.maximum(a, b) + 0.01, jnp.minimum(a, b)  # t > r


def test_the_identity_target_of_the_exact_average_velocity_is_itself():
  n = 64
  t, r = _times(n)
  z = jax.random.normal(jax.random.PRNGKey(1), (n, 3))
  u, target = meanflow.mean_velocity_target(_average_velocity, z, t, r, _velocity(z, t))
  np.testing.assert_allclose(u, _average_velocity(z, t, t - r), rtol=1e-6)
  np.testing.assert_allclose(target, u, rtol=2e-4, atol=2e-5)
  # A wrong u (scaled) does not reproduce itself.
  wrong = lambda z, t, h: 1.1 * _average_velocity(z, t, h)
  u_w, target_w = meanflow.mean_velocity_target(wrong, z, t, r, _velocity(z, t))
  assert float(jnp.abs(target_w - u_w).max()) > 1e-3


def test_the_loss_target_is_unbiased_and_the_exact_u_samples_in_one_step():
  n = 200_000
  kx, ke = jax.random.split(jax.random.PRNGKey(2))
  x = MU + S * jax.random.normal(kx, (n, 1))
  e = jax.random.normal(ke, (n, 1))
  t = jnp.full((n,), 0.7)
  r = jnp.full((n,), 0.2)
  z = 0.3 * x + 0.7 * e
  # With the conditional velocity e - x, as the loss uses it, the target is u on average.
  u, target = meanflow.mean_velocity_target(_average_velocity, z, t, r, e - x)
  assert abs(float(jnp.mean(target - u))) < 5e-3
  assert abs(float(jnp.mean((target - u) * z))) < 5e-3  # uncorrelated with z_t too
  noise = jax.random.normal(jax.random.PRNGKey(3), (n, 1))
  one = meanflow.sample(_average_velocity, noise, steps=1)
  np.testing.assert_allclose(one, MU + S * noise, rtol=1e-4, atol=1e-5)  # exactly the data
  two = meanflow.sample(_average_velocity, noise, steps=2)
  np.testing.assert_allclose(two, one, rtol=1e-4, atol=1e-5)


def test_the_loss_with_r_equal_t_is_flow_matching():
  n, c = 16, 2
  kx, ke, km = jax.random.split(jax.random.PRNGKey(4), 3)
  x = jax.random.normal(kx, (n, 4, 4, c))
  e = jax.random.normal(ke, x.shape)
  t = jax.random.uniform(km, (n,), minval=0.05, maxval=0.95)
  w = jax.random.normal(jax.random.PRNGKey(5), (c, c))
  u_fn = lambda z, tt, h, y: jnp.tanh(z @ w) * (1 + tt + 2 * h)[:, None, None, None]
  labels, drop = jnp.zeros((n,), jnp.int32), jnp.zeros((n,), bool)
  got, logged = meanflow.loss(u_fn, x, t, t, e, labels, drop, 9, omega=1.0, kappa=0.0,
                              norm_p=0.0)
  z = (1 - t[:, None, None, None]) * x + t[:, None, None, None] * e
  u = u_fn(z, t, jnp.zeros_like(t), labels)
  np.testing.assert_allclose(got, jnp.sum((u - (e - x)) ** 2, axis=(1, 2, 3)), rtol=1e-5)
  np.testing.assert_allclose(logged["v_loss"], got, rtol=1e-5)
  # SiT's flow matching in its own convention (t' = 1 - t, velocity x - e): the same numbers.
  sit = flow.create_transport("Linear", "velocity").training_losses(
      lambda zz, tt: -u_fn(zz, 1 - tt, jnp.zeros_like(tt), labels), x, 1 - t, e)["loss"]
  np.testing.assert_allclose(got, sit * x[0].size, rtol=1e-4)
  # The adaptive weight: loss / (loss + eps)^p without gradient through the weight.
  weighted, _ = meanflow.loss(u_fn, x, t, t, e, labels, drop, 9, omega=1.0, kappa=0.0)
  np.testing.assert_allclose(weighted, got / (got + 0.01), rtol=1e-5)


def test_guided_velocity_and_dropped_rows():
  z = jnp.ones((3, 2))
  t = jnp.array([0.1, 0.5, 0.9])
  v = jnp.full((3, 2), 2.0)
  u_fn = lambda z, t, h, y: jnp.where((y == 9)[:, None], -1.0, 5.0) * jnp.ones_like(z)
  got = meanflow.guided_velocity(u_fn, z, t, v, jnp.array([1, 2, 3]), 9, omega=1.5, kappa=0.5,
                                 t_start=0.2, t_end=0.8)
  # Inside: 1.5 * 2 + (1 - 1.5 - 0.5) * (-1) + 0.5 * 5 = 6.5; outside: v.
  np.testing.assert_allclose(got, [[2.0, 2.0], [6.5, 6.5], [2.0, 2.0]])


def _tiny_mf_dit():
  model = models.DiT(input_size=8, patch_size=4, in_channels=2, hidden_size=32, depth=2,
                     num_heads=2, num_classes=5, learn_sigma=False, h_embedder=True)
  x = jnp.zeros((1, 8, 8, 2))
  params = nn.meta.unbox(model.init(jax.random.PRNGKey(0), x, jnp.zeros((1,)),
                                    jnp.zeros((1,), jnp.int32), h=jnp.zeros((1,)))["params"])
  params = jax.tree.map(lambda p: p + 0.05 * jnp.sin(jnp.arange(p.size).reshape(p.shape)),
                        params)
  return model, params


def test_the_jvp_through_the_dit_equals_finite_differences():
  model, params = _tiny_mf_dit()
  assert "h_embedder" in params
  z = jax.random.normal(jax.random.PRNGKey(6), (3, 8, 8, 2))
  v = jax.random.normal(jax.random.PRNGKey(7), z.shape)
  t, r, y = jnp.array([0.9, 0.6, 0.3]), jnp.array([0.2, 0.6, 0.1]), jnp.array([0, 3, 4])
  u_fn = lambda z, t, h: model.apply({"params": params}, z, t, y, h=h)
  _, du = jax.jvp(lambda z_, t_, r_: u_fn(z_, t_, t_ - r_), (z, t, r),
                  (v, jnp.ones_like(t), jnp.zeros_like(r)))
  eps = 1e-2
  fd = (u_fn(z + eps * v, t + eps, t + eps - r) - u_fn(z - eps * v, t - eps, t - eps - r)) / (
      2 * eps)
  np.testing.assert_allclose(du, fd, rtol=2e-2, atol=2e-3)
  assert float(jnp.abs(du).max()) > 1e-2
  with pytest.raises(ValueError, match="pass h"):
    model.apply({"params": params}, z, t, y)


def test_meanflow_is_registered_and_round_trips():
  c = tiny_config("unused", **{"objective.name": "meanflow", "objective.mf_kappa": 0.0})
  obj = objectives.from_config(c)
  assert isinstance(obj, meanflow.MeanFlow) and obj.kappa == 0.0 and obj.trained_guidance
  assert objectives.from_meta({"objective": obj.to_meta()}) == obj
  c.objective.mf_data_proportion = 1.5
  with pytest.raises(ValueError, match="mf_data_proportion"):
    objectives.from_config(c)
  t, r = meanflow.sample_tr(jax.random.PRNGKey(0), 8)
  assert bool(jnp.all(t >= r)) and bool(jnp.all(t[:6] == r[:6])) and bool(jnp.any(t[6:] > r[6:]))
  with pytest.raises(ValueError, match="trains its guidance in"):
    guidance.make_sample_fn(obj, _tiny_mf_dit()[0], guided=True)
  with pytest.raises(ValueError, match="attention_impl='splash'"):
    step.objective_model(models.DiT(), obj, "splash")
  assert step.objective_model(models.DiT(attention_impl="cudnn"), obj, "auto").attention_impl == (
      "xla")


def _mf_config(data_dir, **overrides):
  return tiny_config(data_dir, **{"objective.name": "meanflow", "model.learn_sigma": False,
                                  "data.global_batch_size": 16, **overrides})


def test_meanflow_step_on_8_devices_equals_1(digits_dir, tmp_path):  # noqa: F811
  one = train.train_and_evaluate(_mf_config(digits_dir, total_steps=2),
                                 str(tmp_path / "one"), devices=jax.devices()[:1])
  eight = train.train_and_evaluate(_mf_config(digits_dir, total_steps=2), str(tmp_path / "eight"))
  for s in (1, 2):
    np.testing.assert_allclose(eight[s]["loss"], one[s]["loss"], rtol=1e-5)
    np.testing.assert_allclose(eight[s]["v_loss"], one[s]["v_loss"], rtol=1e-4)
  _, p1, _ = final_params(str(tmp_path / "one"))
  _, p8, _ = final_params(str(tmp_path / "eight"))
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6), p1, p8)
  # Resuming bit for bit: the kill -9 test below.


def test_meanflow_main_job_resumes_after_kill_9_and_samples_at_one_step(digits_dir,  # noqa: F811
                                                                        tmp_path):
  # dit_jax.main with the MeanFlow objective, killed (SIGKILL, possibly mid-save), resumed to
  # the same parameters as an uninterrupted run, then sampled at 1 NFE by dit-sample.
  wd = str(tmp_path / "mf")
  flags = ["--config.objective.name=meanflow", "--config.model.learn_sigma=False",
           "--config.checkpoint.every_steps=2"]
  saved = kill_9_after_step_4(wd, digits_dir, *flags)
  total = saved[-1] + 2
  resumed = subprocess.run(main_cmd(wd, digits_dir, f"--config.total_steps={total}",
                                    "--config.sample.num_images=8",
                                    f"--config.sample.every_steps={total}", *flags),
                           cwd=ROOT, env=env(), capture_output=True, text=True, timeout=600)
  assert resumed.returncode == 0, resumed.stderr[-3000:]
  assert f"Resumed from step {saved[-1]}" in resumed.stderr
  assert os.path.exists(os.path.join(wd, "samples", f"step_{total:08d}.png"))
  ref = str(tmp_path / "ref")
  hist = train.train_and_evaluate(_mf_config(digits_dir, total_steps=total, **{
      "checkpoint.every_steps": 2}), ref)
  assert {"loss", "v_loss"} <= set(hist[total]) and np.isfinite(hist[total]["v_loss"])
  assert steps_saved(wd)[-1] == total
  assert_same_params(wd, ref)
  meta = checkpointing.read_meta(wd)
  assert meta["objective"]["name"] == "meanflow" and meta["model_kwargs"]["h_embedder"]
  out = str(tmp_path / "s.npz")
  run = lambda *a: subprocess.run([sys.executable, "-m", "dit_jax.sample", f"--workdir={wd}",
                                   "--num_samples=8", "--batch_size=8", f"--out={out}", *a],
                                  cwd=ROOT, env=env(), capture_output=True, text=True,
                                  timeout=600)
  r = run("--sampler=meanflow", "--steps=1", "--cfg_scale=1")
  assert r.returncode == 0, r.stderr[-2000:]
  assert np.load(out)["arr_0"].shape == (8, 8, 8, 1)
  r = run("--cfg_scale=2")
  assert r.returncode != 0 and "trains its guidance in" in r.stderr


def test_official_tree_conversion_round_trips_and_infers_the_sizes():
  model, params = _tiny_mf_dit()
  model = model.clone(num_heads=2)
  tree = meanflow.to_release(model, params)
  block = tree["net"]["blocks"]["layers_1"]
  assert block["attn"]["qkv"]["_flax_linear"]["kernel"].shape == (32, 96)
  assert block["adaLN_modulation"]["layers_1"]["_flax_linear"]["kernel"].shape == (32, 192)
  assert tree["net"]["h_embedder"]["mlp"]["layers_2"]["_flax_linear"]["bias"].shape == (32,)
  back_model, back = meanflow.from_release(tree, input_size=8, num_classes=5, num_heads=2)
  assert (back_model.depth, back_model.patch_size, back_model.in_channels,
          back_model.learn_sigma, back_model.h_embedder) == (2, 4, 2, False, True)
  jax.tree.map(np.testing.assert_array_equal, back, params)
  z = jax.random.normal(jax.random.PRNGKey(8), (2, 8, 8, 2))
  t, h, y = jnp.array([0.5, 1.0]), jnp.array([0.2, 1.0]), jnp.array([1, 4])
  np.testing.assert_array_equal(meanflow.u_fn(back_model, back)(z, t, h, y),
                                model.apply({"params": params}, z, t, y, h=h))
  with pytest.raises(ValueError, match="pass num_heads"):
    meanflow.from_release(tree, input_size=8, num_classes=5)
  with pytest.raises(ValueError, match="do not fit"):
    meanflow.from_release(tree, input_size=8, num_classes=7, num_heads=2)


def test_dit_convert_reads_an_official_meanflow_checkpoint(tmp_path):
  from flax.training import checkpoints  # pylint: disable=import-outside-toplevel
  from dit_jax import convert  # pylint: disable=import-outside-toplevel
  model = models.DiT(input_size=8, patch_size=4, in_channels=2, hidden_size=384, depth=12,
                     num_heads=6, num_classes=5, learn_sigma=False, h_embedder=True)
  params = jax.tree.map(lambda s: 0.01 * jnp.cos(jnp.arange(np.prod(s.shape))).reshape(s.shape),
                        models.param_shapes(model))
  ckpt = str(tmp_path / "official")
  checkpoints.save_checkpoint(ckpt, {"ema_params": {"params": meanflow.to_release(model, params)},
                                     "step": 7}, step=7)
  out = str(tmp_path / "converted")
  r = subprocess.run([sys.executable, "-m", "dit_jax.convert", f"--meanflow={ckpt}",
                      "--image_size=64", "--num_classes=5", f"--out={out}"], cwd=ROOT, env=env(),
                     capture_output=True, text=True, timeout=600)
  assert r.returncode == 0, r.stderr[-2000:]
  loaded, got = convert.load_converted(out)
  assert models.architecture(loaded) == models.architecture(model)
  jax.tree.map(np.testing.assert_allclose, got, params)
  assert objectives.from_meta({"objective": convert.converted_objective(out)}).name == "meanflow"

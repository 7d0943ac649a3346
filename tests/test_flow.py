"""Flow matching (SiT's transport): closed-form Gaussian data, diffusers' flow-match Euler
scheduler, torchdiffeq (SiT's own ODE solver) for heun2 and dopri5, guidance, time sampling."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.stats
import torch
import torchdiffeq
from diffusers import FlowMatchEulerDiscreteScheduler

from dit_jax import flow, models

MU, S = 0.5, 0.3  # the data: x1 ~ N(MU, S^2 I)


# SiT's paths written out independently; derivatives by autodiff, not by hand.
def _alpha_sigma(name):
  if name == "Linear":
    return (lambda t: t), (lambda t: 1 - t)
  if name == "GVP":
    return (lambda t: jnp.sin(math.pi / 2 * t)), (lambda t: jnp.cos(math.pi / 2 * t))
  log_a = lambda t: -0.25 * (1 - t) ** 2 * (20.0 - 0.1) - 0.5 * (1 - t) * 0.1
  return (lambda t: jnp.exp(log_a(t))), (lambda t: jnp.sqrt(1 - jnp.exp(2 * log_a(t))))


def _coeffs(name, t):
  """alpha, alpha', sigma, sigma' at t [B] -> each [B, 1, 1, 1]."""
  a, s = _alpha_sigma(name)
  t = jnp.asarray(t, jnp.float32)
  out = [jax.vmap(f)(t) for f in (a, jax.grad(a), s, jax.grad(s))]
  return [o.reshape(-1, 1, 1, 1) for o in out]


def _posterior(name, x, t):
  """Exact E[x1 | x_t], E[x0 | x_t] and the score of the Gaussian data's marginal p_t."""
  a, _, s, _ = _coeffs(name, t)
  var = a ** 2 * S ** 2 + s ** 2
  z = (x - a * MU) / var
  return MU + a * S ** 2 * z, s * z, -z


def exact_model(name, prediction):
  """The Bayes-optimal model of each prediction for the Gaussian data."""
  def model_fn(x, t):
    x1, x0, score = _posterior(name, x, t)
    _, da, _, ds = _coeffs(name, t)
    return {"velocity": da * x1 + ds * x0, "noise": x0, "score": score}[prediction]
  return model_fn


def marginal(name, t):
  """(mean, std) of x_t for the Gaussian data (scalars)."""
  a, _, s, _ = [float(c.squeeze()) for c in _coeffs(name, [t])]
  return a * MU, math.sqrt(a ** 2 * S ** 2 + s ** 2)


def ode_solution(name, x, t0, t1):
  """The probability-flow ODE from x at t0 to t1: affine for Gaussian data."""
  m0, s0 = marginal(name, t0)
  m1, s1 = marginal(name, t1)
  return m1 + s1 / s0 * (x - m0)


def _noise(n=1024, seed=0):
  return jax.random.normal(jax.random.PRNGKey(seed), (n, 2, 2, 2), jnp.float32)


# --- create_transport's rules and the loss targets ----------------------------------------------

@pytest.mark.parametrize("path,prediction,train_eps,sample_eps", [
    ("Linear", "velocity", 0.0, 0.0), ("GVP", "velocity", 0.0, 0.0),
    ("Linear", "noise", 1e-3, 1e-3), ("GVP", "score", 1e-3, 1e-3),
    ("VP", "velocity", 1e-5, 1e-3), ("VP", "noise", 1e-5, 1e-3)])
def test_create_transport_eps_defaults_and_intervals_follow_sit(path, prediction, train_eps,
                                                                sample_eps):
  tr = flow.create_transport(path, prediction)
  assert (tr.train_eps, tr.sample_eps) == (train_eps, sample_eps)
  singular = prediction != "velocity"
  vp = path == "VP"
  # training and ODE: VP shrinks only t1; Linear/GVP shrink both ends for score/noise.
  assert tr.interval() == ((train_eps if singular and not vp else 0.0), 1 - train_eps)
  assert tr.interval(sampling=True) == ((sample_eps if singular and not vp else 0.0),
                                        1 - sample_eps)
  # SDE: t1 = 1 - last_step_size; t0 = eps for score/noise or the SBDM form on Linear/GVP.
  for form in ("sigma", "SBDM"):
    t0, t1 = tr.interval(sde=True, sampling=True, diffusion_form=form, last_step_size=0.04)
    assert t1 == pytest.approx(0.96)
    assert t0 == (0.0 if vp or not (singular or form == "SBDM") else sample_eps)
  assert tr.interval(sde=True, sampling=True, diffusion_form="sigma")[1] == 1 - sample_eps
  # Given values win (except velocity on Linear/GVP, always 0 as in SiT).
  given = flow.create_transport(path, prediction, train_eps=0.01, sample_eps=0.02)
  assert (given.train_eps, given.sample_eps) == ((0.0, 0.0) if not singular and not vp
                                                 else (0.01, 0.02))


@pytest.mark.parametrize("path", flow.PATHS)
@pytest.mark.parametrize("prediction,loss_weight", [
    ("velocity", None), ("noise", None), ("score", None), ("noise", "likelihood"),
    ("score", "velocity")])
def test_loss_targets_closed_form(path, prediction, loss_weight):
  tr = flow.create_transport(path, prediction, loss_weight)
  k1, k0 = jax.random.split(jax.random.PRNGKey(1))
  x1 = MU + S * jax.random.normal(k1, (8, 4, 4, 2))
  x0 = jax.random.normal(k0, x1.shape)
  t = jnp.linspace(0.1, 0.9, 8)
  a, da, s, ds = _coeffs(path, t)
  target = {"velocity": da * x1 + ds * x0, "noise": x0, "score": -x0 / s}[prediction]

  def oracle(xt, tt):  # the target, recovered from x_t: wrong x_t, wrong target
    np.testing.assert_allclose(tt, t)
    x0_from_xt = (xt - a * x1) / s
    return {"velocity": da * x1 + ds * x0_from_xt, "noise": x0_from_xt,
            "score": -x0_from_xt / s}[prediction]

  got = tr.training_losses(oracle, x1, t, x0)["loss"]
  assert got.shape == (8,)
  np.testing.assert_allclose(got, 0.0, atol=1e-8)
  # A zero model: the mean squared target, weighted as SiT (D = a'/a s^2 - s s').
  zero = tr.training_losses(lambda xt, tt: jnp.zeros_like(xt), x1, t, x0)["loss"]
  d = da / a * s ** 2 - s * ds
  weight = {None: 1.0, "velocity": (d / s) ** 2, "likelihood": d / s ** 2}[loss_weight]
  if prediction == "velocity":
    weight = 1.0  # SiT weights only score and noise losses
  scaled = target * s if prediction == "score" else target
  want = jnp.mean(weight * scaled ** 2, axis=(1, 2, 3))
  np.testing.assert_allclose(zero, want, rtol=2e-5)


def test_the_objective_draws_t_and_noise_from_the_key():
  from dit_jax import objectives  # pylint: disable=import-outside-toplevel
  obj = objectives.Flow(flow.create_transport("Linear", "velocity"), learn_sigma=False)
  x1 = jnp.ones((16, 2, 2, 2))
  k_t, k_noise = jax.random.split(jax.random.PRNGKey(3))
  inputs = obj.draw(k_t, k_noise, x1)
  np.testing.assert_array_equal(inputs["t"], obj.transport.sample_t(k_t, 16))
  np.testing.assert_array_equal(inputs["noise"], jax.random.normal(k_noise, x1.shape))
  a, _ = obj.training_losses(exact_model("Linear", "velocity"), x1, inputs)
  b = obj.transport.training_losses(exact_model("Linear", "velocity"), x1, inputs["t"],
                                    inputs["noise"])
  np.testing.assert_array_equal(a, b["loss"])


def test_time_sampling_uniform_and_logit_normal():
  n = 20000
  key = jax.random.PRNGKey(4)
  tr = flow.create_transport("Linear", "noise")  # interval [1e-3, 1 - 1e-3]
  t = np.asarray(tr.sample_t(key, n))
  assert t.shape == (n,) and t.min() >= 1e-3 and t.max() <= 1 - 1e-3
  assert scipy.stats.kstest(t, "uniform", args=(1e-3, 1 - 2e-3)).pvalue > 1e-3
  m, s = 0.5, 0.8
  ln = flow.create_transport("Linear", "velocity", time_sampling="logit_normal",
                             logit_mean=m, logit_std=s)
  t = np.asarray(ln.sample_t(key, n), np.float64)
  # SD3's convention: the noise level 1 - t is logit-normal(m, s).
  noise_level = scipy.special.logit(1 - t)
  assert scipy.stats.kstest(noise_level, "norm", args=(m, s)).pvalue > 1e-3
  assert scipy.stats.kstest(t, "uniform").pvalue < 1e-6
  with pytest.raises(ValueError, match="time_sampling"):
    flow.create_transport(time_sampling="cosine")


# --- samplers on closed-form Gaussian data --------------------------------------------------------

@pytest.mark.parametrize("path,prediction,method,num_steps,tol", [
    ("Linear", "velocity", "euler", 100, 3e-2), ("Linear", "velocity", "heun2", 50, 2e-3),
    ("Linear", "velocity", "dopri5", 50, 1e-4), ("GVP", "velocity", "heun2", 50, 4e-3),
    ("GVP", "velocity", "dopri5", 50, 1e-3), ("VP", "velocity", "dopri5", 50, 2e-3),
    ("VP", "velocity", "euler", 250, 5e-2), ("Linear", "noise", "dopri5", 50, 2e-3),
    ("GVP", "score", "heun2", 100, 2e-3), ("VP", "noise", "heun2", 100, 1e-2)])
def test_ode_samplers_recover_gaussian_data(path, prediction, method, num_steps, tol):
  tr = flow.create_transport(path, prediction)
  x = _noise()
  got = jax.jit(lambda x: tr.sample_ode(exact_model(path, prediction), x, method=method,
                                        num_steps=num_steps, atol=1e-6, rtol=1e-5))(x)
  t0, t1 = tr.interval(sampling=True)
  np.testing.assert_allclose(got, ode_solution(path, np.asarray(x), t0, t1), atol=tol)
  mean, std = marginal(path, t1)  # the data itself where t1 = 1
  assert abs(float(got.mean()) - mean) < 0.01 + tol
  assert abs(float(got.std()) / std - 1) < 0.03 + tol


def _affine_last_step(path, t1, last_step, h, form):
  """(c, d) of the last step x' = c x + d with the exact model at t1."""
  def step(x):
    x = jnp.full((1, 1, 1, 1), x, jnp.float32)
    tt = jnp.full((1,), t1)
    x1, x0, score = _posterior(path, x, tt)
    a, da, s, ds = _coeffs(path, tt)
    v = da * x1 + ds * x0
    diffusion = {"sigma": s, "constant": 1.0, "linear": 1 - t1, "SBDM": da / a * s ** 2 - s * ds}
    out = {"mean": x + h * (v + diffusion[form] * score), "euler": x + h * v, "tweedie": x1,
           None: x}
    return float(out[last_step].squeeze())
  d = step(0.0)
  return step(1.0) - d, d


@pytest.mark.parametrize("path,prediction,method,form,last_step", [
    ("Linear", "velocity", "euler", "sigma", "mean"),
    ("Linear", "velocity", "heun", "sigma", "mean"),
    ("Linear", "velocity", "euler", "sigma", "tweedie"),
    ("Linear", "velocity", "euler", "linear", "euler"),
    ("VP", "noise", "euler", "SBDM", "mean"), ("GVP", "velocity", "heun", "sigma", None),
    ("VP", "velocity", "euler", "sigma", None), ("VP", "velocity", "heun", "sigma", "mean"),
    ("Linear", "noise", "euler", "constant", "mean"), ("GVP", "score", "euler", "linear", None)])
def test_sde_samplers_recover_gaussian_data(path, prediction, method, form, last_step):
  tr = flow.create_transport(path, prediction)
  x = _noise(4096)
  h = 0.04
  got = jax.jit(lambda x, k: tr.sample_sde(exact_model(path, prediction), x, k, method=method,
                                           diffusion_form=form, last_step=last_step,
                                           last_step_size=h, num_steps=100))(
                                               x, jax.random.PRNGKey(7))
  assert np.isfinite(np.asarray(got)).all()
  t0, t1 = tr.interval(sde=True, sampling=True, diffusion_form=form,
                       last_step_size=h if last_step else 0.0)
  mean, std = marginal(path, t1)
  c, d = _affine_last_step(path, t1, last_step, h, form)
  # SDE noise differs from the start noise: only the statistics are the data's.
  assert abs(float(got.mean()) - (c * mean + d)) < 0.01
  assert abs(float(got.std()) / (abs(c) * std) - 1) < 0.03
  assert float(jnp.abs(got - x).mean()) > 0.1  # it moved


def test_sbdm_with_a_zero_t0_is_an_error():
  tr = flow.create_transport("Linear", "velocity")  # sample_eps 0: D = 1/t at t0 = 0
  with pytest.raises(ValueError, match="SBDM"):
    tr.sample_sde(exact_model("Linear", "velocity"), _noise(2), jax.random.PRNGKey(0),
                  diffusion_form="SBDM")


def test_sde_uses_the_key():
  tr = flow.create_transport("Linear", "velocity")
  fn = jax.jit(lambda k: tr.sample_sde(exact_model("Linear", "velocity"), _noise(8), k,
                                       num_steps=10))
  a, b, c = fn(jax.random.PRNGKey(0)), fn(jax.random.PRNGKey(0)), fn(jax.random.PRNGKey(1))
  np.testing.assert_array_equal(a, b)
  assert not np.allclose(a, c)


# --- independent solver references --------------------------------------------------------------

def _nonlinear_velocity(x, t, lib):
  """A smooth nonlinear field: the exact velocity of Linear-path data 0.5 N(-1, .2^2) +
  0.5 N(1, .2^2) per coordinate (the posterior-weighted Gaussian velocities)."""
  t = t.reshape(-1, 1, 1, 1)
  var = t ** 2 * 0.04 + (1 - t) ** 2
  vs, logws = [], []
  for m in (-1.0, 1.0):
    z = (x - t * m) / var
    vs.append(m + (t * 0.04 - (1 - t)) * z)
    logws.append(-0.5 * (x - t * m) ** 2 / var)
  w1 = 1 / (1 + lib.exp(logws[0] - logws[1]))
  return (1 - w1) * vs[0] + w1 * vs[1]


def _torch_ode(x, method, num_steps, **kw):
  f = lambda t, y: _nonlinear_velocity(y, t.expand(y.shape[0]), torch)
  ts = torch.linspace(0, 1, num_steps, dtype=torch.float64)
  y = torch.from_numpy(np.asarray(x, np.float64))
  return torchdiffeq.odeint(f, y, ts, method=method, **kw)[-1].numpy()


def test_euler_matches_diffusers_flow_match_euler_scheduler():
  """diffusers' sigma is 1 - t and its model output is d x / d sigma = -velocity."""
  n = 12
  tr = flow.create_transport("Linear", "velocity")
  x = _noise(16)
  got = tr.sample_ode(lambda x, t: _nonlinear_velocity(x, t, jnp), x, method="euler",
                      num_steps=n)
  sched = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=1.0)
  sched.set_timesteps(sigmas=list(1 - flow.time_grid(0, 1, n)[:-1]))
  y = torch.from_numpy(np.array(x))
  for i, timestep in enumerate(sched.timesteps):
    sigma = sched.sigmas[i]
    v = _nonlinear_velocity(y, (1 - sigma).expand(y.shape[0]), torch)
    y = sched.step(-v, timestep, y).prev_sample
  np.testing.assert_allclose(got, y.numpy(), atol=2e-5)


def test_heun2_matches_torchdiffeq():
  tr = flow.create_transport("Linear", "velocity")
  x = _noise(64)
  got = tr.sample_ode(lambda x, t: _nonlinear_velocity(x, t, jnp), x, method="heun2",
                      num_steps=20)
  np.testing.assert_allclose(got, _torch_ode(x, "heun2", 20), atol=2e-5)


def test_dopri5_matches_torchdiffeq():
  tr = flow.create_transport("Linear", "velocity")
  x = _noise(64)
  got = jax.jit(lambda x: tr.sample_ode(lambda x, t: _nonlinear_velocity(x, t, jnp), x,
                                        method="dopri5", atol=1e-6, rtol=1e-3))(x)
  theirs = _torch_ode(x, "dopri5", 2, atol=1e-6, rtol=1e-3)
  truth = _torch_ode(x, "dopri5", 2, atol=1e-10, rtol=1e-10)
  err, their_err = np.abs(got - truth).max(), np.abs(theirs - truth).max()
  assert err < 1e-2 and their_err < 1e-2
  np.testing.assert_allclose(got, theirs, atol=1e-2)
  # At tight tolerances both reach the same solution.
  tight = jax.jit(lambda x: tr.sample_ode(lambda x, t: _nonlinear_velocity(x, t, jnp), x,
                                          method="dopri5", atol=1e-7, rtol=1e-6))(x)
  np.testing.assert_allclose(tight, truth, atol=2e-5)


# --- guidance -----------------------------------------------------------------------------------

def _toy_xty(x, t, y):
  """[M, H, W, C] -> [M, H, W, 2C] depending on x, t and y."""
  base = x * (1 + y.astype(x.dtype)[:, None, None, None]) + t[:, None, None, None]
  return jnp.concatenate([base, -base], axis=-1)


def _flow_cfg(y, null, scale, guided_channels=3, interval=None):
  """The guided prediction [N, ..., C] the flow samplers see (dit_jax.guidance's CFG)."""
  from dit_jax import guidance, objectives  # pylint: disable=import-outside-toplevel
  active = objectives.Flow(flow.create_transport()).guidance_predicate(interval)
  doubled = guidance.cfg_model_fn(_toy_xty, y, null, scale, guided_channels, active)
  kept = guidance.kept_half(doubled)
  return lambda x, t: kept(x, t)[..., :x.shape[-1]]


def test_cfg_guides_first_three_channels_inside_the_interval():
  x = _noise(3)[:, :, :, :1].repeat(4, axis=-1)  # [3, 2, 2, 4]
  y, null, scale = jnp.array([1, 2, 3]), 9, 2.5
  fn = _flow_cfg(y, null, scale, interval=(0.3, 0.6))
  cond = _toy_xty(x, jnp.full((3,), 0.5), y)[..., :4]
  uncond = _toy_xty(x, jnp.full((3,), 0.5), jnp.full((3,), null))[..., :4]
  inside = fn(x, jnp.full((3,), 0.5))
  assert inside.shape == x.shape
  np.testing.assert_allclose(inside[..., :3], (uncond + scale * (cond - uncond))[..., :3],
                             rtol=1e-6)
  np.testing.assert_allclose(inside[..., 3], cond[..., 3], rtol=1e-6)  # the release's quirk
  outside = fn(x, jnp.full((3,), 0.8))
  np.testing.assert_allclose(outside, _toy_xty(x, jnp.full((3,), 0.8), y)[..., :4], rtol=1e-6)
  every = _flow_cfg(y, null, scale, guided_channels=None)
  guided_all = every(x, jnp.full((3,), 0.5))
  np.testing.assert_allclose(guided_all, uncond + scale * (cond - uncond), rtol=1e-6)
  with pytest.raises(ValueError, match="guidance_interval"):
    _flow_cfg(y, null, scale, interval=(0.6, 0.3))


def test_guided_dit_sampling_with_scale_one_equals_unguided():
  from dit_jax import guidance, objectives  # pylint: disable=import-outside-toplevel
  model = models.DiT(input_size=8, patch_size=4, in_channels=4, hidden_size=32, depth=1,
                     num_heads=2, num_classes=5)
  params = model.init(jax.random.PRNGKey(0), jnp.zeros((1, 8, 8, 4)), jnp.zeros((1,)),
                      jnp.zeros((1,), jnp.int32))["params"]
  # A non-zero final layer, else the DiT's zero-initialised output makes any test pass.
  params = jax.tree.map(lambda p: p + 0.05 * jnp.cos(jnp.arange(p.size).reshape(p.shape)),
                        params)
  obj = objectives.Flow(flow.create_transport("Linear", "velocity"))
  labels, key = jnp.array([0, 3]), jax.random.PRNGKey(5)
  for sampler, steps in (("heun2", 6),):
    guided = guidance.make_sample_fn(obj, model, sampler=sampler, steps=steps,
                                     guidance_interval=(0.2, 0.7))
    plain = guidance.make_sample_fn(obj, model, sampler=sampler, steps=steps, guided=False)
    a, b = guided(params, key, labels, 1.0), plain(params, key, labels, 1.0)
    assert a.shape == (2, 8, 8, 4)
    np.testing.assert_allclose(a, b, atol=1e-5)
    assert not np.allclose(guided(params, key, labels, 4.0), b, atol=1e-3)


@pytest.mark.parametrize("sde", [False, True])
def test_batch_sharded_sampling_matches_unsharded(sde):
  from jax.sharding import Mesh, NamedSharding, PartitionSpec  # pylint: disable=import-outside-toplevel
  tr = flow.create_transport("GVP", "velocity")
  model_fn = exact_model("GVP", "velocity")
  if sde:
    loop = lambda x, k: tr.sample_sde(model_fn, x, k, method="heun", num_steps=10)
  else:
    loop = lambda x, k: tr.sample_ode(model_fn, x, method="dopri5")
  noise = _noise(16)
  mesh = Mesh(np.array(jax.devices()[:8]), ("data",))
  sharded = jax.device_put(noise, NamedSharding(mesh, PartitionSpec("data")))
  run = jax.jit(loop)
  a, b = run(noise, jax.random.PRNGKey(6)), run(sharded, jax.random.PRNGKey(6))
  assert len(b.sharding.device_set) == 8 and not b.sharding.is_fully_replicated
  np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-6, atol=1e-6)


def test_dopri5_past_its_step_limit_gives_nan(monkeypatch):
  monkeypatch.setattr(flow.samplers, "MAX_ADAPTIVE_STEPS", 3)
  tr = flow.create_transport("Linear", "velocity")
  x = tr.sample_ode(lambda x, t: _nonlinear_velocity(x, t, jnp), _noise(4), method="dopri5",
                    atol=1e-9, rtol=1e-9)
  assert np.isnan(np.asarray(x)).all()

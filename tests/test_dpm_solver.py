"""DPM-Solver++ 2M/3M/2M-SDE: diffusers step by step, exact Gaussian end to end, guidance interval."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import DPMSolverMultistepScheduler

from dit_jax import guidance
from dit_jax import models
from dit_jax import objectives
from dit_jax.diffusion import DEFAULT_STEPS
from dit_jax.diffusion import SAMPLERS
from dit_jax.diffusion import create_sampler
from dit_jax.diffusion import guidance_active
from dit_jax.diffusion import noise_levels
from dit_jax.guidance import apply_cfg
from dit_jax.guidance import cfg_model_fn
from dit_jax.guidance import limit_guidance
from dit_jax.diffusion import sample_with_cfg
from dit_jax.diffusion import space_timesteps
from test_diffusion_samplers import assert_batch_sharding_changes_nothing

T = 1000
MU, S = 0.5, 0.5
ABAR = np.cumprod(1 - np.linspace(1e-4, 0.02, T))
SIGMA = noise_levels(ABAR)
DIFFUSERS = {"dpm++2m": dict(algorithm_type="dpmsolver++", solver_order=2),
             "dpm++3m": dict(algorithm_type="dpmsolver++", solver_order=3),
             "dpm++2m-sde": dict(algorithm_type="sde-dpmsolver++", solver_order=2)}
SPACING = {"time": {}, "logsnr": {"use_lu_lambdas": True}, "karras": {"use_karras_sigmas": True}}
SOLVERS = list(DIFFUSERS)


def _scheduler(solver, spacing, steps, **kw):
  sched = DPMSolverMultistepScheduler(
      num_train_timesteps=T, beta_start=1e-4, beta_end=0.02, beta_schedule="linear",
      lower_order_final=True, final_sigmas_type="zero", **DIFFUSERS[solver],
      **SPACING[spacing], **kw)
  sched.set_timesteps(steps)
  return sched


def _nchw(a):
  return torch.from_numpy(np.ascontiguousarray(np.asarray(a, np.float32).transpose(0, 3, 1, 2)))


def _nhwc(a):
  return np.asarray(a).transpose(0, 2, 3, 1)


def _gaussian_eps(x, t):
  """The exact E[eps | x_t] for data N(MU, S^2), t original timesteps [N]."""
  tables = jnp.asarray(np.stack([ABAR, np.sqrt(1 - ABAR) / (ABAR * S ** 2 + 1 - ABAR)]),
                       jnp.float32)
  a, c = (tab[t].reshape((-1,) + (1,) * (x.ndim - 1)) for tab in tables)
  return c * (x - jnp.sqrt(a) * MU)


def _gaussian_model_fn(x, t):  # learned-sigma layout: eps then (unused) v
  eps = _gaussian_eps(x, t)
  return jnp.concatenate([eps, jnp.full_like(eps, 0.3)], axis=-1)


# Schedules and single steps against diffusers.

@pytest.mark.parametrize("spacing", list(SPACING))
@pytest.mark.parametrize("steps", [1, 7, 20, 100])
def test_spacings_match_diffusers(spacing, steps):
  sched = _scheduler("dpm++2m", spacing, steps)
  solver = create_sampler("dpm++2m", steps, spacing).process
  # diffusers' cumulative alphas are float32 (sigma(0) = 0.0100013 instead of 0.0100005), so a
  # continuous timestep within a hair of k + 1/2 may round the other way.
  theirs = sched.timesteps.numpy()
  t = np.interp(np.log(solver.sigmas[:-1]), np.log(SIGMA), np.arange(T))
  differ = solver.timesteps != theirs
  assert np.all(np.abs(solver.timesteps - theirs) <= 1)
  assert np.all(np.abs(t[differ] % 1 - 0.5) < 0.01), (t[differ], theirs[differ])
  np.testing.assert_allclose(solver.sigmas, sched.sigmas.numpy(), rtol=1e-4)
  assert solver.sigmas[-1] == 0 and np.all(np.diff(solver.sigmas) < 0)


@pytest.mark.parametrize("solver", SOLVERS)
@pytest.mark.parametrize("spacing", list(SPACING))
@pytest.mark.parametrize("steps", [8, 16])  # < 15: lower-order final steps; >= 15: not
def test_steps_match_diffusers(solver, spacing, steps):
  sched = _scheduler(solver, spacing, steps, variance_type="learned_range")
  ours = create_sampler(solver, steps, spacing).process
  rng = np.random.default_rng(steps)
  x = rng.normal(size=(2, 4, 4, 3)).astype(np.float32)  # diffusers splits 3 eps channels
  x_ref, history = _nchw(x), ours.initial_history(jnp.asarray(x))
  x = jnp.asarray(x)
  for i, t in enumerate(sched.timesteps):
    out = np.concatenate([rng.normal(size=x.shape), rng.uniform(-1, 1, size=x.shape)],
                         axis=-1).astype(np.float32)
    z = rng.normal(size=x.shape).astype(np.float32)
    x_ref = sched.step(_nchw(out), t, x_ref, variance_noise=_nchw(z)).prev_sample
    x, history = ours.step(jnp.asarray(out), x, i, history, noise=jnp.asarray(z))
    want = _nhwc(x_ref)
    np.testing.assert_allclose(np.asarray(x), want, rtol=1e-4,
                               atol=1e-4 * np.abs(want).max(), err_msg=f"step {i}")
  if steps == 16 and solver == "dpm++3m":
    assert ours.orders == [1, 2] + [3] * 13 + [1]
  if steps == 8:
    assert ours.orders[-2:] == [min(2, ours.orders[-3]), 1]


@pytest.mark.parametrize("solver,spacing", [("dpm++2m", "karras"), ("dpm++3m", "logsnr"),
                                            ("dpm++2m-sde", "time")])
def test_loop_matches_diffusers_loop(solver, spacing):
  steps, shape = 12, (2, 4, 4, 2)
  sampler = create_sampler(solver, steps, spacing)
  key = jax.random.PRNGKey(7)
  x_t = jax.random.normal(jax.random.PRNGKey(8), shape)
  got = jax.jit(lambda k, n: sampler.sample(_gaussian_model_fn, shape, k, noise=n))(key, x_t)
  # The loop's step noise: fold_in(split(key)[1], i).
  key_steps = jax.random.split(key)[1]
  sched = _scheduler(solver, spacing, steps)
  x = _nchw(x_t)
  for i, t in enumerate(sched.timesteps):
    eps = _gaussian_eps(jnp.asarray(_nhwc(x.numpy())), jnp.full((shape[0],), int(t)))
    z = jax.random.normal(jax.random.fold_in(key_steps, i), shape)
    x = sched.step(_nchw(eps), t, x, variance_noise=_nchw(z)).prev_sample
  np.testing.assert_allclose(np.asarray(got), _nhwc(x), rtol=1e-4, atol=1e-4)


# End to end with the exact predictor for data N(MU, S^2).

def _exact_ode_output(noise, last_sigma):
  """The probability-flow ODE from t = T-1 to the last sigma, then E[x_0 | x] (the last step).

  The exact flow keeps u = (x - alpha MU) / sqrt(alpha^2 S^2 + sigma_vp^2) fixed, and
  E[x_0 | x] = MU + S u / sqrt(1 + sigma^2 / S^2).
  """
  a = ABAR[-1]
  u = (np.asarray(noise, np.float64) - np.sqrt(a) * MU) / np.sqrt(a * S ** 2 + 1 - a)
  return MU + S * u / np.sqrt(1 + last_sigma ** 2 / S ** 2)


@pytest.mark.parametrize("solver,steps,tol", [("dpm++2m", 50, 0.05), ("dpm++2m", 200, 0.008),
                                              ("dpm++3m", 20, 0.06), ("dpm++3m", 50, 0.002)])
def test_ode_solvers_follow_the_exact_flow(solver, steps, tol):
  sampler = create_sampler(solver, steps, "time")
  calls = []
  counted = lambda x, t: calls.append(1) or _gaussian_model_fn(x, t)
  noise = jax.random.normal(jax.random.PRNGKey(1), (16, 16, 16, 4))
  x = jax.jit(lambda n: sampler.sample(counted, n.shape, jax.random.PRNGKey(2), noise=n))(noise)
  assert len(calls) == 1  # one lax.scan: the model is traced once
  want = _exact_ode_output(noise, sampler.process.sigmas[-2])
  err = np.abs(np.asarray(x) - want).max()
  assert err < tol, err


@pytest.mark.parametrize("solver,spacing,steps", [
    ("dpm++2m", "logsnr", 20), ("dpm++3m", "karras", 20), ("dpm++3m", "logsnr", 20),
    ("dpm++2m-sde", "time", 200), ("dpm++2m-sde", "logsnr", 100)])
def test_solvers_recover_gaussian_mean_and_std(solver, spacing, steps):
  sampler = create_sampler(solver, steps, spacing)
  x = np.asarray(jax.jit(lambda k: sampler.sample(_gaussian_model_fn, (16, 16, 16, 4), k))(
      jax.random.PRNGKey(3)))
  # The last step returns E[x_0 | x] at the last sigma, which shrinks the std slightly.
  std = S / np.sqrt(1 + sampler.process.sigmas[-2] ** 2 / S ** 2)
  # 16384 iid values: standard errors 0.004 (mean), 0.003 (std); the rest is discretization.
  assert abs(x.mean() - MU) < 0.016 and abs(x.std() - std) < 0.015, (x.mean(), x.std(), std)


def test_sde_draws_fresh_noise_ode_does_not():
  shape = (2, 4, 4, 1)
  noise = jax.random.normal(jax.random.PRNGKey(0), shape)
  for solver, random in (("dpm++2m", False), ("dpm++2m-sde", True)):
    sampler = create_sampler(solver, 6)
    run = jax.jit(lambda k: sampler.sample(_gaussian_model_fn, shape, k, noise=noise))
    a, b = np.asarray(run(jax.random.PRNGKey(1))), np.asarray(run(jax.random.PRNGKey(2)))
    assert (np.abs(a - b).max() > 1e-2) == random


# Guidance interval.

def _labelled_model_fn(x, t, y):
  scale = 1.0 + 0.05 * y.astype(jnp.float32)[:, None, None, None]
  eps = 0.3 * x * scale + 1e-4 * t.astype(jnp.float32)[:, None, None, None]
  return jnp.concatenate([eps, jnp.full_like(x, -0.5)], axis=-1)


def test_guidance_active_is_a_noise_level_interval():
  interval = (SIGMA[100], SIGMA[500])  # (lo, hi]: t = 101 .. 500
  t = jnp.array([0, 100, 101, 300, 500, 501, 999])
  assert np.asarray(guidance_active(t, interval)).tolist() == [0, 0, 1, 1, 1, 0, 0]
  adm = objectives.ADM()
  active = adm.guidance_predicate(interval)
  assert [bool(active(jnp.int32(s))) for s in t] == [False, False, True, True, True, False, False]
  assert adm.guidance_predicate((0, float("inf"))) is None
  assert adm.guidance_predicate(None) is None and adm.guidance_predicate(()) is None
  covers_all = lambda lo, hi: lo == 0 and hi == float("inf")
  assert guidance.check_interval([0.3, 5], "sigma", covers_all) == (0.3, 5.0)
  for bad in ((5.0, 0.3), (1.0,), (-1.0, 2.0)):
    with pytest.raises(ValueError, match="guidance_interval"):
      adm.guidance_predicate(bad)
  fn = lambda x, t: x
  assert limit_guidance(fn, fn, None) is fn


@pytest.mark.parametrize("name", SAMPLERS)
def test_guidance_interval_every_sampler(name):
  sampler = create_sampler(name, 8)
  y = jnp.array([1, 2])
  shape = (2, 4, 4, 4)
  steps_t = sampler.timesteps
  interval = (SIGMA[steps_t[5]] - 1e-6, SIGMA[steps_t[2]])  # guided at steps 2..5 of 8
  scale = 4.0

  def reference(x, t):  # the release's guidance with the scale set to 1 outside the interval
    half = x[: x.shape[0] // 2]
    out = _labelled_model_fn(jnp.concatenate([half, half]), t,
                             jnp.concatenate([y, jnp.full_like(y, 10)]))
    s = jnp.where(guidance_active(t[0], interval), scale, 1.0)
    return apply_cfg(out, s, 3)

  batches = []

  def counted(x, t, yy):
    jax.debug.callback(lambda n: batches.append(int(n)), x.shape[0])
    return _labelled_model_fn(x, t, yy)

  key = jax.random.PRNGKey(5)
  run = jax.jit(lambda fn, k: sample_with_cfg(sampler, fn, shape, k), static_argnums=0)
  active = lambda t: guidance_active(t, interval)
  got = run(cfg_model_fn(counted, y, 10, scale, active=active), key)
  jax.effects_barrier()
  want = run(reference, key)
  always = run(cfg_model_fn(_labelled_model_fn, y, 10, scale), key)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
  assert float(jnp.abs(got - always).max()) > 1e-3
  # Outside the interval only the conditional half is evaluated.
  assert sorted(batches) == [2] * 4 + [4] * 4, batches


def test_guided_solver_jits_once_over_scales():
  sampler = create_sampler("dpm++3m", 6, "karras")
  y = jnp.array([1, 2])
  shape = (2, 4, 4, 4)

  @jax.jit
  def sample(scale, key):
    return sample_with_cfg(sampler, cfg_model_fn(_labelled_model_fn, y, 10, scale, None),
                           shape, key)

  key = jax.random.PRNGKey(4)
  s1, s3 = sample(1.0, key), sample(3.0, key)
  assert sample._cache_size() == 1
  cond = jax.jit(lambda k: sampler.sample(lambda x, t: _labelled_model_fn(x, t, y), shape, k))(key)
  np.testing.assert_allclose(s1, cond, rtol=1e-5, atol=1e-6)
  assert float(jnp.abs(s3 - s1).max()) > 1e-3
  with pytest.raises(ValueError, match="already bound"):
    sample_with_cfg(sampler, lambda x, t: x, shape, key, sampler="ddim")


# The sampler factory, sharding, progress, guidance.make_sample_fn.

def test_create_sampler_steps_and_spacings():
  assert create_sampler("ddpm").timesteps.tolist() == space_timesteps(T, "250")[::-1]
  assert create_sampler("ddim", respacing="ddim50").timesteps.tolist() == list(
      range(980, -1, -20))
  assert all(create_sampler(n).num_steps == DEFAULT_STEPS[n] for n in SAMPLERS)
  ddim = create_sampler("ddim", 20)
  assert ddim.num_steps == 20 and ddim.timesteps[0] == 999 and ddim.timesteps[-1] == 0
  for spacing in ("logsnr", "karras"):
    kept = create_sampler("ddpm", 50, spacing).timesteps
    assert 40 < len(kept) <= 50 and kept[0] == 999 and kept[-1] == 0
    assert np.all(np.diff(kept) < 0)
    solver = create_sampler("dpm++2m", 50, spacing).process
    np.testing.assert_allclose(solver.sigmas[[0, -2]], SIGMA[[999, 0]], rtol=1e-12)
  errors = [dict(name="euler"), dict(name="ddpm", spacing="cosine"),
            dict(name="dpm++2m", respacing="250"), dict(name="ddpm", steps=10, respacing="250"),
            dict(name="ddim", steps=0), dict(name="dpm++2m", steps=0)]
  for kw in errors:
    with pytest.raises(ValueError):
      create_sampler(**kw)


def test_sharded_solver_loop_matches_unsharded():
  sampler = create_sampler("dpm++2m-sde", 5)
  assert_batch_sharding_changes_nothing(
      lambda n, k: sampler.sample(_gaussian_model_fn, n.shape, k, noise=n))


def test_solver_progress_and_output_check():
  sampler = create_sampler("dpm++3m", 10)
  seen = []
  out = jax.jit(lambda k: sampler.sample(_gaussian_model_fn, (1, 2, 2, 4), k,
                                         progress=lambda i, n: seen.append((i, n)),
                                         progress_every=5))(jax.random.PRNGKey(0))
  out.block_until_ready()
  jax.effects_barrier()
  assert sorted(seen) == [(5, 10), (10, 10)]
  with pytest.raises(ValueError, match="model_fn output"):
    sampler.sample(lambda x, t: jnp.zeros(x.shape[:-1] + (3,)), (1, 2, 2, 4),
                   jax.random.PRNGKey(0))


@pytest.fixture(scope="module")
def tiny_dit():
  model = models.DiT(input_size=4, patch_size=2, in_channels=2, hidden_size=16, depth=1,
                     num_heads=2, num_classes=3)
  params = model.init(jax.random.PRNGKey(0), jnp.zeros((1, 4, 4, 2)), jnp.zeros((1,), jnp.int32),
                      jnp.zeros((1,), jnp.int32))["params"]
  # The release zeroes the output layers; perturb them so that samples depend on the labels.
  params = jax.tree_util.tree_map(
      lambda p: p + 0.1 * jax.random.normal(jax.random.PRNGKey(p.size), p.shape), params)
  return model, params


def test_make_sample_fn_samplers_and_interval(tiny_dit):
  model, params = tiny_dit
  labels = jnp.array([0, 1, 2, 1])
  key = jax.random.PRNGKey(1)
  run = lambda scale, **kw: np.asarray(guidance.make_sample_fn(
      objectives.ADM(), model, release_cfg=False, **kw)(params, key, labels, jnp.float32(scale)))
  legacy = run(2.0, respacing="6")
  np.testing.assert_allclose(run(2.0, sampler="ddpm", steps=6), legacy, rtol=1e-6, atol=1e-6)
  for name in ("dpm++2m", "dpm++3m", "dpm++2m-sde"):
    guided = run(2.0, sampler=name, steps=5, spacing="logsnr")
    assert guided.shape == (4, 4, 4, 2) and np.isfinite(guided).all()
    # An interval that holds none of the steps: the conditional model alone.
    unguided = run(2.0, sampler=name, steps=5, spacing="logsnr", guidance_interval=(500, 600))
    cond = run(1.0, sampler=name, steps=5, spacing="logsnr", guided=False)
    np.testing.assert_allclose(unguided, cond, rtol=1e-5, atol=1e-5)
    assert np.abs(guided - cond).max() > 1e-3

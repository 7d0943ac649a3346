"""EDM (dit_jax/objectives/edm.py): the numerics against closed forms and a float64 NumPy
sampler; the objective through the registry, the train step, the samplers and the jobs."""
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dit_jax import checkpointing, guidance, models, objectives, train
from dit_jax.objectives import edm
from test_main_cli import ROOT, env
from test_train import digits_dir, tiny_config  # noqa: F401  (fixture)

SD = 0.5
MU, S = 0.3, 0.7  # the Gaussian data of the sampler and loss tests


def _np_precond(sigma, sd=SD):
  sigma = np.asarray(sigma, np.float64)
  return (sd ** 2 / (sigma ** 2 + sd ** 2), sigma * sd / np.sqrt(sigma ** 2 + sd ** 2),
          1.0 / np.sqrt(sigma ** 2 + sd ** 2), np.log(sigma) / 4.0)


def _gauss_denoise(x, sigma):
  """The exact denoiser E[x0 | x0 + sigma n = x] for x0 ~ N(MU, S^2) per dimension."""
  sigma = sigma.reshape(sigma.shape + (1,) * (x.ndim - 1))
  return MU + S ** 2 / (S ** 2 + sigma ** 2) * (x - MU)


def _gauss_raw_fn(x_in, c_noise):
  """F that makes EDM's D the exact Gaussian denoiser: the preconditioning inverted."""
  sigma = jnp.exp(4.0 * c_noise)
  c_skip, c_out, c_in, _ = edm.precondition(sigma, SD)
  b = lambda c: c.reshape(c.shape + (1,) * (x_in.ndim - 1))
  x = x_in / b(c_in)
  return (_gauss_denoise(x, sigma) - b(c_skip) * x) / b(c_out)


def _analytic_raw_fn(x_in, c_noise):
  """A nonlinear F with a float64 twin below, for comparing samplers step by step."""
  return jnp.sin(x_in) + 0.3 * c_noise.reshape(-1, 1, 1) * x_in


def _np_analytic_denoise(x, sigma):
  c_skip, c_out, c_in, c_noise = _np_precond(sigma)
  x_in = c_in * x
  return c_skip * x + c_out * (np.sin(x_in) + 0.3 * c_noise * x_in)


def _np_edm_sampler(denoise, latents, num_steps, sigma_min=0.002, sigma_max=80.0, rho=7.0,
                    S_churn=0.0, S_min=0.0, S_max=np.inf, S_noise=1.0, eps=None):
  """edm_sampler's loop in float64; eps(i) supplies the churn noise of step i."""
  idx = np.arange(num_steps, dtype=np.float64)
  t = (sigma_max ** (1 / rho) + idx / (num_steps - 1)
       * (sigma_min ** (1 / rho) - sigma_max ** (1 / rho))) ** rho
  t = np.concatenate([t, [0.0]])
  x_next = np.asarray(latents, np.float64) * t[0]
  for i in range(num_steps):
    t_cur, t_nxt = t[i], t[i + 1]
    x_cur = x_next
    gamma = min(S_churn / num_steps, np.sqrt(2) - 1) if S_min <= t_cur <= S_max else 0.0
    t_hat = t_cur + gamma * t_cur
    x_hat = x_cur
    if gamma > 0:
      x_hat = x_cur + np.sqrt(t_hat ** 2 - t_cur ** 2) * S_noise * eps(i)
    d_cur = (x_hat - denoise(x_hat, t_hat)) / t_hat
    x_next = x_hat + (t_nxt - t_hat) * d_cur
    if i < num_steps - 1:
      d_prime = (x_next - denoise(x_next, t_nxt)) / t_nxt
      x_next = x_hat + (t_nxt - t_hat) * (0.5 * d_cur + 0.5 * d_prime)
  return x_next


# 1. Preconditioning.

def test_precondition_formulas_and_identities():
  sigma = np.array([0.002, 0.1, 0.5, 1.0, 7.0, 80.0], np.float32)
  got = edm.precondition(jnp.asarray(sigma), SD)
  for g, want, name in zip(got, _np_precond(sigma), ("c_skip", "c_out", "c_in", "c_noise")):
    assert g.shape == sigma.shape and g.dtype == jnp.float32, name
    np.testing.assert_allclose(np.asarray(g), want, rtol=1e-6, atol=1e-7, err_msg=name)
  # At sigma = sd the signal and noise are balanced: c_skip = 1/2, c_out = sd / sqrt(2).
  c_skip, c_out, c_in, c_noise = edm.precondition(jnp.array([SD]), SD)
  np.testing.assert_allclose([c_skip[0], c_out[0], c_in[0], c_noise[0]],
                             [0.5, SD / np.sqrt(2), 1 / (SD * np.sqrt(2)), np.log(SD) / 4],
                             rtol=1e-6)

  # With F == 0 the denoiser is the skip connection alone.
  x = jax.random.normal(jax.random.PRNGKey(0), (sigma.size, 3, 2))
  d = edm.denoiser(lambda x_in, c: jnp.zeros_like(x_in), SD)(x, jnp.asarray(sigma))
  np.testing.assert_allclose(np.asarray(d), np.asarray(x) * _np_precond(sigma)[0][:, None, None],
                             rtol=1e-6)

  # lambda(sigma) c_out(sigma)^2 == 1: every sigma weighs F's regression target equally.
  s64 = sigma.astype(np.float64)
  lam = (s64 ** 2 + SD ** 2) / (s64 * SD) ** 2
  np.testing.assert_allclose(lam * _np_precond(s64)[1] ** 2, 1.0, rtol=1e-12)
  np.testing.assert_allclose(np.asarray(edm.loss_weight(sigma, SD)), lam, rtol=1e-6)
  np.testing.assert_allclose(np.asarray(edm.loss_weight(sigma, SD) * got[1] ** 2), 1.0, rtol=1e-5)


# 2. The loss.

def test_loss_matches_numpy_with_linear_raw_fn():
  rng = np.random.default_rng(0)
  b, h, c = 6, 4, 3
  w = rng.normal(size=(c, c))
  v = rng.normal(size=c)
  x0 = rng.normal(size=(b, h, c)).astype(np.float32)
  noise = rng.normal(size=(b, h, c)).astype(np.float32)
  sigma = np.array([0.001, 0.02, 0.3, 1.0, 5.0, 80.0], np.float32)

  def raw_fn(x_in, c_noise):
    return x_in @ jnp.asarray(w, jnp.float32) + c_noise[:, None, None] * jnp.asarray(v, jnp.float32)

  got = edm.loss(raw_fn, jnp.asarray(x0), jnp.asarray(sigma), jnp.asarray(noise), SD)
  assert got.shape == (b,) and got.dtype == jnp.float32

  c_skip, c_out, c_in, c_noise = (a[:, None, None] for a in _np_precond(sigma))
  s = sigma.astype(np.float64)[:, None, None]
  y = x0 + s * noise
  d = c_skip * y + c_out * ((c_in * y) @ w + c_noise * v)
  lam = (s ** 2 + SD ** 2) / (s * SD) ** 2
  want = (lam * (d - x0) ** 2).mean(axis=(1, 2))
  np.testing.assert_allclose(np.asarray(got), want, rtol=1e-4)


def test_sample_sigma_is_lognormal():
  sig = edm.sample_sigma(jax.random.PRNGKey(1), 40000)
  assert sig.shape == (40000,) and sig.dtype == jnp.float32
  logs = np.log(np.asarray(sig, np.float64))
  assert abs(logs.mean() - (-1.2)) < 0.03 and abs(logs.std() - 1.2) < 0.03
  logs2 = np.log(np.asarray(edm.sample_sigma(jax.random.PRNGKey(1), 40000, 0.5, 0.1), np.float64))
  assert abs(logs2.mean() - 0.5) < 0.01 and abs(logs2.std() - 0.1) < 0.01


# 3. The sampler's grid, cost and loop.

def test_sigma_steps_and_nfe():
  t = edm.sigma_steps()
  assert isinstance(t, np.ndarray) and t.dtype == np.float64 and t.shape == (19,)
  i = np.arange(18)
  want = (80 ** (1 / 7) + i / 17 * (0.002 ** (1 / 7) - 80 ** (1 / 7))) ** 7
  np.testing.assert_allclose(t[:-1], want, rtol=1e-13)
  assert t[0] == pytest.approx(80.0, rel=1e-13) and t[-2] == pytest.approx(0.002, rel=1e-12)
  assert t[-1] == 0.0 and np.all(np.diff(t) < 0)
  t5 = edm.sigma_steps(5, sigma_min=0.01, sigma_max=10.0, rho=3.0)
  np.testing.assert_allclose(t5, [10.0, *((10 ** (1 / 3) + np.arange(1, 5) / 4
                                          * (0.01 ** (1 / 3) - 10 ** (1 / 3))) ** 3), 0.0])
  assert edm.nfe(18) == 35 and edm.nfe(2) == 3


@pytest.mark.parametrize("num_steps", [2, 18])
def test_sample_calls_and_sigmas(num_steps):
  """Counts denoiser calls at run time, and checks each got one sigma for the whole batch."""
  seen = []

  def record(sigma):
    seen.append(np.asarray(sigma))

  def denoise_fn(x, sigma):
    jax.debug.callback(record, sigma, ordered=True)
    return _gauss_denoise(x, sigma)

  latents = jax.random.normal(jax.random.PRNGKey(2), (4, 3))
  out = edm.sample(None, latents, num_steps, S_churn=40.0, S_min=0.05, S_max=50.0,
                   key=jax.random.PRNGKey(3), denoise_fn=denoise_fn)
  out.block_until_ready()
  jax.effects_barrier()
  assert len(seen) == edm.nfe(num_steps) == 2 * num_steps - 1
  assert all(s.shape == (4,) and np.all(s == s[0]) for s in seen)

  t = edm.sigma_steps(num_steps)
  gamma = np.where((t[:-1] >= 0.05) & (t[:-1] <= 50.0), min(40.0 / num_steps, np.sqrt(2) - 1), 0)
  t_hat = t[:-1] * (1 + gamma)
  want = []
  for i in range(num_steps):
    want.append(t_hat[i])
    if i < num_steps - 1:
      want.append(t[i + 1])
  np.testing.assert_allclose([s[0] for s in seen], want, rtol=1e-6)


def _churn_eps(key, shape):
  return lambda i: np.asarray(jax.random.normal(jax.random.fold_in(key, i), shape, jnp.float32),
                              np.float64)


def test_sample_matches_numpy_edm_sampler():
  shape = (5, 4, 2)
  latents = jax.random.normal(jax.random.PRNGKey(4), shape)
  lat64 = np.asarray(latents, np.float64)

  got = edm.sample(_analytic_raw_fn, latents, 18)
  want = _np_edm_sampler(_np_analytic_denoise, lat64, 18)
  np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-5)

  key = jax.random.PRNGKey(5)
  churn = dict(S_churn=40.0, S_min=0.05, S_max=50.0, S_noise=1.003)
  got = edm.sample(_analytic_raw_fn, latents, 18, key=key, **churn)
  want = _np_edm_sampler(_np_analytic_denoise, lat64, 18, eps=_churn_eps(key, shape), **churn)
  np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-5)
  # The churn noise moved the sample: the comparison above is not the deterministic one again.
  assert np.abs(want - _np_edm_sampler(_np_analytic_denoise, lat64, 18)).max() > 1e-2

  # S_min and S_max on grid points: both ends of the churn range are inclusive.
  t = edm.sigma_steps(18)
  ends = dict(S_churn=40.0, S_min=float(t[12]), S_max=float(t[3]))
  got = edm.sample(_analytic_raw_fn, latents, 18, key=key, **ends)
  want = _np_edm_sampler(_np_analytic_denoise, lat64, 18, eps=_churn_eps(key, shape), **ends)
  np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-5)

  # Other grid settings (and every step churned: S_min = 0).
  kw = dict(sigma_min=0.01, sigma_max=20.0, rho=3.0, S_churn=5.0, S_noise=0.9)
  got = edm.sample(_analytic_raw_fn, latents, 7, key=key, **kw)
  want = _np_edm_sampler(_np_analytic_denoise, lat64, 7, eps=_churn_eps(key, shape), **kw)
  np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-5)


def test_sample_stochastic_needs_key():
  with pytest.raises(ValueError, match="key"):
    edm.sample(_gauss_raw_fn, jnp.zeros((2, 1)), 4, S_churn=1.0)


# 4. Gaussian data: the exact denoiser through sampler and loss.

def _gauss_latents(seed, n=20000, dims=4):
  return jax.random.normal(jax.random.PRNGKey(seed), (n, dims))


def _gauss_ode_solution(latents):
  """The probability-flow ODE keeps (x - MU) / sqrt(S^2 + sigma^2) constant along a path."""
  z = np.asarray(latents, np.float64)
  return MU + (80.0 * z - MU) * S / np.sqrt(S ** 2 + 80.0 ** 2)


def test_deterministic_sampler_reproduces_gaussian():
  latents = _gauss_latents(6)
  exact = _gauss_ode_solution(latents)
  # At EDM's 18 steps Heun's own error on this data is about 5 % of the std (the float64 loop
  # above gives the same); 40 steps (EDM's FFHQ setting) bring it under 1 %.
  x = np.asarray(edm.sample(_gauss_raw_fn, latents, 40), np.float64)
  assert abs(x.mean() - MU) < 0.01 and abs(x.std() / S - 1) < 0.02
  np.testing.assert_allclose(x, exact, atol=0.015 * np.abs(exact - MU).max())
  # Second order: doubling the steps divides the error by about four.
  err = [np.abs(np.asarray(edm.sample(_gauss_raw_fn, latents, n), np.float64) - exact).max()
         for n in (18, 36)]
  assert 3.0 < err[0] / err[1] < 6.0, err


def test_stochastic_sampler_reproduces_gaussian():
  # EDM's ImageNet-64 settings, with its 256 steps: at 18 the churned Heun steps overshoot the
  # std by about 12 %.
  latents = _gauss_latents(7)
  x = np.asarray(edm.sample(_gauss_raw_fn, latents, 256, S_churn=40.0, S_min=0.05, S_max=50.0,
                            S_noise=1.003, key=jax.random.PRNGKey(8)), np.float64)
  assert abs(x.mean() - MU) < 0.01 and abs(x.std() / S - 1) < 0.02
  # Churn re-noises along the way: the samples leave the deterministic trajectories.
  assert np.corrcoef(x.ravel(), _gauss_ode_solution(latents).ravel())[0, 1] < 0.95


def test_exact_denoiser_minimises_loss():
  n, dims = 20000, 4
  k1, k2, k3 = jax.random.split(jax.random.PRNGKey(9), 3)
  x0 = MU + S * jax.random.normal(k1, (n, dims))
  noise = jax.random.normal(k2, (n, dims))
  sigma = edm.sample_sigma(k3, n)
  exact = float(edm.loss(_gauss_raw_fn, x0, sigma, noise).mean())
  # E[lambda (D - x0)^2 | sigma] = lambda Var[x0 | y] = lambda S^2 sigma^2 / (S^2 + sigma^2).
  s = np.asarray(sigma, np.float64)
  closed = np.mean((s ** 2 + SD ** 2) / (s * SD) ** 2 * S ** 2 * s ** 2 / (S ** 2 + s ** 2))
  assert exact == pytest.approx(closed, rel=0.02)
  # A perturbation dF of F raises the expected loss by E[dF^2] (lambda c_out^2 = 1; the cross
  # term has mean zero because the exact F is the conditional mean of the target).
  _, _, c_in, c_noise = edm.precondition(sigma, SD)
  x_in = c_in[:, None] * (x0 + sigma[:, None] * noise)
  for delta in (lambda x_in, c: jnp.full_like(x_in, 0.1),
                lambda x_in, c: 0.1 * _gauss_raw_fn(x_in, c),
                lambda x_in, c: 0.1 * jnp.tanh(x_in)):
    perturbed = lambda x_in, c, delta=delta: _gauss_raw_fn(x_in, c) + delta(x_in, c)
    worse = float(edm.loss(perturbed, x0, sigma, noise).mean())
    excess = float(jnp.mean(delta(x_in, c_noise) ** 2))
    assert worse - exact == pytest.approx(excess, rel=0.3)


# 5. Broadcasting, jit, denoise_fn.

def test_denoiser_scalar_sigma_broadcasts():
  x = jax.random.normal(jax.random.PRNGKey(10), (3, 2, 2, 4))
  d = edm.denoiser(_analytic_raw_fn_4d, SD)
  np.testing.assert_array_equal(np.asarray(d(x, 1.7)), np.asarray(d(x, jnp.full((3,), 1.7))))
  with pytest.raises(ValueError, match="sigma"):
    d(x, jnp.ones((2,)))
  bad = edm.denoiser(lambda x_in, c: jnp.concatenate([x_in, x_in], -1), SD)
  with pytest.raises(ValueError, match="shape"):
    bad(x, 1.0)


def _analytic_raw_fn_4d(x_in, c_noise):
  return jnp.sin(x_in) * c_noise.reshape(-1, 1, 1, 1)


def test_sample_under_jit_and_denoise_fn():
  latents = jax.random.normal(jax.random.PRNGKey(11), (4, 3, 2))
  key = jax.random.PRNGKey(12)
  churn = dict(S_churn=40.0, S_min=0.05, S_max=50.0, S_noise=1.003)
  eager = edm.sample(_analytic_raw_fn, latents, 10, key=key, **churn)
  jitted = jax.jit(lambda lat, k: edm.sample(_analytic_raw_fn, lat, 10, key=k, **churn))
  np.testing.assert_allclose(np.asarray(jitted(latents, key)), np.asarray(eager), rtol=1e-5,
                             atol=1e-6)
  via_d = edm.sample(None, latents, 10, key=key, **churn,
                     denoise_fn=edm.denoiser(_analytic_raw_fn, SD))
  np.testing.assert_allclose(np.asarray(via_d), np.asarray(eager), rtol=1e-6, atol=1e-6)
  with pytest.raises(ValueError):
    edm.sample(None, latents, 10)

  # One scan body with the two Heun calls plus the final Euler call, whatever the step count.
  traced = []

  def counting(x, sigma):
    traced.append(sigma.shape)
    return edm.denoiser(_analytic_raw_fn, SD)(x, sigma)

  jax.make_jaxpr(lambda lat: edm.sample(None, lat, 50, denoise_fn=counting))(latents)
  assert traced == [(4,)] * 3


# --- the objective ------------------------------------------------------------------------------

def test_edm_is_registered_with_its_fields_and_round_trips_through_meta():
  assert "edm" in objectives.names()
  c = tiny_config("unused", **{"objective.name": "edm", "objective.p_mean": -1.0})
  obj = objectives.from_config(c)
  assert isinstance(obj, edm.EDM) and (obj.p_mean, obj.p_std, obj.sigma_data) == (-1.0, 1.2, 0.5)
  meta = {"objective": obj.to_meta(), "model_kwargs": {"learn_sigma": True}}
  assert objectives.from_meta(meta) == obj
  with pytest.raises(ValueError, match="unknown fields"):
    objectives.from_meta({"objective": {**obj.to_meta(), "rho_typo": 7}})
  c.objective.p_std = 0.0
  with pytest.raises(ValueError, match="config.objective.p_std"):
    objectives.from_config(c)


def test_edm_draw_and_loss_are_the_numerics_on_the_dit_time_input():
  obj = edm.EDM(learn_sigma=True)
  x0 = jax.random.normal(jax.random.PRNGKey(0), (64, 4, 4, 2)) * 0.5
  k_sigma, k_noise = jax.random.split(jax.random.PRNGKey(1))
  inputs = obj.draw(k_sigma, k_noise, x0)
  np.testing.assert_allclose(inputs["sigma"], edm.sample_sigma(k_sigma, 64))
  np.testing.assert_allclose(inputs["t"], 250.0 * np.log(np.asarray(inputs["sigma"])) / 4,
                             rtol=1e-5, atol=1e-5)
  seen = {}

  def model_fn(x, t):  # a learn_sigma output [B, ..., 2C]; the loss reads the first C
    seen["t"] = t
    return jnp.concatenate([0.1 * x, jnp.full_like(x, 7.0)], axis=-1)
  loss, logged = obj.training_losses(model_fn, x0, inputs)
  want = edm.loss(lambda x, c: 0.1 * x, x0, inputs["sigma"], inputs["noise"])
  np.testing.assert_allclose(loss, want, rtol=1e-6)
  np.testing.assert_allclose(seen["t"], inputs["t"])
  assert set(logged) == {"loss_q0", "loss_q1", "loss_q2", "loss_q3"}


def test_edm_guidance_interval_is_in_sigma():
  obj = edm.EDM()
  active = obj.guidance_predicate((0.5, 10.0))
  for sigma, want in ((0.3, False), (0.6, True), (10.0, True), (11.0, False)):
    assert bool(active(obj.model_time(jnp.float32(sigma)))) is want, sigma
  assert obj.guidance_predicate((0.0, float("inf"))) is None
  with pytest.raises(ValueError, match="guidance_interval"):
    obj.guidance_predicate((3.0, 1.0))


def test_edm_guided_dit_sampler_calls_the_model_2n_minus_1_times():
  model = models.DiT(input_size=4, patch_size=2, in_channels=2, hidden_size=16, depth=1,
                     num_heads=2, num_classes=3)
  params = model.init(jax.random.PRNGKey(0), jnp.zeros((1, 4, 4, 2)), jnp.zeros((1,)),
                      jnp.zeros((1,), jnp.int32))["params"]
  params = jax.tree.map(lambda p: p + 0.05 * jnp.cos(jnp.arange(p.size).reshape(p.shape)),
                        params)
  obj, labels, key = edm.EDM(), jnp.array([0, 1, 2]), jax.random.PRNGKey(3)
  fn = guidance.make_sample_fn(obj, model, steps=4, release_cfg=False)
  plain = guidance.make_sample_fn(obj, model, steps=4, guided=False)
  a, b = fn(params, key, labels, jnp.float32(1.0)), plain(params, key, labels, jnp.float32(1.0))
  assert a.shape == (3, 4, 4, 2) and np.isfinite(np.asarray(a)).all()
  np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)  # scale 1 is the conditional model
  assert not np.allclose(fn(params, key, labels, jnp.float32(3.0)), b, atol=1e-3)
  calls = []
  counted = model.clone()
  apply = counted.apply

  def counting_apply(*args, **kwargs):
    calls.append(1)
    return apply(*args, **kwargs)
  object.__setattr__(counted, "apply", counting_apply)
  jax.make_jaxpr(lambda p: guidance.make_sample_fn(obj, counted, steps=5, guided=False)(
      p, key, labels, jnp.float32(1.0)))(params)
  assert len(calls) == 3  # the scan body traces its 2 calls once, the final Euler step 1
  churned = guidance.make_sample_fn(obj, model, steps=4, guided=False, S_churn=10.0)
  assert not np.allclose(churned(params, key, labels, jnp.float32(1.0)), b, atol=1e-4)
  with pytest.raises(ValueError, match="spacing='karras' is a sampler option of the adm"):
    guidance.make_sample_fn(obj, model, spacing="karras")


def test_edm_main_job_trains_checkpoints_and_samples(digits_dir, tmp_path):  # noqa: F811
  wd = str(tmp_path / "edm")
  c = tiny_config(digits_dir, total_steps=3, **{
      "objective.name": "edm", "sample.num_images": 8, "sample.steps": 3})
  hist = train.train_and_evaluate(c, wd)
  assert all(np.isfinite(hist[s]["loss"]) for s in (1, 2, 3))
  assert {"loss_q0", "loss_q3"} <= set(hist[3]) and "vb" not in hist[3]
  assert os.path.exists(os.path.join(wd, "samples", "step_00000003.png"))
  meta = checkpointing.read_meta(wd)
  assert meta["objective"]["name"] == "edm"
  out = str(tmp_path / "s.npz")
  r = subprocess.run([sys.executable, "-m", "dit_jax.sample", f"--workdir={wd}",
                      "--num_samples=8", "--batch_size=8", "--steps=3", "--cfg_scale=2",
                      "--guidance_interval=0.1,20", "--sampler_options=S_churn=5,S_max=50",
                      f"--out={out}"], cwd=ROOT, env=env(), capture_output=True, text=True,
                     timeout=600)
  assert r.returncode == 0, r.stderr[-2000:]
  assert np.load(out)["arr_0"].shape == (8, 8, 8, 1)
  r = subprocess.run([sys.executable, "-m", "dit_jax.sample", f"--workdir={wd}",
                      "--sampler=ddpm", f"--out={out}"], cwd=ROOT, env=env(),
                     capture_output=True, text=True, timeout=600)
  assert r.returncode != 0 and "edm objective" in r.stderr

"""Diffusion process, respacing and training loss against closed forms (float64 numpy)."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dit_jax.diffusion import create_diffusion
from dit_jax.diffusion import get_named_beta_schedule
from dit_jax.diffusion import losses
from dit_jax.diffusion import space_timesteps

T = 1000


def _np_betas():
  return np.linspace(1e-4, 0.02, T)


def _np_normal_kl(m1, lv1, m2, lv2):
  # KL(N1 || N2) = log(s2/s1) + (s1^2 + (m1-m2)^2) / (2 s2^2) - 1/2.
  v1, v2 = np.exp(lv1), np.exp(lv2)
  return 0.5 * (lv2 - lv1) + (v1 + (m1 - m2) ** 2) / (2 * v2) - 0.5


def _np_cdf(x):
  # ADM's tanh approximation of the standard normal CDF.
  return 0.5 * (1 + np.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x ** 3)))


def _np_disc_loglik(x, mean, log_scale):
  std = np.exp(log_scale)
  upper = _np_cdf((x - mean + 1 / 255) / std)
  lower = _np_cdf((x - mean - 1 / 255) / std)
  p = np.where(x < -0.999, upper, np.where(x > 0.999, 1 - lower, upper - lower))
  return np.log(np.maximum(p, 1e-12))


# Process tables.

def test_linear_schedule_and_cumulative_alphas():
  d = create_diffusion("")
  np.testing.assert_allclose(d.betas, _np_betas(), rtol=1e-12)
  ab = np.cumprod(1 - _np_betas())
  np.testing.assert_allclose(d.alphas_cumprod, ab, rtol=1e-12)
  assert d.alphas_cumprod_prev[0] == 1.0
  np.testing.assert_allclose(d.alphas_cumprod_prev[1:], ab[:-1], rtol=1e-12)
  np.testing.assert_allclose(get_named_beta_schedule("linear", 250), np.linspace(4e-4, 0.08, 250))
  cos = get_named_beta_schedule("cosine", 100)
  f = lambda s: math.cos((s + 0.008) / 1.008 * math.pi / 2) ** 2
  np.testing.assert_allclose(np.cumprod(1 - cos)[:50], [f((i + 1) / 100) / f(0) for i in range(50)],
                             rtol=1e-9)
  with pytest.raises(ValueError, match="noise_schedule"):
    create_diffusion("", noise_schedule="quadratic")


def test_posterior_coefficients_from_bayes_rule():
  d = create_diffusion("")
  b = _np_betas()
  ab = np.cumprod(1 - b)
  abp = np.append(1.0, ab[:-1])
  t = np.arange(1, T)
  # x_{t-1} | x0 ~ N(sqrt(abp) x0, 1 - abp); x_t | x_{t-1} ~ N(sqrt(1-b) x_{t-1}, b).
  prec = 1 / (1 - abp[t]) + (1 - b[t]) / b[t]
  var = 1 / prec
  np.testing.assert_allclose(d.posterior_variance[t], var, rtol=1e-9)
  np.testing.assert_allclose(d.posterior_mean_coef1[t], var * np.sqrt(abp[t]) / (1 - abp[t]),
                             rtol=1e-9)
  np.testing.assert_allclose(d.posterior_mean_coef2[t], var * np.sqrt(1 - b[t]) / b[t], rtol=1e-9)
  assert d.posterior_variance[0] == 0.0
  np.testing.assert_allclose(d.posterior_log_variance_clipped[:2], np.log(var[0]), rtol=1e-12)


def test_q_sample_and_xstart_roundtrip():
  d = create_diffusion("")
  k1, k2 = jax.random.split(jax.random.PRNGKey(0))
  x0 = jax.random.normal(k1, (5, 4, 4, 3))
  eps = jax.random.normal(k2, x0.shape)
  t = jnp.array([0, 10, 250, 600, 999])
  xt = d.q_sample(x0, t, eps)
  ab = np.cumprod(1 - _np_betas())[np.asarray(t)][:, None, None, None]
  np.testing.assert_allclose(xt, np.sqrt(ab) * x0 + np.sqrt(1 - ab) * eps, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(d.predict_eps_from_xstart(xt, t, x0), eps, rtol=1e-3, atol=2e-3)
  np.testing.assert_allclose(d.predict_xstart_from_eps(xt, t, eps)[1:], x0[1:], atol=2e-4)


def test_normal_kl_and_discretized_likelihood():
  rng = np.random.default_rng(0)
  m1, m2 = rng.normal(size=(2, 64))
  lv1, lv2 = rng.normal(size=(2, 64))
  np.testing.assert_allclose(losses.normal_kl(m1, lv1, m1, lv1), 0.0, atol=1e-6)
  np.testing.assert_allclose(losses.normal_kl(m1, lv1, m2, lv2), _np_normal_kl(m1, lv1, m2, lv2),
                             rtol=1e-5, atol=1e-6)
  bins = jnp.asarray(np.arange(256) / 127.5 - 1.0, jnp.float32)
  for mean, log_scale in [(0.0, -1.0), (0.3, -3.0), (-0.9, -5.0), (0.0, 0.5)]:
    logp = losses.discretized_gaussian_log_likelihood(bins, mean, jnp.float32(log_scale))
    assert abs(float(jnp.sum(jnp.exp(logp))) - 1.0) < 1e-4
    want = _np_disc_loglik(np.asarray(bins, np.float64), mean, log_scale)
    # Far-tail bins (p < 1e-5) are below float32 resolution of 1 - cdf.
    keep = want > np.log(1e-5)
    np.testing.assert_allclose(np.asarray(logp)[keep], want[keep], rtol=1e-3, atol=1e-4)


# Respacing.

def test_respacing_250_is_release_list():
  kept = space_timesteps(T, "250")
  assert len(kept) == 250
  assert kept[:6] == [0, 4, 8, 12, 16, 20] and kept[-3:] == [991, 995, 999]
  assert kept[125] == 502  # 125 * 999 / 249 = 501.506
  assert kept == [int(v) for v in np.round(np.linspace(0, 999, 250))]
  assert space_timesteps(T, "ddim50") == list(range(0, 1000, 20))
  assert space_timesteps(T, "ddim250") == list(range(0, 1000, 4))
  assert space_timesteps(T, "") == list(range(T))
  assert space_timesteps(T, "10,5") == [0, 55, 111, 166, 222, 277, 333, 388, 444, 499,
                                        500, 625, 750, 874, 999]  # round(249.5) = 250: half to even
  for bad in ["ddim7x", "ddim999", "abc", "2000"]:
    with pytest.raises(ValueError, match="timestep_respacing"):
      space_timesteps(T, bad)


def test_respaced_process_keeps_cumulative_alphas_and_original_timesteps():
  base = create_diffusion("")
  d = create_diffusion("250")
  kept = space_timesteps(T, "250")
  assert d.num_timesteps == 250
  np.testing.assert_allclose(d.alphas_cumprod, base.alphas_cumprod[kept], rtol=1e-12)
  seen = []

  def model_fn(x, t):
    seen.append(np.asarray(t))
    return jnp.zeros(x.shape[:-1] + (2 * x.shape[-1],))
  d.p_mean_variance(model_fn, jnp.zeros((3, 2, 2, 4)), jnp.array([0, 1, 249]))
  np.testing.assert_array_equal(seen[0], [0, 4, 999])
  assert seen[0].dtype == np.int32


# Training loss.

def _np_hybrid(x0, eps, t_np, out, abar_tab):
  """Independent float64 hybrid loss: (loss, mse, vb) per example."""
  b = 1 - abar_tab / np.append(1.0, abar_tab[:-1])
  results = []
  for i, t in enumerate(t_np):
    ab = abar_tab[t]
    abp = abar_tab[t - 1] if t > 0 else 1.0
    xt = np.sqrt(ab) * x0[i] + np.sqrt(1 - ab) * eps[i]
    c = x0.shape[-1]
    eps_hat, v = out[i, ..., :c], out[i, ..., c:]
    mse = np.mean((eps[i] - eps_hat) ** 2)
    post_var = lambda s: b[s] * (1 - (abar_tab[s - 1] if s > 0 else 1.0)) / (1 - abar_tab[s])
    min_log = np.log(post_var(max(t, 1)))
    log_var = (v + 1) / 2 * np.log(b[t]) + (1 - v) / 2 * min_log
    x0_hat = (xt - np.sqrt(1 - ab) * eps_hat) / np.sqrt(ab)

    def post_mean(x_start):
      return (np.sqrt(abp) * b[t] * x_start + np.sqrt(1 - b[t]) * (1 - abp) * xt) / (1 - ab)
    if t == 0:
      vb = -np.mean(_np_disc_loglik(x0[i], post_mean(x0_hat), 0.5 * log_var)) / np.log(2)
    else:
      vb = np.mean(_np_normal_kl(post_mean(x0[i]), min_log, post_mean(x0_hat), log_var)) / np.log(2)
    results.append((mse + vb, mse, vb))
  return np.asarray(results).T


def _batch(n=6, hw=4, c=3, seed=0):
  rng = np.random.default_rng(seed)
  x0 = (rng.integers(0, 256, size=(n, hw, hw, c)) / 127.5 - 1.0)
  eps = rng.normal(size=x0.shape)
  out = np.concatenate([eps + 0.3 * rng.normal(size=x0.shape),
                        rng.uniform(-1, 1, size=x0.shape)], axis=-1)
  return x0, eps, out


def test_hybrid_loss_matches_float64_formulas():
  d = create_diffusion("")
  x0, eps, out = _batch()
  t = np.array([0, 0, 1, 17, 500, 999])
  got = jax.jit(lambda x0, t, eps, out: d.training_losses(
      lambda x, tt: out, x0, t, noise=eps))(
          jnp.asarray(x0, jnp.float32), jnp.asarray(t, jnp.int32),
          jnp.asarray(eps, jnp.float32), jnp.asarray(out, jnp.float32))
  loss, mse, vb = _np_hybrid(x0, eps, t, out, np.cumprod(1 - _np_betas()))
  np.testing.assert_allclose(got["mse"], mse, rtol=1e-4)
  # t = 0 is the decoder NLL (bits), sizeable; t > 0 KLs are small.
  assert np.all(vb[:2] > 1.0)
  np.testing.assert_allclose(got["vb"], vb, rtol=2e-3, atol=2e-5)
  np.testing.assert_allclose(got["loss"], loss, rtol=2e-3, atol=2e-5)
  for name in ("loss", "mse", "vb"):
    assert got[name].shape == (6,) and got[name].dtype == jnp.float32


def test_loss_variants_and_errors():
  x0, eps, out = _batch(n=2)
  x0, eps, out = (jnp.asarray(a, jnp.float32) for a in (x0, eps, out))
  t = jnp.array([3, 700])
  full = create_diffusion("").training_losses(lambda x, tt: out, x0, t, noise=eps)
  fixed = create_diffusion("", learn_sigma=False).training_losses(
      lambda x, tt: out[..., :3], x0, t, noise=eps)
  np.testing.assert_allclose(fixed["loss"], full["mse"], rtol=1e-6)
  np.testing.assert_array_equal(fixed["vb"], 0.0)
  kl = create_diffusion("", use_kl=True).training_losses(lambda x, tt: out, x0, t, noise=eps)
  np.testing.assert_allclose(kl["loss"], 1000 * full["vb"], rtol=1e-5)
  with pytest.raises(ValueError, match="model_fn output"):
    create_diffusion("").training_losses(lambda x, tt: out[..., :3], x0, t, noise=eps)
  with pytest.raises(ValueError, match="noise: shape"):
    create_diffusion("").training_losses(lambda x, tt: out, x0, t, eps[:1])


def test_rescaled_mse_scales_vb():
  x0, eps, out = _batch(n=2)
  x0, eps, out = (jnp.asarray(a, jnp.float32) for a in (x0, eps, out))
  t = jnp.array([3, 200])
  plain = create_diffusion("", diffusion_steps=250)
  resc = create_diffusion("", rescale_learned_sigmas=True, diffusion_steps=250)
  a = plain.training_losses(lambda x, tt: out, x0, t, noise=eps)
  b = resc.training_losses(lambda x, tt: out, x0, t, noise=eps)
  np.testing.assert_allclose(b["vb"], 0.25 * a["vb"], rtol=1e-6)


def test_gradients_split_between_mean_and_variance():
  d = create_diffusion("")
  x0, eps, out = _batch(n=4, seed=1)
  x0, eps, out = (jnp.asarray(a, jnp.float32) for a in (x0, eps, out))
  t = jnp.array([0, 5, 300, 999])

  @jax.jit
  def grads(o):
    def term(name):
      return jax.grad(lambda o: jnp.sum(
          d.training_losses(lambda x, tt: o, x0, t, noise=eps)[name]))(o)
    return term("vb"), term("mse"), term("loss")
  g_vb, g_mse, g_loss = grads(out)
  assert np.all(np.asarray(g_vb[..., :3]) == 0.0)
  assert np.all(np.asarray(g_mse[..., 3:]) == 0.0)
  assert float(jnp.abs(g_vb[..., 3:]).max()) > 0 and float(jnp.abs(g_mse[..., :3]).max()) > 0
  np.testing.assert_allclose(g_loss, g_vb + g_mse, rtol=1e-5, atol=1e-8)
  # eps-gradient of mse is the analytic 2 (eps_hat - eps) / (H W C).
  np.testing.assert_allclose(g_mse[..., :3], 2 * (out[..., :3] - eps) / 48, rtol=1e-5, atol=1e-7)


def test_decoder_nll_at_t0():
  d = create_diffusion("")
  x0, eps, out = _batch(n=3, seed=2)
  out[..., 3:] = np.array([-1.0, 0.0, 1.0])[:, None, None, None]
  got = d.training_losses(lambda x, tt: jnp.asarray(out, jnp.float32),
                          jnp.asarray(x0, jnp.float32), jnp.zeros(3, jnp.int32),
                          noise=jnp.asarray(eps, jnp.float32))["vb"]
  b = _np_betas()
  ab0 = 1 - b[0]
  xt = np.sqrt(ab0) * x0 + np.sqrt(1 - ab0) * eps
  mean = (xt - np.sqrt(1 - ab0) * out[..., :3]) / np.sqrt(ab0)  # posterior mean = x0_hat at t=0
  pv1 = b[1] * (1 - ab0) / (1 - ab0 * (1 - b[1]))
  for i, v in enumerate([-1.0, 0.0, 1.0]):
    log_var = (v + 1) / 2 * np.log(b[0]) + (1 - v) / 2 * np.log(pv1)
    want = -np.mean(_np_disc_loglik(x0[i], mean[i], 0.5 * log_var)) / np.log(2)
    np.testing.assert_allclose(got[i], want, rtol=1e-3)

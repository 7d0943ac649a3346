"""DDPM/DDIM samplers: diffusers steps, exact Gaussian end to end, guidance, sharding."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler
from diffusers import DDPMScheduler
from jax.sharding import Mesh
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from dit_jax.diffusion import create_diffusion
from dit_jax.diffusion import sample_with_cfg
from dit_jax.diffusion import space_timesteps
from dit_jax.guidance import apply_cfg
from dit_jax.guidance import cfg_model_fn

T = 1000
MU, S = 0.5, 0.5
ABAR = np.cumprod(1 - np.linspace(1e-4, 0.02, T))


def _nchw(a):
  return torch.from_numpy(np.ascontiguousarray(np.asarray(a, np.float32).transpose(0, 3, 1, 2)))


def _nhwc(a):
  return np.asarray(a).transpose(0, 2, 3, 1)


# Single steps against diffusers.

@pytest.mark.parametrize("index", [249, 120, 1, 0])
def test_ddpm_step_matches_diffusers_learned_range(index):
  kept = space_timesteps(T, "250")
  sched = DDPMScheduler(num_train_timesteps=T, beta_start=1e-4, beta_end=0.02,
                        beta_schedule="linear", variance_type="learned_range",
                        clip_sample=False, prediction_type="epsilon")
  sched.set_timesteps(timesteps=kept[::-1])
  rng = np.random.default_rng(index)
  x = rng.normal(size=(2, 4, 4, 4)).astype(np.float32)
  out = np.concatenate([rng.normal(size=x.shape), rng.uniform(-1, 1, size=x.shape)],
                       axis=-1).astype(np.float32)
  want = sched.step(_nchw(out), kept[index], _nchw(x),
                    generator=torch.Generator().manual_seed(index)).prev_sample
  z = _nhwc(torch.randn((2, 4, 4, 4), generator=torch.Generator().manual_seed(index)))
  d = create_diffusion("250")
  got = d.p_sample(lambda xx, tt: jnp.asarray(out), jnp.asarray(x),
                   jnp.full((2,), index, jnp.int32), noise=jnp.asarray(z))["sample"]
  np.testing.assert_allclose(got, _nhwc(want), rtol=2e-4, atol=2e-5)


@pytest.mark.parametrize("index,eta", [(49, 0.0), (25, 0.0), (0, 0.0), (30, 1.0), (1, 0.5)])
def test_ddim_step_matches_diffusers(index, eta):
  sched = DDIMScheduler(num_train_timesteps=T, beta_start=1e-4, beta_end=0.02,
                        beta_schedule="linear", clip_sample=False, set_alpha_to_one=True,
                        steps_offset=0, timestep_spacing="leading")
  sched.set_timesteps(50)
  kept = space_timesteps(T, "ddim50")
  assert sched.timesteps.tolist() == kept[::-1]
  rng = np.random.default_rng(100 + index)
  x = rng.normal(size=(2, 4, 4, 4)).astype(np.float32)
  eps = rng.normal(size=x.shape).astype(np.float32)
  z = rng.normal(size=x.shape).astype(np.float32)
  want = sched.step(_nchw(eps), kept[index], _nchw(x), eta=eta, variance_noise=_nchw(z)).prev_sample
  d = create_diffusion("ddim50")
  out = jnp.concatenate([eps, np.zeros_like(eps)], axis=-1)
  got = d.ddim_sample(lambda xx, tt: out, jnp.asarray(x), jnp.full((2,), index, jnp.int32),
                      eta=eta, noise=jnp.asarray(z))["sample"]
  np.testing.assert_allclose(got, _nhwc(want), rtol=2e-4, atol=5e-5)


# End to end with the exact predictor for data N(MU, S^2).

def _gaussian_model_fn(kept):
  """Exact eps and exact reverse variance (as a learned-range v) for N(MU, S^2) data."""
  ab = ABAR[kept]
  abp = np.append(1.0, ab[:-1])
  beta = 1 - ab / abp
  post_var = beta * (1 - abp) / (1 - ab)
  min_log = np.log(np.append(post_var[1], post_var[1:]))
  var_x0_given_xt = S ** 2 * (1 - ab) / (ab * S ** 2 + 1 - ab)
  coef1 = beta * np.sqrt(abp) / (1 - ab)
  true_var = post_var + coef1 ** 2 * var_x0_given_xt  # Var(x_prev | x_t)
  v = 2 * (np.log(true_var) - min_log) / (np.log(beta) - min_log) - 1
  tables = np.zeros((3, T))
  tables[:, kept] = [ab, np.sqrt(1 - ab) / (ab * S ** 2 + 1 - ab), v]
  tables = jnp.asarray(tables, jnp.float32)

  def model_fn(x, t):
    a, c, vv = (tab[t][:, None, None, None] for tab in tables)
    eps = c * (x - jnp.sqrt(a) * MU)  # E[eps | x_t]
    return jnp.concatenate([eps, jnp.broadcast_to(vv, x.shape)], axis=-1)
  return model_fn


def test_ddpm250_recovers_gaussian():
  d = create_diffusion("250")
  model_fn = _gaussian_model_fn(d.timestep_map)
  calls = []
  counted = lambda x, t: calls.append(1) or model_fn(x, t)
  x = jax.jit(lambda k: d.p_sample_loop(counted, (16, 16, 16, 4), k))(jax.random.PRNGKey(0))
  assert len(calls) == 1  # the loop body is traced once: one lax.scan
  x = np.asarray(x)
  # 16384 iid values: standard errors 0.004 (mean), 0.003 (std).
  assert abs(x.mean() - MU) < 0.016 and abs(x.std() - S) < 0.012, (x.mean(), x.std())


def test_ddim50_matches_closed_form_map():
  d = create_diffusion("ddim50")
  kept = d.timestep_map
  noise = jax.random.normal(jax.random.PRNGKey(1), (16, 16, 16, 4))
  x = np.asarray(jax.jit(lambda n: d.ddim_sample_loop(
      _gaussian_model_fn(kept), n.shape, jax.random.PRNGKey(2), noise=n))(noise))
  # With the exact eps each DDIM step is affine, x_prev = A x + B; compose them in float64.
  a_tot, b_tot = 1.0, 0.0
  for i in reversed(range(len(kept))):
    a, ap = ABAR[kept[i]], (ABAR[kept[i - 1]] if i else 1.0)
    c = np.sqrt(1 - a) / (a * S ** 2 + 1 - a)
    a_step = np.sqrt(ap) * (1 - np.sqrt(1 - a) * c) / np.sqrt(a) + np.sqrt(1 - ap) * c
    b_step = (np.sqrt(ap) * np.sqrt(1 - a) / np.sqrt(a) - np.sqrt(1 - ap)) * c * np.sqrt(a) * MU
    a_tot, b_tot = a_step * a_tot, a_step * b_tot + b_step
  np.testing.assert_allclose(x, a_tot * np.asarray(noise) + b_tot, rtol=1e-4, atol=1e-4)
  # DDIM-50 shrinks the spread by ~5.5% for this data (discretization error, not noise).
  assert abs(x.mean() - MU) < 0.016 and abs(x.std() - S) < 0.035, (x.mean(), x.std())


# Guidance.

def _labelled_model_fn(x, t, y):
  scale = 1.0 + 0.01 * y.astype(jnp.float32)[:, None, None, None]
  eps = 0.3 * x * scale + 1e-4 * t.astype(jnp.float32)[:, None, None, None]
  return jnp.concatenate([eps, jnp.full_like(x, -0.5)], axis=-1)


def test_apply_cfg_release_quirk_and_all_channels():
  rng = np.random.default_rng(0)
  out = rng.normal(size=(4, 2, 2, 8)).astype(np.float32)
  cond, uncond = out[:2], out[2:]
  for channels in (3, 4):
    got = np.asarray(apply_cfg(jnp.asarray(out), 1.5, channels))
    guided = uncond[..., :channels] + 1.5 * (cond[..., :channels] - uncond[..., :channels])
    np.testing.assert_allclose(got[:2, ..., :channels], guided, rtol=1e-6)
    np.testing.assert_allclose(got[2:, ..., :channels], guided, rtol=1e-6)
    np.testing.assert_array_equal(got[..., channels:], out[..., channels:])
  with pytest.raises(ValueError, match="guided_channels"):
    apply_cfg(jnp.asarray(out), 1.5, 9)


def test_guidance_with_identical_outputs_is_noop():
  d = create_diffusion("25")
  y = jnp.array([3, 7])
  unlabelled = lambda x, t, y: _labelled_model_fn(x, t, jnp.zeros_like(y))
  key = jax.random.PRNGKey(3)
  shape = (2, 4, 4, 4)
  want = jax.jit(lambda k: d.p_sample_loop(lambda x, t: unlabelled(x, t, y), shape, k))(key)
  got = jax.jit(lambda k: sample_with_cfg(d, cfg_model_fn(unlabelled, y, 10, 4.0), shape, k))(key)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_guided_sampler_jits_once_over_scales():
  d = create_diffusion("ddim10")
  y = jnp.array([1, 2])
  shape = (2, 4, 4, 4)

  @jax.jit
  def sample(scale, key):
    fn = cfg_model_fn(_labelled_model_fn, y, 10, scale, guided_channels=None)
    return sample_with_cfg(d, fn, shape, key, sampler="ddim")

  key = jax.random.PRNGKey(4)
  s1, s3 = sample(1.0, key), sample(3.0, key)
  assert sample._cache_size() == 1
  cond_fn = lambda x, t: _labelled_model_fn(x, t, y)
  cond = jax.jit(lambda k: d.ddim_sample_loop(cond_fn, shape, k))(key)
  np.testing.assert_allclose(s1, cond, rtol=1e-5, atol=1e-6)
  assert float(jnp.abs(s3 - s1).max()) > 1e-3


# Sharding and progress.

def assert_batch_sharding_changes_nothing(loop):
  """loop(noise, key) -> samples: the same samples, kept sharded, from batch-sharded noise."""
  noise = jax.random.normal(jax.random.PRNGKey(5), (16, 4, 4, 2))
  mesh = Mesh(np.array(jax.devices()[:8]), ("data",))
  sharded = jax.device_put(noise, NamedSharding(mesh, P("data")))
  run = jax.jit(loop)
  key = jax.random.PRNGKey(6)
  a, b = run(noise, key), run(sharded, key)
  assert len(b.sharding.device_set) == 8 and not b.sharding.is_fully_replicated
  np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-6, atol=1e-6)


def test_batch_sharded_loop_matches_unsharded():
  d = create_diffusion("10")
  model_fn = _gaussian_model_fn(d.timestep_map)
  assert_batch_sharding_changes_nothing(
      lambda n, k: d.p_sample_loop(model_fn, n.shape, k, noise=n))


def test_progress_callback_and_errors():
  d = create_diffusion("10")
  seen = []
  fn = lambda x, t: jnp.zeros(x.shape[:-1] + (8,))
  report = lambda i, n: seen.append((i, n))
  out = jax.jit(lambda k: d.p_sample_loop(fn, (1, 2, 2, 4), k, progress=report,
                                          progress_every=5))(jax.random.PRNGKey(0))
  out.block_until_ready()
  jax.effects_barrier()
  assert sorted(seen) == [(5, 10), (10, 10)]
  with pytest.raises(ValueError, match="noise"):
    d.p_sample_loop(fn, (1, 2, 2, 4), jax.random.PRNGKey(0), noise=jnp.zeros((2, 2, 2, 4)))
  with pytest.raises(ValueError, match="sampler"):
    sample_with_cfg(d, fn, (1, 2, 2, 4), jax.random.PRNGKey(0), sampler="euler")

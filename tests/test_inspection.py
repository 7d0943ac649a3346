"""dit-inspect: its numbers on models built to have known internals, and its outputs on a
trained demo checkpoint."""

import json
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dit_jax import inspection, models, train
from test_train import digits_dir, tiny_config  # noqa: F401  (fixture)


def _model_and_params():
  model = models.DiT(input_size=8, patch_size=2, in_channels=1, hidden_size=32, depth=2,
                     num_heads=2, num_classes=10)
  params = nn.meta.unbox(model.init(jax.random.PRNGKey(0), jnp.zeros((1, 8, 8, 1)),
                                    jnp.zeros((1,), jnp.int32), jnp.zeros((1,), jnp.int32)))
  return model, jax.tree.map(np.array, params["params"])


def test_known_attention_and_adaln_patterns():
  model, p = _model_and_params()
  d, t = 32, 16
  # Block 0: q = 0 (kernel and bias zero) -> every logit 0 -> uniform attention 1/T.
  p["blocks_0"]["attn"]["qkv"]["kernel"][:, :d] = 0
  p["blocks_0"]["attn"]["qkv"]["bias"][:d] = 0
  # Block 1 keeps its weights: its map is compared with softmax(q k^T / sqrt(hd)) below.
  # adaLN: kernels zero, biases constants per chunk -> |chunk| means are those constants.
  for b in ("blocks_0", "blocks_1"):
    k = p[b]["adaLN_modulation"]
    k["kernel"][:] = 0
    k["bias"][:] = np.repeat(np.arange(1.0, 7.0), d)  # shift 1, scale 2, gate 3, 4, 5, 6
  x = jax.random.normal(jax.random.PRNGKey(1), (2, 8, 8, 1))
  tt, y = jnp.array([10, 900]), jnp.array([1, 2])
  out, inter = inspection.intermediates(model, p, x, tt, y)
  np.testing.assert_allclose(out, model.apply({"params": p}, x, tt, y), atol=1e-6)  # unchanged
  attn = np.asarray(inter["attention"])
  assert attn.shape == (2, 2, 2, t, t)
  np.testing.assert_allclose(attn.sum(-1), 1.0, atol=1e-5)
  np.testing.assert_allclose(attn[0], 1.0 / t, atol=1e-7)
  # Block 1 against its closed form: softmax(q k^T / sqrt(hd)) from the block's own input.
  _, hidden = model.apply({"params": p}, x, tt, y, capture=0)
  normed = (hidden - hidden.mean(-1, keepdims=True)) / jnp.sqrt(hidden.var(-1, keepdims=True)
                                                                + 1e-6)
  mod = np.repeat(np.arange(1.0, 7.0), d).reshape(6, d)
  h_in = normed * (1 + mod[1]) + mod[0]
  w, b = p["blocks_1"]["attn"]["qkv"]["kernel"], p["blocks_1"]["attn"]["qkv"]["bias"]
  qkv = (h_in @ w + b).reshape(2, t, 3, 2, 16)
  q, k = qkv[:, :, 0].transpose(0, 2, 1, 3), qkv[:, :, 1].transpose(0, 2, 1, 3)
  want = jax.nn.softmax(jnp.einsum("bnth,bnsh->bnts", q, k) / 4.0, axis=-1)
  np.testing.assert_allclose(attn[1], want, atol=2e-5)
  stats = inspection.adaln_statistics(model, inter["modulation"])
  assert sorted(stats) == ["gate_mlp", "gate_msa", "scale_mlp", "scale_msa"]
  np.testing.assert_allclose(stats["scale_msa"], [2, 2], atol=1e-6)
  np.testing.assert_allclose(stats["gate_msa"], [3, 3], atol=1e-6)
  np.testing.assert_allclose(stats["gate_mlp"], [6, 6], atol=1e-6)


def test_inspect_a_trained_checkpoint_writes_its_pictures(digits_dir, tmp_path):  # noqa: F811
  wd = str(tmp_path / "run")
  train.train_and_evaluate(tiny_config(digits_dir, total_steps=3), wd,
                           devices=jax.devices()[:1])
  out = str(tmp_path / "inspect")
  result = inspection.inspect(wd, out, queries=[0, 5], levels=[0.9, 0.1], num_examples=64)
  for name in ("attention", "loss_by_level", "adaln", "trajectory", "estimates"):
    assert os.path.getsize(os.path.join(out, f"{name}.png")) > 100
    assert json.load(open(os.path.join(out, f"{name}.json")))["step"] == 3
  # The demo's default sampler at 10 steps: 10 network calls, from noise towards data.
  traj = json.load(open(os.path.join(out, "trajectory.json")))
  assert traj["calls"] == 10 and traj["levels"][0] > traj["levels"][-1]
  assert any(f.startswith("events.out.tfevents") for f in os.listdir(out))
  buckets = result["loss_by_level"]
  assert len(buckets) == 10 and sum(b["count"] for b in buckets) == 64
  assert all(b["level_lo"] <= b["level_hi"] for b in buckets)
  assert all(np.isfinite(b["loss"]) for b in buckets)
  maps = np.asarray(result["attention"]["0.1"]["5"])  # [depth, heads, T]
  assert maps.shape == (2, 2, 16)
  np.testing.assert_allclose(maps.sum(-1), 1.0, atol=1e-5)


def _objective(name, **fields):
  from configs import demo  # pylint: disable=import-outside-toplevel
  from dit_jax import objectives  # pylint: disable=import-outside-toplevel
  c = demo.get_config()
  c.objective.name = name
  c.model.learn_sigma = name == "adm"
  for k, v in fields.items():
    c.objective[k] = v
  return objectives.from_config(c)


def test_sampler_trajectory_records_each_step_of_the_samplers_own_update():
  """Each recorded call's x_t and x0 estimate, fed to the sampler's own closed-form update,
  give the next call's x_t: the strip is the sampler's trajectory, and its estimates are the
  ones the sampler steps with."""
  model, p = _model_and_params()
  noise = jax.random.normal(jax.random.PRNGKey(2), (1, 8, 8, 1))
  y = jnp.array([3])

  def apply_for(m, params):
    return jax.jit(lambda x, t, yy, **kw: m.apply({"params": params}, x, t, yy, **kw))

  # ADM's DDIM (eta 0): x' = sqrt(abar') x0 + sqrt(1 - abar') eps, eps from x_t and x0.
  adm = _objective("adm")
  final, calls = inspection.sampler_trajectory(adm, apply_for(model, p), noise, y, "ddim", 5)
  assert len(calls) == 5 and np.allclose(calls[0]["x_t"], noise)
  abar = np.cumprod(1.0 - inspection._betas(adm))
  for a, b in zip(calls, calls[1:] + [None]):
    ab = abar[int(round(a["level"] * (adm.steps - 1)))]
    eps = (a["x_t"] - np.sqrt(ab) * a["x0"]) / np.sqrt(1 - ab)
    if b is None:  # the last step goes to the data: x0 itself
      np.testing.assert_allclose(final, a["x0"], rtol=1e-4, atol=1e-4)
    else:
      ab2 = abar[int(round(b["level"] * (adm.steps - 1)))]
      np.testing.assert_allclose(b["x_t"], np.sqrt(ab2) * a["x0"] + np.sqrt(1 - ab2) * eps,
                                 rtol=1e-4, atol=1e-4)

  flow_model = model.clone(learn_sigma=False)
  fp = nn.meta.unbox(flow_model.init(jax.random.PRNGKey(4), noise, jnp.zeros((1,)), y))["params"]
  fp = jax.tree.map(lambda v: v + 0.05 * jax.random.normal(jax.random.PRNGKey(5), v.shape), fp)
  # Flow's Euler: x' = x + (s' - s) v with v = (x0 - x) / (1 - s), s = 1 - level.
  flow = _objective("flow")
  final, calls = inspection.sampler_trajectory(flow, apply_for(flow_model, fp), noise, y,
                                               "euler", 6)
  assert len(calls) == 5 and np.allclose(calls[0]["x_t"], noise)
  for a, b in zip(calls, calls[1:]):
    s, s2 = 1 - a["level"], 1 - b["level"]
    v = (a["x0"] - a["x_t"]) / (1 - s)
    np.testing.assert_allclose(b["x_t"], a["x_t"] + (s2 - s) * v, rtol=1e-4, atol=1e-5)
  # EDM's Heun: 2 x 3 - 1 calls, from sigma_max x noise.
  from dit_jax.objectives import edm  # pylint: disable=import-outside-toplevel
  final, calls = inspection.sampler_trajectory(_objective("edm"), apply_for(flow_model, fp),
                                               noise, y, None, 3)
  assert len(calls) == 5
  np.testing.assert_allclose(calls[0]["x_t"], edm.SIGMA_MAX * np.asarray(noise), rtol=1e-5)
  assert calls[0]["level"] == pytest.approx(1.0, abs=1e-5)
  # MeanFlow at 1 step: its x0 estimate at t = 1 (h = 1) is the 1-NFE sample itself.
  mf_model = flow_model.clone(h_embedder=True)
  mp = nn.meta.unbox(mf_model.init(jax.random.PRNGKey(6), noise, jnp.zeros((1,)), y,
                                   h=jnp.zeros((1,))))["params"]
  mp = jax.tree.map(lambda v: v + 0.05 * jax.random.normal(jax.random.PRNGKey(7), v.shape), mp)
  final, calls = inspection.sampler_trajectory(_objective("meanflow"), apply_for(mf_model, mp),
                                               noise, y, None, 1)
  assert len(calls) == 1 and calls[0]["level"] == 1.0
  np.testing.assert_allclose(calls[0]["x0"], final, rtol=1e-5, atol=1e-6)

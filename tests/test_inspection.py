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
  for name in ("attention", "loss_by_level", "adaln", "trajectory"):
    assert os.path.getsize(os.path.join(out, f"{name}.png")) > 100
    assert json.load(open(os.path.join(out, f"{name}.json")))["step"] == 3
  assert any(f.startswith("events.out.tfevents") for f in os.listdir(out))
  buckets = result["loss_by_level"]
  assert len(buckets) == 10 and sum(b["count"] for b in buckets) == 64
  assert all(b["level_lo"] <= b["level_hi"] for b in buckets)
  assert all(np.isfinite(b["loss"]) for b in buckets)
  maps = np.asarray(result["attention"]["0.1"]["5"])  # [depth, heads, T]
  assert maps.shape == (2, 2, 16)
  np.testing.assert_allclose(maps.sum(-1), 1.0, atol=1e-5)

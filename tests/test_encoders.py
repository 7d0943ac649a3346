"""DINOv2 in Flax and torch's bicubic in JAX against PyTorch references (random weights).

References: transformers' `Dinov2Model` / `Dinov2WithRegistersModel` and
`torch.nn.functional.interpolate`. The torch hub naming is checked by renaming a transformers
model's weights to the hub's keys here (the hub's code is not on the package registry), with
the reference's position resize switched to the hub's (offset 0.1 passed as a scale factor).
"""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import transformers
import jax
import jax.numpy as jnp

from dit_jax.encoders import dinov2, resize


@pytest.mark.parametrize("shape,size,scale,antialias", [
    ((37, 37), (16, 16), None, False),                # DINOv2's table to a 224px grid
    ((37, 37), None, (16.1 / 37, 16.1 / 37), False),  # the hub's offset-0.1 scale factor
    ((37, 37), (16, 16), None, True),                 # the register models' antialiased resize
    ((256, 256), (224, 224), None, False),            # REPA's image resize
    ((256, 256), (224, 224), None, True),
    ((8, 8), (16, 16), None, False), ((8, 8), (16, 16), None, True),
    ((10, 12), (7, 5), None, True), ((16, 16), None, (2.0, 2.0), False)])
def test_resize_is_torch_bicubic(shape, size, scale, antialias):
  x = np.random.default_rng(0).normal(size=(2, *shape, 3)).astype(np.float32)
  kw = dict(size=size) if size else dict(scale_factor=scale)
  ref = F.interpolate(torch.from_numpy(x).permute(0, 3, 1, 2), mode="bicubic",
                      align_corners=False, antialias=antialias, **kw).permute(0, 2, 3, 1).numpy()
  out = np.asarray(resize.resize(jnp.asarray(x), size=size, scale=scale, antialias=antialias))
  assert out.shape == ref.shape
  np.testing.assert_allclose(out, ref, atol=1e-5, rtol=0)


def test_jax_bicubic_is_another_function():
  """Why encoders.resize exists: jax.image.resize's bicubic (a = -0.5) differs from torch's."""
  x = np.random.default_rng(1).normal(size=(1, 37, 37, 4)).astype(np.float32)
  ref = F.interpolate(torch.from_numpy(x).permute(0, 3, 1, 2), size=(16, 16), mode="bicubic",
                      align_corners=False).permute(0, 2, 3, 1).numpy()
  theirs = np.asarray(jax.image.resize(jnp.asarray(x), (1, 16, 16, 4), "bicubic", antialias=False))
  assert np.abs(theirs - ref).max() > 1e-2


def _random(cls, cfg):
  torch.manual_seed(0)
  m = cls(cfg).eval()
  with torch.no_grad():
    for p in m.parameters():
      p.add_(torch.randn_like(p) * 0.05)  # away from the init's constants (layer scale, zeros)
  return m


def _config(registers=0, **kw):
  common = dict(hidden_size=128, num_hidden_layers=2, num_attention_heads=2, image_size=70,
                patch_size=14, layerscale_value=0.5, **kw)
  if registers:
    return transformers.Dinov2WithRegistersModel, transformers.Dinov2WithRegistersConfig(
        num_register_tokens=registers, **common)
  return transformers.Dinov2Model, transformers.Dinov2Config(**common)


def _patch_tokens(m, x, registers):
  with torch.no_grad():
    return m(pixel_values=x).last_hidden_state[:, 1 + registers:].numpy()


@pytest.mark.parametrize("registers,swiglu", [(0, False), (0, True), (4, False)])
@pytest.mark.parametrize("side", [70, 42, 112])  # the stored grid, smaller, larger
def test_dinov2_matches_transformers(registers, swiglu, side):
  cls, cfg = _config(registers, **({"use_swiglu_ffn": True} if swiglu else {}))
  m = _random(cls, cfg)
  x = torch.randn(2, 3, side, side, generator=torch.Generator().manual_seed(side))
  model, params = dinov2.from_transformers(m.state_dict(), num_heads=2)
  assert (model.num_register_tokens, model.ffn) == (registers, "swiglu" if swiglu else "mlp")
  out = model.apply({"params": params}, jnp.asarray(x.permute(0, 2, 3, 1).numpy()))
  ref = _patch_tokens(m, x, registers)
  assert out.shape == ref.shape == (2, (side // 14) ** 2, 128)
  np.testing.assert_allclose(np.asarray(out), ref, atol=2e-5, rtol=0)


def test_from_transformers_reads_the_older_naming():
  """transformers 4's keys (attention.attention.query, mlp.weights_in/out), which the
  facebook/dinov2-* checkpoints on the hub use, give the same model."""
  cls, cfg = _config(0, use_swiglu_ffn=True)
  m = _random(cls, cfg)
  old = {}
  for k, v in m.state_dict().items():
    for a, b in (("attention.q_proj", "attention.attention.query"),
                 ("attention.k_proj", "attention.attention.key"),
                 ("attention.v_proj", "attention.attention.value"),
                 ("attention.o_proj", "attention.output.dense"), ("mlp.down_proj", "mlp.weights_out")):
      k = k.replace(a, b)
    if ".mlp.gate_proj." in k or ".mlp.up_proj." in k:
      continue
    old["dinov2." + k] = v
  for i in range(2):
    for p in ("weight", "bias"):
      s = f"encoder.layer.{i}.mlp."
      old["dinov2." + s + "weights_in." + p] = torch.cat([m.state_dict()[s + "gate_proj." + p],
                                                          m.state_dict()[s + "up_proj." + p]])
  x = torch.randn(1, 3, 56, 56)
  model, params = dinov2.from_transformers(old, num_heads=2)
  out = model.apply({"params": params}, jnp.asarray(x.permute(0, 2, 3, 1).numpy()))
  np.testing.assert_allclose(np.asarray(out), _patch_tokens(m, x, 0), atol=2e-5, rtol=0)


def _to_hub(sd, registers, swiglu):
  """transformers' Dinov2 keys -> the torch hub model's (dinov2/models/vision_transformer.py)."""
  g = lambda k: sd[k].clone()
  out = {"cls_token": g("embeddings.cls_token"), "pos_embed": g("embeddings.position_embeddings"),
         "mask_token": g("embeddings.mask_token"),
         "patch_embed.proj.weight": g("embeddings.patch_embeddings.projection.weight"),
         "patch_embed.proj.bias": g("embeddings.patch_embeddings.projection.bias"),
         "norm.weight": g("layernorm.weight"), "norm.bias": g("layernorm.bias")}
  if registers:
    out["register_tokens"] = g("embeddings.register_tokens")
  layers = {k.split(".")[2] for k in sd if k.startswith("encoder.layer.")}
  for i in sorted(layers, key=int):
    s, d = f"encoder.layer.{i}.", f"blocks.{i}."
    for a, b in (("norm1", "norm1"), ("norm2", "norm2"), ("attention.o_proj", "attn.proj")):
      out[d + b + ".weight"], out[d + b + ".bias"] = g(s + a + ".weight"), g(s + a + ".bias")
    for p in ("weight", "bias"):
      out[d + "attn.qkv." + p] = torch.cat([g(s + f"attention.{n}_proj.{p}") for n in "qkv"])
      if swiglu:
        out[d + "mlp.w12." + p] = torch.cat([g(s + f"mlp.{n}_proj.{p}") for n in ("gate", "up")])
        out[d + "mlp.w3." + p] = g(s + f"mlp.down_proj.{p}")
      else:
        out[d + "mlp.fc1." + p], out[d + "mlp.fc2." + p] = g(s + f"mlp.fc1.{p}"), g(s + f"mlp.fc2.{p}")
    out[d + "ls1.gamma"] = g(s + "layer_scale1.lambda1")
    out[d + "ls2.gamma"] = g(s + "layer_scale2.lambda1")
  return out


def _hub_interpolation(embeddings_cls, offset, antialias):
  """The hub's interpolate_pos_encoding (offset != 0: scale_factor (n + offset) / M)."""
  def interpolate(self, embeddings, height, width):
    pos = self.position_embeddings
    n, m = embeddings.shape[1] - 1, pos.shape[1] - 1
    h0, w0 = height // 14, width // 14
    if n == m and height == width:
      return pos
    grid = int(m ** 0.5)
    patch = pos[:, 1:].reshape(1, grid, grid, -1).permute(0, 3, 1, 2).float()
    kw = ({"scale_factor": ((h0 + offset) / grid, (w0 + offset) / grid)} if offset
          else {"size": (h0, w0)})
    patch = F.interpolate(patch, mode="bicubic", antialias=antialias, **kw)
    assert patch.shape[-2:] == (h0, w0)
    return torch.cat([pos[:, :1], patch.permute(0, 2, 3, 1).reshape(1, -1, pos.shape[-1])], 1)
  return interpolate


@pytest.mark.parametrize("registers,swiglu", [(0, False), (0, True), (4, False)])
def test_dinov2_from_hub_naming(registers, swiglu, monkeypatch):
  cls, cfg = _config(registers, **({"use_swiglu_ffn": True} if swiglu else {}))
  m = _random(cls, cfg)
  emb = type(m.embeddings)
  # The hub resizes with offset 0.1 (no registers) or an antialiased size (registers).
  monkeypatch.setattr(emb, "interpolate_pos_encoding",
                      _hub_interpolation(emb, 0.0 if registers else 0.1, bool(registers)))
  model, params = dinov2.from_hub(_to_hub(m.state_dict(), registers, swiglu))
  assert model.interpolate_offset == (0.0 if registers else 0.1)
  for side in (42, 224):
    x = torch.randn(2, 3, side, side, generator=torch.Generator().manual_seed(1))
    out = model.apply({"params": params}, jnp.asarray(x.permute(0, 2, 3, 1).numpy()))
    np.testing.assert_allclose(np.asarray(out), _patch_tokens(m, x, registers), atol=2e-5, rtol=0)


def test_from_hub_errors_name_the_problem():
  with pytest.raises(ValueError, match="not a torch hub DINOv2"):
    dinov2.from_hub({"encoder.layer.0.norm1.weight": np.zeros(4)})
  cls, cfg = _config(0)
  sd = _to_hub(_random(cls, cfg).state_dict(), 0, False)
  with pytest.raises(ValueError, match="num_register_tokens=4.*0 register tokens"):
    dinov2.from_hub(sd, num_register_tokens=4)
  sd["blocks.1.attn.proj.weight"] = sd["blocks.1.attn.proj.weight"][:, :64]
  with pytest.raises(ValueError, match=r"blocks_1.*proj.*shape"):
    dinov2.from_hub(sd)


def test_preprocess_is_repas():
  """x/255, ImageNet mean/std, torch bicubic to 224 * (res // 256), as REPA's preprocess."""
  img = np.random.default_rng(2).integers(0, 256, (2, 256, 256, 3), dtype=np.uint8)
  t = torch.from_numpy(img).permute(0, 3, 1, 2).float() / 255.0
  mean = torch.tensor(dinov2.IMAGENET_MEAN).view(1, 3, 1, 1)
  std = torch.tensor(dinov2.IMAGENET_STD).view(1, 3, 1, 1)
  ref = F.interpolate((t - mean) / std, 224, mode="bicubic").permute(0, 2, 3, 1).numpy()
  out = dinov2.preprocess(jnp.asarray(img), dinov2.input_size(256))
  np.testing.assert_allclose(np.asarray(out), ref, atol=2e-5, rtol=0)
  assert dinov2.input_size(512) == 448
  with pytest.raises(ValueError, match="256px"):
    dinov2.input_size(128)

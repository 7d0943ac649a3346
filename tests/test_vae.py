"""Flax AutoencoderKL against diffusers' PyTorch AutoencoderKL with the same random weights."""
import json

from diffusers import AutoencoderKL as TorchAutoencoderKL
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from dit_jax import vae

SMALL = dict(block_out_channels=(32, 64), down_block_types=("DownEncoderBlock2D",) * 2,
             up_block_types=("UpDecoderBlock2D",) * 2, layers_per_block=1, norm_num_groups=8,
             latent_channels=4)
# The sd-vae-ft-ema / sd-vae-ft-mse config.json.
SD_VAE = dict(block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
              up_block_types=("UpDecoderBlock2D",) * 4, layers_per_block=2, norm_num_groups=32,
              latent_channels=4, act_fn="silu", in_channels=3, out_channels=3, sample_size=256)


def _random_torch_vae(config: dict, seed: int = 0) -> TorchAutoencoderKL:
  """diffusers VAE with EVERY weight random (norm scales and biases too), at scales that keep
  activations O(1) so that float32 round-off, not saturation, decides the comparison."""
  model = TorchAutoencoderKL(**config).eval()
  g = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, p in model.named_parameters():
      noise = torch.randn(p.shape, generator=g)
      if p.ndim == 1 and "norm" in name and name.endswith("weight"):
        p.copy_(1.0 + 0.2 * noise)
      elif p.ndim == 1:
        p.copy_(0.2 * noise)
      else:
        p.copy_(noise / np.sqrt(np.prod(p.shape[1:])))
  return model


def _state_dict(model: TorchAutoencoderKL) -> dict:
  return {k: v.numpy().copy() for k, v in model.state_dict().items()}


def _nchw(x) -> np.ndarray:
  return np.asarray(x).transpose(0, 3, 1, 2)


def _assert_rel(got: np.ndarray, want: np.ndarray, tol: float = 1e-4) -> None:
  err = np.max(np.abs(got - want)) / np.max(np.abs(want))
  assert err < tol, f"relative error {err:.2e} >= {tol}"


def _check_parity(config: dict, size: int, batch: int, seed: int) -> None:
  model = _random_torch_vae(config, seed)
  g = torch.Generator().manual_seed(seed + 1)
  x = torch.rand(batch, 3, size, size, generator=g) * 2 - 1
  f = 2 ** (len(config["block_out_channels"]) - 1)
  z = torch.randn(batch, config["latent_channels"], size // f, size // f, generator=g)
  with torch.no_grad():
    posterior = model.encode(x).latent_dist
    decoded = model.decode(z).sample

  module, params = vae.from_diffusers(dict(model.config), _state_dict(model))
  mean, logvar = jax.jit(lambda p, x: module.apply(p, x, method=module.encode))(
      params, jnp.asarray(x.numpy().transpose(0, 2, 3, 1)))
  out = jax.jit(lambda p, z: module.apply(p, z, method=module.decode))(
      params, jnp.asarray(z.numpy().transpose(0, 2, 3, 1)))
  assert mean.shape == (batch, size // f, size // f, config["latent_channels"])
  _assert_rel(_nchw(mean), posterior.mean.numpy())
  _assert_rel(_nchw(logvar), posterior.logvar.numpy())
  _assert_rel(_nchw(out), decoded.numpy())
  # The comparison is not vacuous: outputs vary and are far from zero.
  assert np.std(posterior.mean.numpy()) > 0.1 and np.std(decoded.numpy()) > 0.1


def test_parity_small_config():
  _check_parity(SMALL, size=16, batch=2, seed=0)


def test_parity_sd_vae_config():
  _check_parity(SD_VAE, size=64, batch=1, seed=1)


def test_param_tree_and_count_match_torch():
  model = TorchAutoencoderKL(**SD_VAE)
  module = vae.from_config(dict(model.config))
  shapes = jax.eval_shape(module.init, jax.random.key(0), jnp.zeros((1, 8, 8, 3)))
  n_flax = sum(int(np.prod(s.shape)) for s in jax.tree_util.tree_leaves(shapes))
  assert n_flax == sum(p.numel() for p in model.parameters()) == 83_653_863
  assert module.downsample_factor == 8


def test_legacy_attention_key_names():
  """Older diffusers files (and the original release) name attention query/key/value/proj_attn."""
  model = _random_torch_vae(SMALL, seed=2)
  sd = _state_dict(model)
  legacy = {}
  for k, v in sd.items():
    for new, old in (("to_q", "query"), ("to_k", "key"), ("to_v", "value"), ("to_out.0", "proj_attn")):
      if f".attentions.0.{new}." in k:
        k = k.replace(f".{new}.", f".{old}.")
        v = v[:, :, None, None] if v.ndim == 2 else v  # stored as 1x1 convs
    legacy[k] = v
  assert "encoder.mid_block.attentions.0.proj_attn.weight" in legacy
  _, params = vae.from_diffusers(dict(model.config), sd)
  _, params_legacy = vae.from_diffusers(dict(model.config), legacy)
  jax.tree_util.tree_map(np.testing.assert_array_equal, params, params_legacy)


def test_mismatched_state_dict_errors_name_keys():
  model = _random_torch_vae(SMALL)
  config = dict(model.config)
  sd = _state_dict(model)
  sd.pop("decoder.conv_out.bias")
  sd["encoder.extra_layer.weight"] = np.zeros(3)
  sd["quant_conv.weight"] = np.zeros((8, 8, 3, 3), np.float32)
  with pytest.raises(ValueError) as e:
    vae.from_diffusers(config, sd)
  msg = str(e.value)
  assert "missing keys" in msg and "decoder.conv_out.bias" in msg
  assert "unexpected keys" in msg and "encoder.extra_layer.weight" in msg
  assert "shape mismatches" in msg and "quant_conv.weight: got (8, 8, 3, 3), expected (8, 8, 1, 1)" in msg


@pytest.mark.parametrize("key,value,match", [
    ("act_fn", "gelu", "act_fn"),
    ("down_block_types", ["DownEncoderBlock2D", "AttnDownEncoderBlock2D"], "down_block_types"),
    ("_class_name", "AutoencoderTiny", "_class_name"),
    ("norm_num_groups", 7, "norm_num_groups"),
])
def test_unsupported_config_errors(key, value, match):
  config = dict(SMALL, **{key: value})
  with pytest.raises(ValueError, match=match):
    vae.from_config(config)


def test_load_folder_and_decode_to_uint8(tmp_path):
  model = _random_torch_vae(SMALL, seed=3)
  model.save_pretrained(tmp_path / "vae", safe_serialization=True)
  with open(tmp_path / "vae" / "config.json") as f:
    assert json.load(f)["block_out_channels"] == [32, 64]
  module, params = vae.load(str(tmp_path))  # a pipeline folder: finds its vae/ sub-folder

  latents = np.random.default_rng(0).normal(size=(8, 4, 4, 4)).astype(np.float32)
  mesh = jax.sharding.Mesh(np.array(jax.devices()), ("data",))
  sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
  images = vae.decode_to_uint8(module, params, jax.device_put(latents, sharding), scale_factor=0.18215)
  assert images.dtype == jnp.uint8 and images.shape == (8, 8, 8, 3)
  assert images.sharding.is_equivalent_to(sharding, 4)

  with torch.no_grad():
    x = model.decode(torch.from_numpy(latents.transpose(0, 3, 1, 2)) / 0.18215).sample
  want = torch.clamp(127.5 * x + 128.0, 0, 255).permute(0, 2, 3, 1).to(torch.uint8).numpy()
  diff = np.abs(np.asarray(images).astype(int) - want.astype(int))
  # Truncation to uint8 can flip by one where float32 round-off straddles an integer.
  assert diff.max() <= 1 and np.mean(diff == 0) > 0.99
  assert len(np.unique(want)) > 50  # covers much of the range, including clipping
  assert (want == 255).any() or (want == 0).any()


def test_load_missing_files(tmp_path):
  with pytest.raises(FileNotFoundError, match="config.json"):
    vae.load(str(tmp_path))
  (tmp_path / "config.json").write_text(json.dumps(SMALL))
  with pytest.raises(FileNotFoundError, match="diffusion_pytorch_model.safetensors"):
    vae.load(str(tmp_path))


def test_bfloat16_compute_stays_close():
  model = _random_torch_vae(SMALL, seed=4)
  x = jnp.asarray(np.random.default_rng(1).uniform(-1, 1, (1, 16, 16, 3)), jnp.float32)
  module32, params = vae.from_diffusers(dict(model.config), _state_dict(model))
  module16, _ = vae.from_diffusers(dict(model.config), _state_dict(model), dtype=jnp.bfloat16)
  mean32, _ = jax.jit(lambda p, x: module32.apply(p, x, method=module32.encode))(params, x)
  mean16, logvar16 = jax.jit(lambda p, x: module16.apply(p, x, method=module16.encode))(params, x)
  assert mean16.dtype == logvar16.dtype == jnp.float32
  _assert_rel(np.asarray(mean16), np.asarray(mean32), tol=5e-2)


# LightningDiT's VA-VAE shape (5 levels: f16, 32 latent channels), at a width a CPU test runs.
VAVAE_SMALL = dict(block_out_channels=(16, 16, 32, 32, 64), down_block_types=("DownEncoderBlock2D",) * 5,
                   up_block_types=("UpDecoderBlock2D",) * 5, layers_per_block=2, norm_num_groups=8,
                   latent_channels=32)


def _to_ldm_names(sd: dict, levels: int) -> dict:
  """diffusers AutoencoderKL keys -> LDM's (taming's AutoencoderKL: encoder.down.i.block.j,
  mid.block_1, mid.attn_1.q as 1x1 convs, decoder.up.i counted from the bottom level)."""
  import re  # pylint: disable=import-outside-toplevel
  out = {}
  for k, v in sd.items():
    k = k.replace("conv_norm_out", "norm_out").replace("conv_shortcut", "nin_shortcut")
    k = re.sub(r"mid_block\.resnets\.(\d)", lambda m: f"mid.block_{int(m[1]) + 1}", k)
    k = k.replace("mid_block.attentions.0.group_norm", "mid.attn_1.norm")
    k = re.sub(r"mid_block\.attentions\.0\.to_(q|k|v)\.", r"mid.attn_1.\1.", k)
    k = k.replace("mid_block.attentions.0.to_out.0", "mid.attn_1.proj_out")
    k = re.sub(r"encoder\.down_blocks\.(\d+)\.resnets\.", r"encoder.down.\1.block.", k)
    k = re.sub(r"encoder\.down_blocks\.(\d+)\.downsamplers\.0\.", r"encoder.down.\1.downsample.", k)
    k = re.sub(r"decoder\.up_blocks\.(\d+)\.resnets\.",
               lambda m: f"decoder.up.{levels - 1 - int(m[1])}.block.", k)
    k = re.sub(r"decoder\.up_blocks\.(\d+)\.upsamplers\.0\.",
               lambda m: f"decoder.up.{levels - 1 - int(m[1])}.upsample.", k)
    if "attn_1." in k and k.endswith("weight") and v.ndim == 2 and "norm" not in k:
      v = v[:, :, None, None]  # LDM's attention projections are 1x1 convs
    out[k] = v
  return out


def test_vavae_ldm_checkpoint_matches_diffusers(tmp_path):
  from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint  # pylint: disable=import-outside-toplevel
  import safetensors.numpy  # pylint: disable=import-outside-toplevel
  model = _random_torch_vae(VAVAE_SMALL, seed=3)
  sd = _state_dict(model)
  ldm = {f"first_stage_model.{k}": v for k, v in _to_ldm_names(sd, 5).items()}
  ldm["loss.logvar"] = np.zeros((), np.float32)  # the training loss's entries are dropped
  # The checkpoint files a named VAE reads: a Lightning-style .pt ({'state_dict': ...}) and a
  # .safetensors of the same keys give the same arrays.
  pt, st = str(tmp_path / "vavae.pt"), str(tmp_path / "vavae.safetensors")
  torch.save({"state_dict": {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in ldm.items()},
              "global_step": 7}, pt)
  safetensors.numpy.save_file({k: np.ascontiguousarray(v) for k, v in ldm.items()}, st)
  for path in (pt, st):
    read = vae.read_ldm_state_dict(path)
    assert set(read) == set(ldm)
    for k, v in ldm.items():
      np.testing.assert_array_equal(read[k], v, err_msg=f"{path}: {k}")
  # diffusers' own LDM conversion gives back the diffusers weights: the LDM names are right.
  back = convert_ldm_vae_checkpoint({k: torch.from_numpy(np.asarray(v)) for k, v in ldm.items()},
                                    dict(model.config))
  assert set(back) == set(sd)
  for k, v in sd.items():
    np.testing.assert_array_equal(np.asarray(back[k]).reshape(v.shape), v, err_msg=k)
  # Our LDM converter gives diffusers' outputs (f16: 32x32 images <-> 2x2x32 latents).
  module, params = vae.from_ldm(dict(model.config), ldm)
  assert module.downsample_factor == 16 and module.latent_channels == 32
  g = torch.Generator().manual_seed(4)
  x = torch.rand(2, 3, 32, 32, generator=g) * 2 - 1
  z = torch.randn(2, 32, 2, 2, generator=g)
  with torch.no_grad():
    mean_ref, dec_ref = model.encode(x).latent_dist.mean.numpy(), model.decode(z).sample.numpy()
  mean, _ = module.apply(params, jnp.asarray(x.numpy().transpose(0, 2, 3, 1)), method=module.encode)
  dec = module.apply(params, jnp.asarray(z.numpy().transpose(0, 2, 3, 1)), method=module.decode)
  _assert_rel(_nchw(mean), mean_ref)
  _assert_rel(_nchw(dec), dec_ref)
  # The full-size config builds the VA-VAE: ch_mult (1, 1, 2, 2, 4) of 128, f16d32.
  full = vae.from_config(vae.VAVAE_F16D32)
  assert (full.block_out_channels, full.latent_channels, full.downsample_factor) == (
      (128, 128, 256, 256, 512), 32, 16)

"""The Stable Diffusion VAE (AutoencoderKL) in Flax, NHWC, loadable from diffusers weights.

DiT trains on posterior samples of the sd-vae-ft-ema encoder (latent = sample * 0.18215) and decodes
its samples with the same decoder. This module rebuilds that network from the config dict diffusers
writes (`config.json`) and converts the diffusers state dict (`diffusion_pytorch_model.safetensors`,
read with `safetensors.numpy`, so no PyTorch is needed).

Architecture (diffusers `AutoencoderKL` with DownEncoderBlock2D / UpDecoderBlock2D blocks):
  encoder: conv_in 3x3 -> per level: `layers_per_block` resnets, then a stride-2 3x3 conv on an input
    padded by one pixel at the bottom/right (not at the last level) -> mid block (resnet, single-head
    self-attention, resnet) -> GroupNorm, SiLU, conv_out 3x3 to 2 * latent_channels -> quant_conv 1x1.
  decoder: post_quant_conv 1x1 -> conv_in 3x3 -> mid block -> per level (reversed channels):
    `layers_per_block + 1` resnets, then nearest 2x upsampling and a 3x3 conv (not at the last level)
    -> GroupNorm, SiLU, conv_out 3x3.
All GroupNorms use eps 1e-6; resnets are pre-activation with a 1x1 shortcut when channels change.

Parameter names mirror the diffusers keys (`down_blocks_0/resnets_1/conv1/kernel` holds
`down_blocks.0.resnets.1.conv1.weight`), so conversion is a mechanical renaming plus transposes.

Usage:
  module, params = vae.load("/path/to/sd-vae-ft-ema")
  mean, logvar = module.apply(params, images, method=module.encode)   # images [N, H, W, 3] in [-1, 1]
  x = module.apply(params, z, method=module.decode)                   # z [N, H/8, W/8, 4] unscaled
"""
import functools
import json
import logging
import os
import re
from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array

# Config keys that do not change the network (sampling/scaling metadata, diffusers bookkeeping).
_IGNORED_CONFIG_KEYS = frozenset({
    "sample_size", "scaling_factor", "shift_factor", "latents_mean", "latents_std", "force_upcast",
})
_ARCH_CONFIG_KEYS = frozenset({
    "in_channels", "out_channels", "block_out_channels", "layers_per_block", "latent_channels",
    "norm_num_groups", "use_quant_conv", "use_post_quant_conv", "mid_block_add_attention",
})
WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"
CONFIG_NAME = "config.json"
DEFAULT_SCALE_FACTOR = 0.18215


class ResnetBlock(nn.Module):
  """Pre-activation residual block: (GN, SiLU, conv3x3) twice, 1x1 shortcut if channels change."""
  out_channels: int
  groups: int
  dtype: Any = jnp.float32
  precision: Any = None

  @nn.compact
  def __call__(self, x: Array) -> Array:
    norm = functools.partial(nn.GroupNorm, num_groups=self.groups, epsilon=1e-6, dtype=self.dtype,
                             use_fast_variance=False)
    conv = functools.partial(nn.Conv, self.out_channels, dtype=self.dtype, precision=self.precision)
    h = conv((3, 3), padding=1, name="conv1")(nn.silu(norm(name="norm1")(x)))
    h = conv((3, 3), padding=1, name="conv2")(nn.silu(norm(name="norm2")(h)))
    if x.shape[-1] != self.out_channels:
      x = conv((1, 1), name="conv_shortcut")(x)
    return x + h


class Attention(nn.Module):
  """Single-head self-attention over all H*W positions with a residual connection."""
  groups: int
  dtype: Any = jnp.float32
  precision: Any = None

  @nn.compact
  def __call__(self, x: Array) -> Array:
    b, h, w, c = x.shape
    y = nn.GroupNorm(num_groups=self.groups, epsilon=1e-6, dtype=self.dtype, use_fast_variance=False,
                     name="group_norm")(x)
    y = y.reshape(b, h * w, 1, c)
    dense = functools.partial(nn.Dense, c, dtype=self.dtype, precision=self.precision)
    # The softmax runs in float32 whatever the compute dtype (diffusers upcasts it too).
    q, k, v = (dense(name=n)(y).astype(jnp.float32) for n in ("to_q", "to_k", "to_v"))
    y = jax.nn.dot_product_attention(q, k, v).astype(self.dtype)
    y = dense(name="to_out_0")(y.reshape(b, h * w, c))
    return x + y.reshape(b, h, w, c)


class MidBlock(nn.Module):
  """resnet -> attention -> resnet at the lowest resolution."""
  groups: int
  add_attention: bool = True
  dtype: Any = jnp.float32
  precision: Any = None

  @nn.compact
  def __call__(self, x: Array) -> Array:
    kw = dict(groups=self.groups, dtype=self.dtype, precision=self.precision)
    c = x.shape[-1]
    x = ResnetBlock(c, name="resnets_0", **kw)(x)
    if self.add_attention:
      x = Attention(name="attentions_0", **kw)(x)
    return ResnetBlock(c, name="resnets_1", **kw)(x)


class Downsample(nn.Module):
  """Stride-2 3x3 conv; the input is padded only at the bottom and right (asymmetric, as released)."""
  channels: int
  dtype: Any = jnp.float32
  precision: Any = None

  @nn.compact
  def __call__(self, x: Array) -> Array:
    return nn.Conv(self.channels, (3, 3), strides=(2, 2), padding=((0, 1), (0, 1)), dtype=self.dtype,
                   precision=self.precision, name="conv")(x)


class Upsample(nn.Module):
  """Nearest-neighbour 2x upsampling followed by a 3x3 conv."""
  channels: int
  dtype: Any = jnp.float32
  precision: Any = None

  @nn.compact
  def __call__(self, x: Array) -> Array:
    x = jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)
    return nn.Conv(self.channels, (3, 3), padding=1, dtype=self.dtype, precision=self.precision,
                   name="conv")(x)


class Block(nn.Module):
  """A resolution level: `num_layers` resnets, then optionally a down- or upsampler."""
  out_channels: int
  num_layers: int
  groups: int
  resample: str | None = None  # "down", "up" or None.
  dtype: Any = jnp.float32
  precision: Any = None

  @nn.compact
  def __call__(self, x: Array) -> Array:
    kw = dict(dtype=self.dtype, precision=self.precision)
    for i in range(self.num_layers):
      x = ResnetBlock(self.out_channels, self.groups, name=f"resnets_{i}", **kw)(x)
    if self.resample == "down":
      x = Downsample(self.out_channels, name="downsamplers_0", **kw)(x)
    elif self.resample == "up":
      x = Upsample(self.out_channels, name="upsamplers_0", **kw)(x)
    return x


class Encoder(nn.Module):
  """Image [N, H, W, in] -> moments [N, H/f, W/f, 2 * latent] with f = 2 ** (levels - 1)."""
  block_out_channels: tuple[int, ...]
  layers_per_block: int
  latent_channels: int
  groups: int
  add_attention: bool = True
  dtype: Any = jnp.float32
  precision: Any = None

  @nn.compact
  def __call__(self, x: Array) -> Array:
    kw = dict(dtype=self.dtype, precision=self.precision)
    chans = self.block_out_channels
    x = nn.Conv(chans[0], (3, 3), padding=1, name="conv_in", **kw)(x.astype(self.dtype))
    for i, c in enumerate(chans):
      last = i == len(chans) - 1
      x = Block(c, self.layers_per_block, self.groups, None if last else "down", name=f"down_blocks_{i}",
                **kw)(x)
    x = MidBlock(self.groups, self.add_attention, name="mid_block", **kw)(x)
    x = nn.GroupNorm(num_groups=self.groups, epsilon=1e-6, dtype=self.dtype, use_fast_variance=False,
                     name="conv_norm_out")(x)
    return nn.Conv(2 * self.latent_channels, (3, 3), padding=1, name="conv_out", **kw)(nn.silu(x))


class Decoder(nn.Module):
  """Latent [N, h, w, latent] -> image [N, h*f, w*f, out]."""
  block_out_channels: tuple[int, ...]
  layers_per_block: int
  out_channels: int
  groups: int
  add_attention: bool = True
  dtype: Any = jnp.float32
  precision: Any = None

  @nn.compact
  def __call__(self, z: Array) -> Array:
    kw = dict(dtype=self.dtype, precision=self.precision)
    chans = tuple(reversed(self.block_out_channels))
    x = nn.Conv(chans[0], (3, 3), padding=1, name="conv_in", **kw)(z.astype(self.dtype))
    x = MidBlock(self.groups, self.add_attention, name="mid_block", **kw)(x)
    for i, c in enumerate(chans):
      last = i == len(chans) - 1
      x = Block(c, self.layers_per_block + 1, self.groups, None if last else "up", name=f"up_blocks_{i}",
                **kw)(x)
    x = nn.GroupNorm(num_groups=self.groups, epsilon=1e-6, dtype=self.dtype, use_fast_variance=False,
                     name="conv_norm_out")(x)
    return nn.Conv(self.out_channels, (3, 3), padding=1, name="conv_out", **kw)(nn.silu(x))


class AutoencoderKL(nn.Module):
  """KL autoencoder of Stable Diffusion (defaults: the SD-VAE, 3 -> 4 channels, 8x downsampling).

  Attributes mirror the diffusers config; `dtype` is the compute dtype (parameters stay float32)
  and `precision` is passed to every conv/dense (e.g. "highest" for float32 matmuls on TPU).
  """
  in_channels: int = 3
  out_channels: int = 3
  block_out_channels: tuple[int, ...] = (128, 256, 512, 512)
  layers_per_block: int = 2
  latent_channels: int = 4
  norm_num_groups: int = 32
  use_quant_conv: bool = True
  use_post_quant_conv: bool = True
  mid_block_add_attention: bool = True
  dtype: Any = jnp.float32
  precision: Any = None

  def setup(self):
    kw = dict(dtype=self.dtype, precision=self.precision)
    common = dict(block_out_channels=tuple(self.block_out_channels), layers_per_block=self.layers_per_block,
                  groups=self.norm_num_groups, add_attention=self.mid_block_add_attention, **kw)
    self.encoder = Encoder(latent_channels=self.latent_channels, **common)
    self.decoder = Decoder(out_channels=self.out_channels, **common)
    if self.use_quant_conv:
      self.quant_conv = nn.Conv(2 * self.latent_channels, (1, 1), **kw)
    if self.use_post_quant_conv:
      self.post_quant_conv = nn.Conv(self.latent_channels, (1, 1), **kw)

  @property
  def downsample_factor(self) -> int:
    return 2 ** (len(self.block_out_channels) - 1)

  def encode(self, x: Array) -> tuple[Array, Array]:
    """Posterior of images x [N, H, W, in] in [-1, 1]: (mean, logvar), each [N, H/f, W/f, latent].

    logvar is clipped to [-30, 20] as diffusers does; std = exp(logvar / 2). Latents are unscaled.
    """
    moments = self.encoder(x)
    if self.use_quant_conv:
      moments = self.quant_conv(moments)
    mean, logvar = jnp.split(moments.astype(jnp.float32), 2, axis=-1)
    return mean, jnp.clip(logvar, -30.0, 20.0)

  def decode(self, z: Array) -> Array:
    """Unscaled latents z [N, h, w, latent] -> images [N, h*f, w*f, out], roughly in [-1, 1]."""
    z = z.astype(self.dtype)
    if self.use_post_quant_conv:
      z = self.post_quant_conv(z)
    return self.decoder(z).astype(jnp.float32)

  def __call__(self, x: Array) -> Array:
    """Reconstruction from the posterior mean (used to initialise every parameter)."""
    mean, _ = self.encode(x)
    return self.decode(mean)


def from_config(config: Mapping[str, Any], **overrides: Any) -> AutoencoderKL:
  """Builds the module from a diffusers AutoencoderKL config dict (`config.json`).

  Raises ValueError naming any field whose value this port does not implement.
  """
  name = config.get("_class_name", "AutoencoderKL")
  if name != "AutoencoderKL":
    raise ValueError(f"VAE config: _class_name is {name!r}, expected 'AutoencoderKL'")
  levels = len(config.get("block_out_channels", AutoencoderKL.block_out_channels))
  expect = {
      "act_fn": "silu",
      "down_block_types": ["DownEncoderBlock2D"] * levels,
      "up_block_types": ["UpDecoderBlock2D"] * levels,
  }
  for key, want in expect.items():
    if key in config and (list(config[key]) if isinstance(want, list) else config[key]) != want:
      raise ValueError(f"VAE config: unsupported {key}={config[key]!r}, this port implements {want!r}")
  unknown = [k for k in config if not k.startswith("_") and k not in _ARCH_CONFIG_KEYS
             and k not in _IGNORED_CONFIG_KEYS and k not in expect]
  if unknown:
    logging.warning("VAE config: ignoring unknown fields %s", sorted(unknown))
  kwargs = {k: config[k] for k in _ARCH_CONFIG_KEYS if k in config}
  if "block_out_channels" in kwargs:
    kwargs["block_out_channels"] = tuple(kwargs["block_out_channels"])
  for c in kwargs.get("block_out_channels", AutoencoderKL.block_out_channels):
    groups = kwargs.get("norm_num_groups", AutoencoderKL.norm_num_groups)
    if c % groups:
      raise ValueError(f"VAE config: block_out_channels entry {c} is not divisible by norm_num_groups={groups}")
  kwargs.update(overrides)
  return AutoencoderKL(**kwargs)


def _torch_key(path: tuple[str, ...]) -> str:
  """Flax parameter path -> diffusers state-dict key ('down_blocks_0' -> 'down_blocks.0', kernel -> weight)."""
  *mods, leaf = path
  mods = [re.sub(r"_(\d+)$", r".\1", m) for m in mods]
  return ".".join(mods + ["weight" if leaf in ("kernel", "scale") else leaf])


def _legacy_attention_renames(state_dict: Mapping[str, Any]) -> dict[str, Any]:
  """Renames the pre-0.14 diffusers attention keys (query/key/value/proj_attn) to to_q/to_k/to_v/to_out.0."""
  renames = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}
  pattern = re.compile(r"^(.*\.attentions\.\d+)\.(query|key|value|proj_attn)\.(weight|bias)$")
  out = {}
  for k, v in state_dict.items():
    m = pattern.match(k)
    out[f"{m[1]}.{renames[m[2]]}.{m[3]}" if m else k] = v
  return out


def _convert(value: np.ndarray, target_shape: tuple[int, ...], leaf: str) -> np.ndarray | None:
  """PyTorch layout -> Flax layout, or None when the shapes cannot correspond."""
  value = np.asarray(value)
  if leaf == "kernel" and len(target_shape) == 4 and value.ndim == 4:
    value = value.transpose(2, 3, 1, 0)  # [out, in, kh, kw] -> [kh, kw, in, out]
  elif leaf == "kernel" and len(target_shape) == 2:
    if value.ndim == 4 and value.shape[2:] == (1, 1):  # attention stored as a 1x1 conv
      value = value[:, :, 0, 0]
    if value.ndim == 2:
      value = value.T  # [out, in] -> [in, out]
  return value if value.shape == tuple(target_shape) else None


def _torch_shape(target_shape: tuple[int, ...], leaf: str) -> tuple[int, ...]:
  if leaf == "kernel" and len(target_shape) == 4:
    kh, kw, i, o = target_shape
    return (o, i, kh, kw)
  if leaf == "kernel" and len(target_shape) == 2:
    return tuple(reversed(target_shape))
  return tuple(target_shape)


def from_diffusers(config: Mapping[str, Any], state_dict: Mapping[str, Any],
                   **overrides: Any) -> tuple[AutoencoderKL, dict]:
  """Converts a diffusers AutoencoderKL (config dict + state dict of arrays) to (module, params).

  Args:
    config: the diffusers config dict (contents of `config.json`).
    state_dict: diffusers key -> array (numpy or anything np.asarray accepts), PyTorch layout.
    **overrides: module attributes to override, e.g. dtype=jnp.bfloat16 or precision="highest".

  Returns:
    (module, params) with params = {"params": ...} in float32, ready for `module.apply`.

  Raises:
    ValueError listing missing keys, unexpected keys and shape mismatches.
  """
  module = from_config(config, **overrides)
  f = module.downsample_factor
  shapes = jax.eval_shape(module.init, jax.random.key(0), jnp.zeros((1, f, f, module.in_channels)))
  state_dict = _legacy_attention_renames(state_dict)
  used, missing, mismatched = set(), [], []

  def convert(path, target):
    names = tuple(p.key for p in path)[1:]  # drop the "params" collection
    key = _torch_key(names)
    if key not in state_dict:
      missing.append(key)
      return None
    used.add(key)
    value = _convert(state_dict[key], target.shape, names[-1])
    if value is None:
      mismatched.append(f"{key}: got {tuple(np.shape(state_dict[key]))}, "
                        f"expected {_torch_shape(target.shape, names[-1])}")
      return None
    return jnp.asarray(value, dtype=jnp.float32)

  params = jax.tree_util.tree_map_with_path(convert, shapes)
  unexpected = sorted(set(state_dict) - used)
  if missing or unexpected or mismatched:
    lines = []
    for title, items in (("missing keys", missing), ("unexpected keys", unexpected),
                         ("shape mismatches", mismatched)):
      if items:
        shown = items[:20] + ([f"... and {len(items) - 20} more"] if len(items) > 20 else [])
        lines.append(f"{len(items)} {title}:\n  " + "\n  ".join(shown))
    raise ValueError("VAE state dict does not match the config:\n" + "\n".join(lines))
  return module, params


# The VA-VAE of LightningDiT (hustvl/LightningDiT tokenizer/vavae.py): LDM's AutoencoderKL with
# ch 128, ch_mult (1, 1, 2, 2, 4) and 32 latent channels (f16d32), as a diffusers config.
VAVAE_F16D32 = {
    "_class_name": "AutoencoderKL", "in_channels": 3, "out_channels": 3,
    "block_out_channels": [128, 128, 256, 256, 512], "layers_per_block": 2,
    "latent_channels": 32, "norm_num_groups": 32,
    "down_block_types": ["DownEncoderBlock2D"] * 5, "up_block_types": ["UpDecoderBlock2D"] * 5,
}
CONFIGS = {"vavae_f16d32": VAVAE_F16D32}
# How latents of each named VAE are normalised for the DiT (dit_jax.latent_norm): the VA-VAE per
# channel, as LightningDiT trains on it (latents_stats, latent_multiplier 1.0).
LATENT_NORMS = {"vavae_f16d32": "channel"}
# A named VAE is given as "NAME:WEIGHTS" (e.g. "vavae_f16d32:/ckpt/vavae-imagenet256-f16d32-
# dinov2.pt"): the config of NAME and an LDM-named checkpoint (.pt/.ckpt, or .safetensors).
SPEC_SEPARATOR = ":"

# LDM (taming / latent-diffusion) AutoencoderKL names -> diffusers names, for the parts whose
# index does not move; the decoder's `up.{i}` is level i from the bottom, diffusers'
# `up_blocks.{n-1-i}`.
_LDM_RENAMES = (
    (r"^(encoder|decoder)\.norm_out\.", r"\1.conv_norm_out."),
    (r"^(encoder|decoder)\.mid\.block_([12])\.", lambda m: f"{m[1]}.mid_block.resnets.{int(m[2]) - 1}."),
    (r"^(encoder|decoder)\.mid\.attn_1\.norm\.", r"\1.mid_block.attentions.0.group_norm."),
    (r"^(encoder|decoder)\.mid\.attn_1\.(q|k|v)\.", r"\1.mid_block.attentions.0.to_\2."),
    (r"^(encoder|decoder)\.mid\.attn_1\.proj_out\.", r"\1.mid_block.attentions.0.to_out.0."),
    (r"^encoder\.down\.(\d+)\.block\.(\d+)\.", r"encoder.down_blocks.\1.resnets.\2."),
    (r"^encoder\.down\.(\d+)\.downsample\.", r"encoder.down_blocks.\1.downsamplers.0."),
    (r"\.nin_shortcut\.", ".conv_shortcut."),
)


def ldm_to_diffusers(state_dict: Mapping[str, Any], levels: int) -> dict[str, Any]:
  """An LDM AutoencoderKL state dict (the VA-VAE's; `first_stage_model.` prefix and the
  training loss's `loss.*` entries dropped) -> diffusers key names, for `from_diffusers`."""
  out = {}
  for key, value in state_dict.items():
    if key.startswith("first_stage_model."):
      key = key[len("first_stage_model."):]
    if key.startswith(("loss.", "model_ema.")) or key.startswith("foundation_model"):
      continue
    for pattern, repl in _LDM_RENAMES:
      key = re.sub(pattern, repl, key)
    m = re.match(r"^decoder\.up\.(\d+)\.(block|upsample)\.(?:(\d+)\.)?(.*)$", key)
    if m:
      level = levels - 1 - int(m[1])
      key = (f"decoder.up_blocks.{level}.resnets.{m[3]}.{m[4]}" if m[2] == "block" else
             f"decoder.up_blocks.{level}.upsamplers.0.{m[4]}")
    out[key] = value
  return out


def from_ldm(config: Mapping[str, Any], state_dict: Mapping[str, Any],
             **overrides: Any) -> tuple[AutoencoderKL, dict]:
  """An LDM-named AutoencoderKL (e.g. LightningDiT's VA-VAE, config `VAVAE_F16D32`) ->
  (module, params), through `ldm_to_diffusers` and `from_diffusers`."""
  levels = len(config.get("block_out_channels", AutoencoderKL.block_out_channels))
  return from_diffusers(config, ldm_to_diffusers(state_dict, levels), **overrides)


def named(spec: str) -> tuple[str, str] | None:
  """(NAME, WEIGHTS) when `spec` names a config of CONFIGS ("NAME:WEIGHTS"), else None (a
  diffusers folder, local or gs://)."""
  name, sep, weights = spec.partition(SPEC_SEPARATOR)
  if sep and name in CONFIGS:
    if not weights:
      raise ValueError(f"VAE {spec!r}: give the weights of {name} as {name}:PATH")
    return name, weights
  if spec in CONFIGS:
    raise ValueError(f"VAE {spec!r}: give its weights as {spec}:PATH (an LDM checkpoint, "
                     ".pt/.ckpt or .safetensors)")
  return None


def read_ldm_state_dict(path: str) -> dict[str, np.ndarray]:
  """An LDM AutoencoderKL checkpoint -> {key: float32 array}: .safetensors (numpy, no torch)
  or a torch .pt/.ckpt (its 'state_dict' entry when it is a training checkpoint)."""
  if not _isfile(path):
    raise FileNotFoundError(f"VAE weights {path!r}: no such file")
  if path.endswith(".safetensors"):
    import safetensors.numpy  # pylint: disable=g-import-not-at-top
    sd = safetensors.numpy.load(_read(path))
  else:
    try:
      import torch  # pylint: disable=g-import-not-at-top
    except ImportError:
      raise ImportError(f"{path}: reading a torch checkpoint needs torch; or convert it once to "
                        ".safetensors (docs/latents.md)") from None
    import io  # pylint: disable=g-import-not-at-top
    try:
      sd = torch.load(io.BytesIO(_read(path)), map_location="cpu", weights_only=True)
    except Exception as e:  # pylint: disable=broad-except
      raise ValueError(f"{path}: not a weights-only torch checkpoint ({type(e).__name__}: "
                       f"{str(e).splitlines()[0] if str(e) else ''}); convert it once to "
                       ".safetensors (docs/latents.md)") from None
    if isinstance(sd, Mapping) and isinstance(sd.get("state_dict"), Mapping):
      sd = sd["state_dict"]
    sd = {k: v.float().numpy() for k, v in sd.items() if hasattr(v, "numpy")}
  return {k: np.asarray(v, np.float32) for k, v in sd.items()}


def _gfile():
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  return tf.io.gfile


def _isfile(path: str) -> bool:
  # Remote folders (gs://...) go through TensorFlow's file system; local ones need no TensorFlow.
  return _gfile().exists(path) if "://" in path else os.path.isfile(path)


def _read(path: str, mode: str = "rb"):
  if "://" in path:
    with _gfile().GFile(path, mode) as f:
      return f.read()
  with open(path, mode) as f:
    return f.read()


def find_vae_dir(path: str) -> str:
  """`path` itself, or its `vae/` sub-folder (full Stable Diffusion pipeline folders)."""
  for d in (path, os.path.join(path, "vae")):
    if _isfile(os.path.join(d, CONFIG_NAME)):
      return d
  raise FileNotFoundError(f"no {CONFIG_NAME} in {path!r} or {os.path.join(path, 'vae')!r}: expected a diffusers "
                          "AutoencoderKL folder such as stabilityai/sd-vae-ft-ema (see docs/latents.md)")


def load_config(path: str) -> dict:
  """The diffusers config dict of the VAE folder `path` (local or gs://), or of a named
  VAE ("NAME:WEIGHTS")."""
  spec = named(path)
  if spec is not None:
    return dict(CONFIGS[spec[0]])
  config_path = os.path.join(find_vae_dir(path), CONFIG_NAME)
  try:
    return json.loads(_read(config_path, "r"))
  except ValueError as e:
    raise ValueError(f"{config_path}: not valid JSON ({e})") from e


def load(path: str, **overrides: Any) -> tuple[AutoencoderKL, dict]:
  """Loads a diffusers AutoencoderKL folder (`config.json` + `diffusion_pytorch_model.safetensors`).

  `path` may be local or remote (gs://, through tf.io.gfile). The weights are read with safetensors' numpy backend, without PyTorch. `overrides` as in
  `from_diffusers`. Returns (module, params). `path` may also be a named VAE "NAME:WEIGHTS"
  (`named`), e.g. the VA-VAE's LDM checkpoint.
  """
  import safetensors.numpy  # pylint: disable=g-import-not-at-top

  spec = named(path)
  if spec is not None:  # "NAME:WEIGHTS": a named config and its LDM checkpoint
    logging.info("Loading VAE %s weights from %s", *spec)
    return from_ldm(CONFIGS[spec[0]], read_ldm_state_dict(spec[1]), **overrides)
  d = find_vae_dir(path)
  config = load_config(d)
  candidates = [WEIGHTS_NAME, "diffusion_pytorch_model.fp16.safetensors"]
  weights = next((os.path.join(d, n) for n in candidates if _isfile(os.path.join(d, n))), None)
  if weights is None:
    raise FileNotFoundError(f"no {WEIGHTS_NAME} in {d!r}; a PyTorch .bin checkpoint must first be converted to "
                            "safetensors (see docs/latents.md)")
  logging.info("Loading VAE weights from %s", weights)
  return from_diffusers(config, safetensors.numpy.load(_read(weights)), **overrides)


def to_uint8(x: Array) -> Array:
  """Images in [-1, 1] -> uint8 as the released sampler: clip(127.5 x + 128, 0, 255), truncated."""
  return jnp.clip(127.5 * x + 128.0, 0.0, 255.0).astype(jnp.uint8)


@functools.partial(jax.jit, static_argnums=(0,), static_argnames=("scale_factor", "norm"))
def decode_to_uint8(module: AutoencoderKL, params: Any, latents: Array,
                    scale_factor: float = DEFAULT_SCALE_FACTOR, norm: Any = None) -> Array:
  """Scaled latents [N, h, w, latent] (as the diffusion model sees them) -> uint8 images [N, H, W, 3].

  `norm` (a dit_jax.latent_norm.LatentNorm, e.g. per-channel statistics) is undone in place of
  the division by `scale_factor`. Jitted with the module static; a sharded `latents` batch
  keeps its sharding.
  """
  z = norm.denormalize(latents) if norm is not None else latents / scale_factor
  x = module.apply(params, z, method=AutoencoderKL.decode)
  return to_uint8(x)

"""REPA (Yu et al. 2025): align a DiT block's hidden states with a frozen encoder's patch features.

A projector (`models.Projector`: Linear(D, 2048), SiLU, Linear(2048, 2048), SiLU,
Linear(2048, encoder dim)) maps the tokens after block `config.repa.depth` (1-based, as REPA's
`encoder_depth`) to the encoder's width, and the step adds

  coefficient * mean over tokens of -cos(projection, encoder feature)

to the objective's loss (`alignment_loss`; logged as `repa`). The encoder runs online in the
step, frozen, on the image stored beside each latent (`records.Extra` 'image', flipped with
its latent), in the model's compute dtype, laid out like the parameters. It works with every
objective that calls the network once on the noisy input (ADM, flow, EDM); the projector
lives in the checkpoint, and sampling and the release formats leave it out
(`models.without_projector`).

Encoders (`config.repa.encoder`): the torch hub's DINOv2 (`dinov2_vitb14`, REPA's, and the
other sizes, with or without registers) read from `config.repa.encoder_path`, a saved
`model.state_dict()`; or 'digits_teacher', the small self-supervised ViT that
`python -m dit_jax.encoders.digits_teacher --out=DIR` trains on the digits (no download is
possible for the demo). REPA's released SiT checkpoints: `from_release`.

Depth rule: REPA aligns block 8 of SiT-XL's 28; `config.repa.depth = 0` takes the same share
of any model's depth, round(8 * depth / 28), at least 1 (B and S at 12 blocks: 3; the digits
demo's 4: 1).
"""

from __future__ import annotations

import dataclasses
import logging
import os
from typing import Any, Callable, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from dit_jax import models
from dit_jax.encoders import dinov2

# The torch hub's DINOv2 backbones: name -> (width, depth, heads, registers, ffn).
HUB_ENCODERS = {
    f"dinov2_{size}{reg}": (*dinov2.SIZES[size], 4 if reg else 0,
                            "swiglu" if size == "vitg14" else "mlp")
    for size in dinov2.SIZES for reg in ("", "_reg")}
ENCODERS = tuple(HUB_ENCODERS) + ("digits_teacher",)
REPA_DEPTH, REPA_OF = 8, 28  # REPA's encoder_depth for SiT-XL/2 (28 blocks)


def config_fields() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  # The frozen encoder: '' (no REPA), 'dinov2_vitb14' (REPA's; any of HUB_ENCODERS), or
  # 'digits_teacher' (python -m dit_jax.encoders.digits_teacher).
  c.encoder = ""
  # Its weights: a torch hub DINOv2 state dict saved with torch.save(model.state_dict()), or
  # the digits teacher's directory ('' with the digits teacher: WORKDIR/digits_teacher,
  # trained there on first use).
  c.encoder_path = ""
  # Weight of the alignment loss (REPA's proj_coeff).
  c.coefficient = 0.5
  # The block (1-based) whose output is aligned; 0: round(8 * depth / 28), REPA's 8 of 28.
  c.depth = 0
  # The projector's hidden width (REPA: 2048).
  c.projector_hidden = 2048
  # The per-example image the encoder sees: an extra of the records (prepare_latents
  # --with_images; the built-in digits with config.data.with_images).
  c.image = "image"
  return c


def enabled(config: ml_collections.ConfigDict) -> bool:
  return bool(config.get("repa") and config.repa.encoder)


def block_depth(config_depth: int, model_depth: int) -> int:
  """The 1-based aligned block: config_depth, or REPA's share of the depth when 0."""
  d = int(config_depth) or max(1, int(round(REPA_DEPTH * model_depth / REPA_OF)))
  if not 1 <= d <= model_depth:
    raise ValueError(f"config.repa.depth={config_depth}: the model has blocks 1 .. {model_depth}")
  return d


def alignment_loss(projection: jax.Array, features: jax.Array) -> jax.Array:
  """[B] mean over tokens of -cos(projection, feature) (REPA's proj_loss per example):
  -1 where every projection points along its feature."""
  p = projection.astype(jnp.float32)
  f = features.astype(jnp.float32)
  p = p / jnp.maximum(jnp.linalg.norm(p, axis=-1, keepdims=True), 1e-12)
  f = f / jnp.maximum(jnp.linalg.norm(f, axis=-1, keepdims=True), 1e-12)
  return -jnp.mean(jnp.sum(p * f, axis=-1), axis=-1)


@dataclasses.dataclass(frozen=True)
class Alignment:
  """What the train step needs for REPA: the encoder (module, preprocessing of the uint8
  images), the captured block (0-based), the loss weight and the image's batch name."""
  encoder: nn.Module
  preprocess: Callable[[jax.Array], jax.Array]
  capture: int
  coefficient: float
  image: str
  dim: int
  tokens: int

  def targets(self, frozen: Any, images: jax.Array, dtype: Any) -> jax.Array:
    """The frozen encoder's patch features [B, T, dim] of uint8 NHWC images (no gradient)."""
    enc = self.encoder.clone(dtype=dtype)
    out = enc.apply({"params": frozen}, self.preprocess(images))
    return jax.lax.stop_gradient(out.astype(jnp.float32))

  def abstract_params(self) -> Any:
    """BOXED ShapeDtypeStructs of the encoder's parameters (for shardings and compiling)."""
    side = self.input_side()
    x = jnp.zeros((1, side, side, self.encoder.in_channels), jnp.float32)
    return jax.eval_shape(lambda: self.encoder.init(jax.random.PRNGKey(0), x))["params"]

  def extra_flops(self, model: models.DiT, image_side: int, channels: int) -> float:
    """Matmul FLOPs per image that REPA adds to the step: the encoder's forward (with the
    resize of the image to its input) once, and the projector's forward and backward (3x)."""
    from dit_jax import flops as flops_lib  # pylint: disable=import-outside-toplevel
    images = jax.ShapeDtypeStruct((1, image_side, image_side, channels), jnp.uint8)
    enc = jax.make_jaxpr(lambda p, x: self.encoder.apply({"params": p}, self.preprocess(x)))(
        nn.meta.unbox(self.abstract_params()), images).jaxpr
    proj = models.Projector(model.projector_hidden, model.projector_dim)
    tokens = jax.ShapeDtypeStruct((1, model.grid_size**2, model.hidden_size), jnp.float32)
    proj_params = jax.eval_shape(proj.init, jax.random.PRNGKey(0), tokens)
    head = jax.make_jaxpr(lambda p, x: proj.apply(p, x))(proj_params, tokens).jaxpr
    return 2.0 * (flops_lib.jaxpr_macs(enc) + 3 * flops_lib.jaxpr_macs(head))

  def input_side(self) -> int:
    g = int(round(self.tokens**0.5))
    return g * self.encoder.patch_size


def encoder_module(config: ml_collections.ConfigDict,
                   image_size: int) -> tuple[dinov2.DinoV2, Callable, int]:
  """(module, preprocessing of uint8 images, input side) of config.repa.encoder."""
  name = config.repa.encoder
  if name == "digits_teacher":
    from dit_jax.encoders import digits_teacher  # pylint: disable=import-outside-toplevel
    module = digits_teacher.MODEL
    side = image_size
    return module, lambda x: digits_teacher.preprocess(x), side
  if name not in HUB_ENCODERS:
    raise ValueError(f"config.repa.encoder={name!r} is not one of {ENCODERS}")
  d, depth, heads, regs, ffn = HUB_ENCODERS[name]
  module = dinov2.DinoV2(embed_dim=d, depth=depth, num_heads=heads, ffn=ffn,
                         num_register_tokens=regs, interpolate_offset=0.0 if regs else 0.1,
                         interpolate_antialias=bool(regs))
  try:
    side = dinov2.input_size(image_size)
  except ValueError as e:
    raise ValueError(f"config.repa.encoder={name!r}: {e}") from None
  return module, lambda x: dinov2.preprocess(x, side), side


def from_config(config: ml_collections.ConfigDict, model: models.DiT,
                manifest: Mapping[str, Any]) -> Alignment | None:
  """The Alignment of config.repa for `model` on a dataset with `manifest` (None: no REPA).
  Errors name the field: a missing image extra, token grids that differ, a bad depth."""
  if not enabled(config):
    return None
  r = config.repa
  extras = manifest.get("extras", {})
  if r.image not in extras:
    raise ValueError(f"config.repa.image={r.image!r}: the records of {config.data.dir} carry "
                     f"no such extra (they have {sorted(extras) or 'none'}): write them with "
                     "`python -m dit_jax.prepare_latents --with_images` (or, for the built-in "
                     "digits, config.data.with_images=True)")
  spec = extras[r.image]
  if spec["dtype"] != "uint8" or len(spec["shape"]) != 3 or spec["flip"] != "width":
    raise ValueError(f"config.repa.image={r.image!r}: the extra is {spec}, not a uint8 "
                     "[H, W, C] image flipped with its latent")
  module, preprocess, side = encoder_module(config, int(spec["shape"][0]))
  tokens = (side // module.patch_size) ** 2
  if tokens != model.grid_size**2:
    raise ValueError(f"config.repa.encoder={r.encoder!r} gives {tokens} patch tokens at "
                     f"{side}px, the model has {model.grid_size**2}: REPA aligns token by token")
  if int(spec["shape"][2]) != module.in_channels:
    raise ValueError(f"config.repa.image={r.image!r}: {spec['shape'][2]} channels, the encoder "
                     f"takes {module.in_channels}")
  depth = block_depth(r.depth, model.depth)
  if not float(r.coefficient) >= 0:
    raise ValueError(f"config.repa.coefficient={r.coefficient} must be >= 0")
  return Alignment(module, preprocess, depth - 1, float(r.coefficient), r.image,
                   module.embed_dim, tokens)


def with_projector(config: ml_collections.ConfigDict, model: models.DiT,
                   align: Alignment | None) -> models.DiT:
  """`model` with REPA's projector after the aligned block (unchanged without REPA)."""
  if align is None:
    return model
  return model.clone(projector_dim=align.dim, projector_hidden=int(config.repa.projector_hidden),
                     projector_depth=align.capture + 1)


def ensure_teacher(config: ml_collections.ConfigDict, workdir: str) -> None:
  """config.repa.encoder='digits_teacher' without an encoder_path: WORKDIR/digits_teacher,
  trained there first (by process 0) when it is not there yet."""
  if config.repa.encoder != "digits_teacher" or config.repa.encoder_path:
    return
  out = os.path.join(workdir, "digits_teacher")
  if jax.process_index() == 0 and not os.path.exists(os.path.join(out, "params.msgpack")):
    from dit_jax.encoders import digits_teacher  # pylint: disable=import-outside-toplevel
    logging.info("REPA: training the digits teacher into %s (python -m "
                 "dit_jax.encoders.digits_teacher)", out)
    digits_teacher.train(out)
  from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel
  multihost_utils.sync_global_devices("digits teacher ready")
  config.repa.encoder_path = out


def load_encoder(config: ml_collections.ConfigDict, align: Alignment) -> Any:
  """The encoder's parameters (numpy, float32) from config.repa.encoder_path, checked against
  the module's shapes (errors name the file)."""
  path = config.repa.encoder_path
  if not path:
    raise ValueError(f"config.repa.encoder_path is empty: give the {config.repa.encoder} weights "
                     + ("(python -m dit_jax.encoders.digits_teacher --out=DIR trains them)"
                        if config.repa.encoder == "digits_teacher" else
                        "(torch.save(torch.hub.load('facebookresearch/dinov2', "
                        f"'{config.repa.encoder}').state_dict(), PATH))"))
  if not os.path.exists(path):
    raise FileNotFoundError(f"config.repa.encoder_path={path}: not found")
  if config.repa.encoder == "digits_teacher":
    from dit_jax.encoders import digits_teacher  # pylint: disable=import-outside-toplevel
    _, params = digits_teacher.load(path)
  else:
    import torch  # pylint: disable=import-outside-toplevel
    sd = torch.load(path, map_location="cpu", weights_only=True)
    sd = sd.get("model", sd) if isinstance(sd, dict) else sd
    try:
      _, params = dinov2.from_hub(sd, num_register_tokens=align.encoder.num_register_tokens)
    except (ValueError, KeyError) as e:
      raise ValueError(f"config.repa.encoder_path={path}: {e}") from None
  shapes = lambda tree: {jax.tree_util.keystr(k): tuple(np.shape(v))
                         for k, v in jax.tree_util.tree_flatten_with_path(tree)[0]}
  want, got = shapes(nn.meta.unbox(align.abstract_params())), shapes(params)
  if want != got:
    diff = sorted(k for k in set(want) | set(got) if want.get(k) != got.get(k))
    raise ValueError(f"config.repa.encoder_path={path}: the weights are not a "
                     f"{config.repa.encoder} (differing: {diff[:3]})")
  return params


# ------------------------------------------------------------ REPA's released SiT checkpoints
def from_release(state_dict: Mapping[str, Any], encoder_depth: int, input_size: int,
                 num_classes: int = 1000, num_heads: int | None = None
                 ) -> tuple[models.DiT, dict]:
  """(model, params) of a REPA SiT state dict (the DiT release's keys plus `projectors.0.*`;
  no learned sigma). input_size is the latent side (32 for 256px images).

  Sizes come from the keys (`convert.infer_model`), the projector's from
  `projectors.0.{0,2,4}`; encoder_depth (1-based, REPA's --encoder-depth: 8 for SiT-XL/2) is
  not in the weights: pass the training run's. num_heads: for widths other than the SiT
  grid's (S/B/L/XL, 64 per head). The model's t is the release's own (0 data,
  1 noise; the flow objective's network_time='repa' samples it)."""
  from dit_jax import convert  # pylint: disable=import-outside-toplevel
  return convert.from_repa(state_dict, encoder_depth, input_size, num_classes, num_heads)


def forward_with_projection(model: models.DiT, params: Any, x: jax.Array, t: jax.Array,
                            y: jax.Array) -> tuple[jax.Array, jax.Array]:
  """(output [B, H, W, C], projection [B, T, projector_dim]) of NHWC x, as REPA's SiT
  `forward(x, t, y)` returns (x, zs[0]); t in the release's own units."""
  return model.apply({"params": params}, x, t, y, project=True)

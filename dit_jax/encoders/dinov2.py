"""DINOv2 (Oquab et al. 2023) in Flax: the frozen encoder of REPA.

`DinoV2` is the ViT of facebookresearch/dinov2 (`vision_transformer.DinoVisionTransformer`):
patch 14, a CLS token, optional register tokens, LayerScale, LayerNorm eps 1e-6, the MLP
(exact GELU) or for ViT-g the fused SwiGLU, and a learned position table for a 37x37 grid that
is resized to the input's grid as DINOv2 resizes it:

- hub models without registers: torch bicubic (a = -0.75, no antialias) with
  `scale_factor = ((h0 + 0.1) / M, (w0 + 0.1) / M)`, DINOv2's `interpolate_offset` 0.1;
- hub models with registers (`*_reg`), and transformers' `Dinov2WithRegistersModel`: size
  (h0, w0), antialiased (`interpolate_antialias`), no offset;
- transformers' `Dinov2Model`: size (h0, w0), no antialias.

The table is used as it is when the grid is the stored one. `encoders.resize` is torch's
bicubic in JAX. `model.apply({"params": p}, x)` takes NHWC images already normalised (ImageNet
mean/std) and returns the final-normed patch tokens [B, T, D] (DINOv2's `x_norm_patchtokens`:
no CLS, no registers).

Converters: `from_hub(state_dict)` reads torch hub state dicts (`blocks.N.attn.qkv.weight`, as
REPA loads `dinov2_vitb14`), `from_transformers(state_dict)` transformers' `Dinov2Model` /
`Dinov2WithRegistersModel` ones (`encoder.layer.N.attention.q_proj.weight`). Both infer the sizes
from the keys.
"""

from __future__ import annotations

import re
from typing import Any, Mapping

import flax.linen as nn
import jax.numpy as jnp
import numpy as np

from dit_jax import models
from dit_jax.encoders import resize as resize_lib

# ImageNet statistics (timm's IMAGENET_DEFAULT_MEAN/STD), as REPA normalises for DINOv2.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# The hub's sizes (dinov2/models/vision_transformer.py vit_small ... vit_giant2).
SIZES = {"vits14": (384, 12, 6), "vitb14": (768, 12, 12), "vitl14": (1024, 24, 16),
         "vitg14": (1536, 40, 24)}


def swiglu_hidden(dim: int, mlp_ratio: float) -> int:
  """DINOv2's SwiGLU width: 2/3 of the MLP's, rounded up to a multiple of 8."""
  return (int(int(dim * mlp_ratio) * 2 / 3) + 7) // 8 * 8


class _Mlp(nn.Module):
  dim: int
  hidden: int
  ffn: str
  dtype: Any

  @nn.compact
  def __call__(self, x):
    if self.ffn == "swiglu":
      x1, x2 = jnp.split(models._dense(2 * self.hidden, "embed", "mlp", self.dtype, "w12")(x), 2,
                         axis=-1)
      return models._dense(self.dim, "mlp", "embed", self.dtype, "w3")(nn.silu(x1) * x2)
    x = models._dense(self.hidden, "embed", "mlp", self.dtype, "fc1")(x)
    return models._dense(self.dim, "mlp", "embed", self.dtype, "fc2")(nn.gelu(x, approximate=False))


class _LayerScale(nn.Module):
  dim: int

  @nn.compact
  def __call__(self, x):
    gamma = self.param("gamma", models._part(nn.initializers.ones_init(), ("embed",)), (self.dim,),
                       jnp.float32)
    return x * gamma.astype(x.dtype)


def _norm(dtype: Any, name: str) -> nn.LayerNorm:
  return nn.LayerNorm(epsilon=1e-6, dtype=jnp.float32, param_dtype=jnp.float32, name=name,
                      scale_init=models._part(nn.initializers.ones_init(), ("embed",)),
                      bias_init=models._part(nn.initializers.zeros_init(), ("embed",)))


class _Block(nn.Module):
  dim: int
  num_heads: int
  hidden: int
  ffn: str
  dtype: Any

  @nn.compact
  def __call__(self, x):
    h = _norm(self.dtype, "norm1")(x).astype(self.dtype)
    h = models.Attention(self.dim, self.num_heads, dtype=self.dtype, name="attn")(h)
    x = x + _LayerScale(self.dim, name="ls1")(h)
    h = _norm(self.dtype, "norm2")(x).astype(self.dtype)
    h = _Mlp(self.dim, self.hidden, self.ffn, self.dtype, name="mlp")(h)
    return x + _LayerScale(self.dim, name="ls2")(h)


class DinoV2(nn.Module):
  """DINOv2's ViT; see the module docstring. `pos_grid` is the stored table's grid (37 for the
  hub's 518px models)."""
  embed_dim: int = 768
  depth: int = 12
  num_heads: int = 12
  patch_size: int = 14
  in_channels: int = 3
  mlp_ratio: float = 4.0
  ffn: str = "mlp"                # 'mlp' (GELU) or 'swiglu' (fused w12, ViT-g)
  num_register_tokens: int = 0
  pos_grid: int = 37
  interpolate_offset: float = 0.1  # 0: resize to a size; else DINOv2's scale_factor offset
  interpolate_antialias: bool = False
  dtype: Any = jnp.float32

  @property
  def hidden(self) -> int:
    if self.ffn == "swiglu":
      return swiglu_hidden(self.embed_dim, self.mlp_ratio)
    return int(self.embed_dim * self.mlp_ratio)

  def positions(self, pos: jnp.ndarray, h0: int, w0: int) -> jnp.ndarray:
    """The patch position table [h0 * w0, D] for an h0 x w0 grid, resized as DINOv2 does."""
    m = self.pos_grid
    table = pos.reshape(m, m, -1).astype(jnp.float32)
    if (h0, w0) == (m, m):
      return table.reshape(m * m, -1)
    if self.interpolate_offset:
      scale = ((h0 + self.interpolate_offset) / m, (w0 + self.interpolate_offset) / m)
      out = resize_lib.resize(table, scale=scale, antialias=self.interpolate_antialias)
    else:
      out = resize_lib.resize(table, size=(h0, w0), antialias=self.interpolate_antialias)
    if out.shape[:2] != (h0, w0):
      raise ValueError(f"DinoV2: the position table resized to {out.shape[:2]}, not {h0}x{w0}")
    return out.reshape(h0 * w0, -1)

  @nn.compact
  def __call__(self, x: jnp.ndarray, masks: jnp.ndarray | None = None) -> jnp.ndarray:
    """x [B, H, W, C] normalised images -> final-normed patch tokens [B, H/p * W/p, D].
    masks [B, T] bool (optional): those patch tokens are replaced by the mask token, as
    DINOv2's `prepare_tokens_with_masks` (iBOT's masked modelling)."""
    b, hh, ww, c = x.shape
    p, d = self.patch_size, self.embed_dim
    if hh % p or ww % p or c != self.in_channels:
      raise ValueError(f"DinoV2: images {hh}x{ww}x{c} need sides divisible by the patch {p} "
                       f"and {self.in_channels} channels")
    h0, w0 = hh // p, ww // p
    kernel_init = models._part(nn.initializers.lecun_normal(), (None, None, None, "embed"))
    tok = nn.Conv(d, (p, p), strides=(p, p), padding="VALID", dtype=self.dtype,
                  param_dtype=jnp.float32, name="patch_embed", kernel_init=kernel_init,
                  bias_init=models._part(nn.initializers.zeros_init(), ("embed",)))(
                      x.astype(self.dtype)).reshape(b, h0 * w0, d)
    init = models._part(nn.initializers.normal(1e-6), (None, None, "embed"))
    cls = self.param("cls_token", init, (1, 1, d), jnp.float32)
    pos = self.param("pos_embed", models._part(nn.initializers.normal(0.02), (None, None, "embed")),
                     (1, 1 + self.pos_grid**2, d), jnp.float32)
    mask_token = self.param("mask_token", models._part(nn.initializers.zeros_init(),
                                                       (None, "embed")), (1, d), jnp.float32)
    if masks is not None:
      tok = jnp.where(masks[..., None], mask_token.astype(tok.dtype)[None], tok)
    cls_tok = (cls[0, 0] + pos[0, 0]).astype(jnp.float32)
    tok = tok.astype(jnp.float32) + self.positions(pos[0, 1:], h0, w0)[None]
    parts = [jnp.broadcast_to(cls_tok, (b, 1, d))]
    if self.num_register_tokens:
      reg = self.param("register_tokens", init, (1, self.num_register_tokens, d), jnp.float32)
      parts.append(jnp.broadcast_to(reg, (b, self.num_register_tokens, d)))
    h = jnp.concatenate(parts + [tok], axis=1).astype(self.dtype)
    for i in range(self.depth):
      h = _Block(d, self.num_heads, self.hidden, self.ffn, self.dtype, name=f"blocks_{i}")(h)
    h = _norm(self.dtype, "norm")(h)
    return h[:, 1 + self.num_register_tokens:]


def input_size(resolution: int) -> int:
  """REPA's encoder input side for images of side `resolution`: 224 * (resolution // 256), the
  16 x 16 patch grid (at patch 14) per 256px, which 256px latents at patch 2 also have."""
  if resolution < 256:
    raise ValueError(f"DINOv2 input for {resolution}px images: REPA resizes to 224 * "
                     f"(resolution // 256), which needs images of 256px or more")
  return 224 * (resolution // 256)


def preprocess(images: jnp.ndarray, size: int, mean=IMAGENET_MEAN,
               std=IMAGENET_STD) -> jnp.ndarray:
  """REPA's preprocessing of uint8 NHWC images for DINOv2: x / 255, ImageNet mean/std, then
  torch's bicubic (no antialias) to size x size (`input_size`). Returns float32."""
  x = images.astype(jnp.float32) / 255.0
  x = (x - jnp.asarray(mean, jnp.float32)) / jnp.asarray(std, jnp.float32)
  return resize_lib.resize(x, size=(size, size))


# ---------------------------------------------------------------- converters
def _t(state_dict: Mapping[str, Any], key: str) -> np.ndarray:
  v = state_dict[key]
  if hasattr(v, "detach"):
    v = v.detach().cpu().float().numpy()
  return np.asarray(v, np.float32)


def _linear(w: np.ndarray, b: np.ndarray) -> dict:
  return {"kernel": w.T, "bias": b}


def _grid(n_pos: int, where: str) -> int:
  m = int(round(n_pos**0.5))
  if m * m != n_pos:
    raise ValueError(f"{where}: {n_pos} patch positions are not a square grid")
  return m


def _heads(dim: int, num_heads: int | None) -> int:
  if num_heads:
    return num_heads
  # The hub's and transformers' sizes keep head_dim 64.
  if dim % 64:
    raise ValueError(f"DINOv2 width {dim} is not a multiple of 64: pass num_heads")
  return dim // 64


def from_hub(state_dict: Mapping[str, Any], num_register_tokens: int | None = None,
             num_heads: int | None = None, dtype: Any = jnp.float32) -> tuple[DinoV2, dict]:
  """(model, params) from a torch hub DINOv2 state dict (`dinov2_vit{s,b,l,g}14[_reg]`).

  Width, depth, patch, MLP kind and registers come from the keys (num_register_tokens, when
  given, must agree); heads are width / 64 as in every hub model. The position table is
  resized as the hub model resizes it: offset 0.1 without registers, antialiased size with."""
  sd = state_dict
  if "blocks.0.attn.qkv.weight" not in sd:
    raise ValueError("from_hub: not a torch hub DINOv2 state dict (no 'blocks.0.attn.qkv.weight'"
                     "; for transformers' naming use from_transformers)")
  if any(k.startswith("blocks.0.0.") for k in sd):
    raise ValueError("from_hub: block-chunked state dict (blocks.0.0.*): load it into the hub "
                     "model and save model.state_dict() with block_chunks=0")
  depth = 1 + max(int(m.group(1)) for k in sd if (m := re.match(r"blocks\.(\d+)\.", k)))
  w = _t(sd, "patch_embed.proj.weight")                 # [D, C, p, p]
  d, c, p = w.shape[0], w.shape[1], w.shape[2]
  regs = int(sd["register_tokens"].shape[1]) if "register_tokens" in sd else 0
  if num_register_tokens is not None and num_register_tokens != regs:
    raise ValueError(f"from_hub: num_register_tokens={num_register_tokens}, but the state dict "
                     f"has {regs} register tokens")
  ffn = "swiglu" if "blocks.0.mlp.w12.weight" in sd else "mlp"
  hidden = _t(sd, "blocks.0.mlp.w3.weight").shape[1] if ffn == "swiglu" else \
      _t(sd, "blocks.0.mlp.fc1.weight").shape[0]
  ratio = hidden / d if ffn == "mlp" else 4.0
  if ffn == "swiglu" and swiglu_hidden(d, ratio) != hidden:
    raise ValueError(f"from_hub: SwiGLU width {hidden} is not DINOv2's for width {d}")
  grid = _grid(_t(sd, "pos_embed").shape[1] - 1, "from_hub pos_embed")
  model = DinoV2(embed_dim=d, depth=depth, num_heads=_heads(d, num_heads), patch_size=p,
                 in_channels=c, mlp_ratio=ratio, ffn=ffn, num_register_tokens=regs,
                 pos_grid=grid, interpolate_offset=0.0 if regs else 0.1,
                 interpolate_antialias=bool(regs), dtype=dtype)
  params = {
      "patch_embed": {"kernel": w.transpose(2, 3, 1, 0), "bias": _t(sd, "patch_embed.proj.bias")},
      "cls_token": _t(sd, "cls_token"), "pos_embed": _t(sd, "pos_embed"),
      "mask_token": _t(sd, "mask_token").reshape(1, d) if "mask_token" in sd else
      np.zeros((1, d), np.float32),
      "norm": {"scale": _t(sd, "norm.weight"), "bias": _t(sd, "norm.bias")},
  }
  if regs:
    params["register_tokens"] = _t(sd, "register_tokens")
  for i in range(depth):
    b = f"blocks.{i}."
    lin = lambda name: _linear(_t(sd, b + name + ".weight"), _t(sd, b + name + ".bias"))
    mlp = {"w12": lin("mlp.w12"), "w3": lin("mlp.w3")} if ffn == "swiglu" else \
        {"fc1": lin("mlp.fc1"), "fc2": lin("mlp.fc2")}
    params[f"blocks_{i}"] = {
        "norm1": {"scale": _t(sd, b + "norm1.weight"), "bias": _t(sd, b + "norm1.bias")},
        "attn": {"qkv": lin("attn.qkv"), "proj": lin("attn.proj")},
        "ls1": {"gamma": _t(sd, b + "ls1.gamma")},
        "norm2": {"scale": _t(sd, b + "norm2.weight"), "bias": _t(sd, b + "norm2.bias")},
        "mlp": mlp, "ls2": {"gamma": _t(sd, b + "ls2.gamma")},
    }
  _check(model, params, "from_hub")
  return model, params


def from_transformers(state_dict: Mapping[str, Any], num_heads: int | None = None,
                      dtype: Any = jnp.float32) -> tuple[DinoV2, dict]:
  """(model, params) from transformers' `Dinov2Model` or `Dinov2WithRegistersModel` state
  dict (keys with or without a leading 'dinov2.'); the position table is resized as that
  model resizes it (to a size; antialiased with registers)."""
  sd = {k[len("dinov2."):] if k.startswith("dinov2.") else k: v for k, v in state_dict.items()}
  if "encoder.layer.0.norm1.weight" not in sd:
    raise ValueError("from_transformers: not a transformers Dinov2Model state dict (no "
                     "'encoder.layer.0.norm1.weight'; for torch hub naming use from_hub)")
  depth = 1 + max(int(m.group(1)) for k in sd if (m := re.match(r"encoder\.layer\.(\d+)\.", k)))
  w = _t(sd, "embeddings.patch_embeddings.projection.weight")
  d, c, p = w.shape[0], w.shape[1], w.shape[2]
  regs = int(sd["embeddings.register_tokens"].shape[1]) if "embeddings.register_tokens" in sd \
      else 0
  swiglu = "encoder.layer.0.mlp.gate_proj.weight" in sd or "encoder.layer.0.mlp.weights_in.weight" in sd
  if swiglu:
    gate = "mlp.gate_proj" if "encoder.layer.0.mlp.gate_proj.weight" in sd else None
    hidden = _t(sd, "encoder.layer.0.mlp." + ("down_proj" if gate else "weights_out") +
                ".weight").shape[1]
  else:
    hidden = _t(sd, "encoder.layer.0.mlp.fc1.weight").shape[0]
  grid = _grid(_t(sd, "embeddings.position_embeddings").shape[1] - 1, "from_transformers")
  model = DinoV2(embed_dim=d, depth=depth, num_heads=_heads(d, num_heads), patch_size=p,
                 in_channels=c, mlp_ratio=4.0 if swiglu else hidden / d,
                 ffn="swiglu" if swiglu else "mlp", num_register_tokens=regs, pos_grid=grid,
                 interpolate_offset=0.0, interpolate_antialias=bool(regs), dtype=dtype)
  params = {
      "patch_embed": {"kernel": w.transpose(2, 3, 1, 0),
                      "bias": _t(sd, "embeddings.patch_embeddings.projection.bias")},
      "cls_token": _t(sd, "embeddings.cls_token"),
      "pos_embed": _t(sd, "embeddings.position_embeddings"),
      "mask_token": _t(sd, "embeddings.mask_token").reshape(1, d)
      if "embeddings.mask_token" in sd else np.zeros((1, d), np.float32),
      "norm": {"scale": _t(sd, "layernorm.weight"), "bias": _t(sd, "layernorm.bias")},
  }
  if regs:
    params["register_tokens"] = _t(sd, "embeddings.register_tokens")
  for i in range(depth):
    b = f"encoder.layer.{i}."
    lin = lambda name: _linear(_t(sd, b + name + ".weight"), _t(sd, b + name + ".bias"))
    if b + "attention.q_proj.weight" in sd:  # transformers 5
      qkv, out = [lin(f"attention.{n}_proj") for n in "qkv"], lin("attention.o_proj")
    else:  # transformers 4, and the checkpoints on the hub (facebook/dinov2-*)
      qkv = [lin(f"attention.attention.{n}") for n in ("query", "key", "value")]
      out = lin("attention.output.dense")
    attn = {"qkv": {"kernel": np.concatenate([q["kernel"] for q in qkv], axis=1),
                    "bias": np.concatenate([q["bias"] for q in qkv])}, "proj": out}
    if swiglu:
      if gate:
        g, u = lin("mlp.gate_proj"), lin("mlp.up_proj")
        mlp = {"w12": {"kernel": np.concatenate([g["kernel"], u["kernel"]], axis=1),
                       "bias": np.concatenate([g["bias"], u["bias"]])},
               "w3": lin("mlp.down_proj")}
      else:
        mlp = {"w12": lin("mlp.weights_in"), "w3": lin("mlp.weights_out")}
    else:
      mlp = {"fc1": lin("mlp.fc1"), "fc2": lin("mlp.fc2")}
    params[f"blocks_{i}"] = {
        "norm1": {"scale": _t(sd, b + "norm1.weight"), "bias": _t(sd, b + "norm1.bias")},
        "attn": attn, "ls1": {"gamma": _t(sd, b + "layer_scale1.lambda1")},
        "norm2": {"scale": _t(sd, b + "norm2.weight"), "bias": _t(sd, b + "norm2.bias")},
        "mlp": mlp, "ls2": {"gamma": _t(sd, b + "layer_scale2.lambda1")},
    }
  _check(model, params, "from_transformers")
  return model, params


def _check(model: DinoV2, params: dict, where: str) -> None:
  """Every converted array has the shape the Flax model initialises (errors name the path)."""
  import jax  # pylint: disable=import-outside-toplevel
  side = model.patch_size * 2
  want = jax.eval_shape(lambda: nn.meta.unbox(model.init(
      jax.random.PRNGKey(0), jnp.zeros((1, side, side, model.in_channels))))["params"])
  flat_w = dict(jax.tree_util.tree_flatten_with_path(want)[0])
  flat_p = dict(jax.tree_util.tree_flatten_with_path(params)[0])
  if set(flat_w) != set(flat_p):
    missing = sorted(jax.tree_util.keystr(k) for k in set(flat_w) - set(flat_p))
    extra = sorted(jax.tree_util.keystr(k) for k in set(flat_p) - set(flat_w))
    raise ValueError(f"{where}: parameters missing {missing[:5]}, unexpected {extra[:5]}")
  for k, v in flat_w.items():
    if tuple(flat_p[k].shape) != tuple(v.shape):
      raise ValueError(f"{where}: {jax.tree_util.keystr(k)} has shape {flat_p[k].shape}, the "
                       f"model needs {v.shape}")

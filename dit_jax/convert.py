"""Conversion between the released PyTorch DiT checkpoints and dit_jax Flax parameters.

The released state_dict (facebookresearch/DiT, e.g. DiT-XL-2-256x256.pt) uses PyTorch layouts:
Linear weights [out, in], the patch conv [D, C, p, p], the label table [classes (+1), D], plus the frozen
`pos_embed` [1, T, D]. Flax kernels are [in, out] and the conv kernel is [p, p, C, D] (NHWC).

  params = from_official(state_dict, model)     # nested dict of float32 numpy arrays ('params' collection)
  state_dict = to_official(params, model)        # flat dict of numpy arrays, including pos_embed

CLI (torch is needed only here, to read/write .pt files):

  python -m dit_jax.convert --official DiT-XL-2-256x256.pt --model DiT-XL/2 --image_size 256 --out DIR
  python -m dit_jax.convert --official SiT-XL-2-256.pt --model DiT-XL/2 --out DIR   # flow
  python -m dit_jax.convert --to_official --converted DIR --out DiT-XL-2-256x256.pt
  python -m dit_jax.convert --lightningdit lightningdit-xl-imagenet256-64ep.pt --image_size 256 \
      --vae_factor 16 --out DIR                                      # LightningDiT (flow)

LightningDiT's state dicts (hustvl/LightningDiT) have DiT's layout plus its parts' names
(`mlp.w12`, `mlp.w3`, `norm1.weight`, `attn.q_norm.weight`, the `feat_rope.*` buffers):
`from_lightningdit(state_dict, input_size, num_classes, rope=True, learn_sigma=False)` reads the
architecture off the keys, `to_lightningdit(params, model)` writes them back.

Released SiT checkpoints (Ma et al. 2024) have DiT's state-dict layout; they differ in the
objective, which `--objective` records ('' = 'flow' when the file name contains 'SiT', else
'adm'; flow is SiT's default transport: Linear path, velocity prediction), so that
dit_jax.sample samples them with flow samplers.

`DIR` holds an orbax checkpoint (`DIR/params`, item {'params': params}) and `DIR/model.json`
({"model": name, "kwargs": {...}, "objective": objectives' meta record});
`load_converted(DIR)` returns (model, params), `converted_objective(DIR)` the record.

Models with scan_layers=True hold the blocks as one stacked subtree `blocks/...` ([depth, ...]
arrays) instead of `blocks_0 ... blocks_{depth-1}`: from_official / to_official handle both
layouts (the model says which), and stack_blocks / unstack_blocks convert any tree that holds
parameter dicts (params, EMA, optimizer state) from one layout to the other.
"""

import json
import os
import re
from typing import Any, Mapping

from absl import app
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from dit_jax import models

# Flax path component -> released name component.
_RENAMES = {'mlp_0': 'mlp.0', 'mlp_2': 'mlp.2', 'adaLN_modulation': 'adaLN_modulation.1',
            'kernel': 'weight', 'embedding': 'weight', 'scale': 'weight'}
# Default head counts by width (DiT's and LightningDiT's sizes): heads cannot be read off the
# weights.
_HEADS_BY_WIDTH = {384: 6, 768: 12, 1024: 16, 1152: 16, 1536: 24, 1792: 28}


def _official_key(path: tuple[str, ...]) -> str:
  parts = []
  for p in path:
    m = re.fullmatch(r'blocks_(\d+)', p)
    parts.append(f'blocks.{m.group(1)}' if m else _RENAMES.get(p, p))
  return '.'.join(parts)


def _torch_axes(path: tuple[str, ...], ndim: int) -> tuple[int, ...]:
  """Axis permutation Flax -> torch layout (its own inverse for 2-D; see _flax_axes for 4-D)."""
  if path[-1] == 'kernel' and ndim == 2:  # Dense [in, out] -> Linear [out, in]
    return (1, 0)
  if path[-1] == 'kernel' and ndim == 4:  # conv [p, p, C, D] -> [D, C, p, p]
    return (3, 2, 0, 1)
  return tuple(range(ndim))  # biases and the label table [rows, D] keep their layout


def _flax_axes(path: tuple[str, ...], ndim: int) -> tuple[int, ...]:
  return tuple(int(i) for i in np.argsort(_torch_axes(path, ndim)))


def _flatten(tree: Mapping, prefix: tuple = ()) -> dict[tuple[str, ...], Any]:
  out = {}
  for k, v in tree.items():
    if isinstance(v, Mapping):
      out.update(_flatten(v, prefix + (k,)))
    else:
      out[prefix + (k,)] = v
  return out


def _unflatten(flat: Mapping[tuple[str, ...], Any]) -> dict:
  out: dict = {}
  for path, v in flat.items():
    node = out
    for k in path[:-1]:
      node = node.setdefault(k, {})
    node[path[-1]] = v
  return out


def _is_unrolled(tree: Any) -> bool:
  return isinstance(tree, Mapping) and 'blocks_0' in tree


def _is_stacked(tree: Any) -> bool:
  return isinstance(tree, Mapping) and 'blocks' in tree


def _stack_params(tree: Mapping) -> dict:
  depth = len([k for k in tree if re.fullmatch(r'blocks_\d+', k)])
  blocks = [tree[f'blocks_{i}'] for i in range(depth)]
  xp = np if all(isinstance(x, np.ndarray) for x in jax.tree.leaves(blocks)) else jnp
  out = {k: v for k, v in tree.items() if not re.fullmatch(r'blocks_\d+', k)}
  out['blocks'] = jax.tree.map(lambda *xs: xp.stack(xs), *blocks)
  return out


def _unstack_params(tree: Mapping) -> dict:
  out = {k: v for k, v in tree.items() if k != 'blocks'}
  depth = jax.tree.leaves(tree['blocks'])[0].shape[0]
  for i in range(depth):
    out[f'blocks_{i}'] = jax.tree.map(lambda x, i=i: x[i], tree['blocks'])
  return out


def stack_blocks(tree: Any) -> Any:
  """Per-block layout (blocks_0 ... blocks_{L-1}) -> scanned layout (blocks/... with [L, ...]).

  `tree` is a params dict or any pytree holding params dicts (a TrainState, optax state);
  numpy stays numpy, jax arrays are stacked with jnp (jit it to keep them sharded).
  """
  return jax.tree.map(lambda x: _stack_params(x) if _is_unrolled(x) else x, tree,
                      is_leaf=_is_unrolled)


def unstack_blocks(tree: Any) -> Any:
  """Scanned layout (blocks/... with [L, ...]) -> per-block layout (blocks_0 ... blocks_{L-1})."""
  return jax.tree.map(lambda x: _unstack_params(x) if _is_stacked(x) else x, tree,
                      is_leaf=_is_stacked)


def _as_numpy(x: Any) -> np.ndarray:
  if hasattr(x, 'detach'):  # torch tensor, without importing torch
    x = x.detach().cpu().float().numpy()
  return np.asarray(x, dtype=np.float32)


def _unrolled(model: models.DiT) -> models.DiT:
  return model.clone(scan_layers=False) if model.scan_layers else model


def official_shapes(model: models.DiT) -> dict[str, tuple[int, ...]]:
  """Released state_dict key -> shape for `model` (including pos_embed [1, T, D])."""
  shapes = {'pos_embed': (1, model.grid_size**2, model.hidden_size)}
  for path, leaf in _flatten(models.param_shapes(_unrolled(model))).items():
    shapes[_official_key(path)] = tuple(leaf.shape[i] for i in _torch_axes(path, len(leaf.shape)))
  return shapes


def infer_model(state_dict: Mapping[str, Any], **overrides: Any) -> models.DiT:
  """Reads a DiT configuration off released-layout weight shapes (num_heads from the width).

  Assumes the release's null-class row (class_dropout_prob > 0); pass overrides to change that.
  """
  def shape(key):
    if key not in state_dict:
      raise ValueError(f'Cannot infer the model: state_dict has no key {key!r}')
    return tuple(np.shape(state_dict[key]))

  d, c, p, _ = shape('x_embedder.proj.weight')
  depth = len({k.split('.')[1] for k in state_dict if k.startswith('blocks.')})
  rows = shape('y_embedder.embedding_table.weight')[0]
  out_channels = shape('final_layer.linear.weight')[0] // (p * p)
  kwargs: dict[str, Any] = dict(patch_size=p, in_channels=c, hidden_size=d, depth=depth,
                                num_classes=rows - 1, learn_sigma=out_channels == 2 * c)
  if 'pos_embed' in state_dict:
    kwargs['input_size'] = int(round(np.sqrt(shape('pos_embed')[1]))) * p
  if d in _HEADS_BY_WIDTH:
    kwargs['num_heads'] = _HEADS_BY_WIDTH[d]
  kwargs.update(overrides)
  if 'num_heads' not in kwargs:
    raise ValueError(f'Cannot infer num_heads for hidden_size={d}; pass num_heads explicitly')
  return models.DiT(**kwargs)


def from_official(state_dict: Mapping[str, Any], model: models.DiT | None = None) -> dict:
  """Released-layout state_dict (numpy arrays or torch tensors) -> Flax 'params' (numpy float32).

  `pos_embed`, when present, is checked against the fixed table and otherwise ignored. Raises
  ValueError naming the key (and expected shape) for unknown, missing or mis-shaped entries.
  The params come in `model`'s layout (stacked blocks for scan_layers=True).
  """
  if model is None:
    model = infer_model(state_dict)
  scanned, model = model.scan_layers, _unrolled(model)
  template = _flatten(models.param_shapes(model))
  by_key = {_official_key(path): path for path in template}
  unknown = sorted(set(state_dict) - set(by_key) - {'pos_embed'})
  if unknown:
    raise ValueError(f'Unknown key {unknown[0]!r} in state_dict for {model.__class__.__name__} '
                     f'(depth={model.depth}); unknown keys: {unknown[:10]}')
  expected = official_shapes(model)
  for key in sorted(expected):
    if key == 'pos_embed' and key not in state_dict:
      continue
    if key not in state_dict:
      raise ValueError(f'Missing key {key!r} (expected shape {expected[key]})')
    got = tuple(np.shape(state_dict[key]))
    if got != expected[key]:
      raise ValueError(f'Key {key!r} has shape {got}, expected {expected[key]}')

  if 'pos_embed' in state_dict:
    pos = _as_numpy(state_dict['pos_embed'])[0]
    if not np.allclose(pos, model.pos_embed(), atol=1e-5):
      raise ValueError(f"Key 'pos_embed' does not match the fixed 2-D sin-cos table for "
                       f'input_size={model.input_size}, patch_size={model.patch_size}')

  flat = {}
  for key, path in by_key.items():
    value = _as_numpy(state_dict[key])
    flat[path] = np.ascontiguousarray(value.transpose(_flax_axes(path, value.ndim)))
  params = _unflatten(flat)
  return stack_blocks(params) if scanned else params


def to_official(params: Mapping, model: models.DiT) -> dict[str, np.ndarray]:
  """Flax 'params' (boxed or not, or {'params': ...}; per-block or scanned layout) -> released-layout
  state_dict of numpy arrays."""
  params = nn.meta.unbox(params)
  if set(params) == {'params'}:
    params = params['params']
  model, params = models.without_projector(model, params)  # REPA's: not in the release layout
  # Either layout; checked below per block (blocks_i names the layer).
  params, model = unstack_blocks(params), _unrolled(model)
  flat = _flatten(params)
  template = _flatten(models.param_shapes(model))
  for path, leaf in template.items():
    if path not in flat:
      raise ValueError(f'Missing param {"/".join(path)} (expected shape {tuple(leaf.shape)})')
    if tuple(np.shape(flat[path])) != tuple(leaf.shape):
      raise ValueError(f'Param {"/".join(path)} has shape {tuple(np.shape(flat[path]))}, '
                       f'expected {tuple(leaf.shape)}')
  extra = sorted('/'.join(p) for p in set(flat) - set(template))
  if extra:
    raise ValueError(f'Unknown param {extra[0]} for this model; unknown: {extra[:10]}')
  out = {'pos_embed': model.pos_embed()[None]}
  for path in template:
    value = np.asarray(flat[path], dtype=np.float32)
    out[_official_key(path)] = np.ascontiguousarray(value.transpose(_torch_axes(path, value.ndim)))
  return out


# LightningDiT's rotary tables (buffers of its VisionRotaryEmbeddingFast, in its state dicts).
_ROPE_KEYS = ('feat_rope.freqs_cos', 'feat_rope.freqs_sin')
# (hidden_size, depth) -> LightningDiT's size name.
_LIGHTNING_SIZES = {(768, 12): 'B', (1024, 24): 'L', (1152, 28): 'XL', (1536, 24): '1p0B',
                    (1792, 28): '1p6B'}


def lightningdit_name(model: models.DiT) -> str:
  """'LightningDiT-XL/1' for a model at one of LightningDiT's sizes (ValueError otherwise)."""
  size = _LIGHTNING_SIZES.get((model.hidden_size, model.depth))
  name = f'LightningDiT-{size}/{model.patch_size}'
  if size is None or name not in models.DiT_models:
    raise ValueError(f'width {model.hidden_size}, depth {model.depth}, patch '
                     f'{model.patch_size} is none of LightningDiT\'s models')
  return name


def from_lightningdit(state_dict: Mapping[str, Any], input_size: int, num_classes: int,
                      rope: bool = True, learn_sigma: bool = False,
                      num_heads: int | None = None) -> tuple[models.DiT, dict]:
  """A LightningDiT state dict (hustvl/LightningDiT's key names: `mlp.w12`, `mlp.w3`,
  `norm1.weight`, `attn.q_norm.weight`, ...) -> (model, params).

  Width, depth, heads (from the width), patch size, in-channels, qk-norm, adaLN shift, SwiGLU
  and RMSNorm are read off the keys and shapes; RoPE shows only as the `feat_rope.*` buffers,
  so `rope` says it (buffers present are checked against the table); `num_heads` defaults to
  LightningDiT's for the width. `model.apply({'params':
  params}, x, t, y)` (NHWC) gives the release's `forward(x, t, y)`; with learn_sigma the model
  returns all 2C channels, of which the release's forward keeps the first C.
  """
  keys = set(state_dict)
  if not {'x_embedder.proj.weight', 'blocks.0.adaLN_modulation.1.weight'} <= keys:
    raise ValueError('not a LightningDiT state dict: no x_embedder.proj.weight or '
                     'blocks.0.adaLN_modulation.1.weight')
  d, c, p, _ = np.shape(state_dict['x_embedder.proj.weight'])
  depth = len({k.split('.')[1] for k in keys if k.startswith('blocks.')})
  swiglu = 'blocks.0.mlp.w12.weight' in keys
  hidden = np.shape(state_dict['blocks.0.mlp.w12.weight' if swiglu else
                               'blocks.0.mlp.fc1.weight'])[0]
  if swiglu:
    ratio = 4.0
    if hidden != 2 * int(2 / 3 * int(d * ratio)):
      raise ValueError(f'blocks.0.mlp.w12.weight has {hidden} rows: not SwiGLUFFN(D, '
                       f'int(2/3 * 4D)) at D={d}')
  else:
    ratio = hidden / d
  mods = np.shape(state_dict['blocks.0.adaLN_modulation.1.weight'])[0] // d
  if mods not in (4, 6):
    raise ValueError(f'blocks.0.adaLN_modulation.1.weight: {mods}D rows, expected 6D or 4D')
  rows = np.shape(state_dict['y_embedder.embedding_table.weight'])[0]
  if rows not in (num_classes, num_classes + 1):
    raise ValueError(f'y_embedder.embedding_table.weight has {rows} rows, not num_classes='
                     f'{num_classes} (+1 null class)')
  out = np.shape(state_dict['final_layer.linear.weight'])[0] // (p * p)
  if out != (2 if learn_sigma else 1) * c:
    raise ValueError(f'final_layer.linear.weight gives {out} output channels for {c} input '
                     f'channels: pass learn_sigma={out == 2 * c}')
  has_buffers = all(k in keys for k in _ROPE_KEYS)
  if has_buffers and not rope:
    raise ValueError('the state dict holds feat_rope.* buffers: pass rope=True')
  if num_heads is None and d not in _HEADS_BY_WIDTH:
    raise ValueError(f'hidden_size={d} is none of LightningDiT\'s widths: pass num_heads')
  model = models.DiT(
      input_size=input_size, patch_size=p, in_channels=c, hidden_size=d, depth=depth,
      num_heads=num_heads or _HEADS_BY_WIDTH[d], mlp_ratio=ratio, num_classes=num_classes,
      class_dropout_prob=0.1 if rows == num_classes + 1 else 0.0, learn_sigma=learn_sigma,
      norm='rmsnorm' if 'blocks.0.norm1.weight' in keys else 'layernorm',
      mlp='swiglu' if swiglu else 'gelu', rope=rope,
      qk_norm='blocks.0.attn.q_norm.weight' in keys, adaln_shift=mods == 6)
  model.validate()
  if has_buffers:
    hd = d // model.num_heads
    for key, table in zip(_ROPE_KEYS, models.rope_tables(hd, model.grid_size)):
      if tuple(np.shape(state_dict[key])) != table.shape or not np.allclose(
          _as_numpy(state_dict[key]), table, atol=1e-5):
        raise ValueError(f'{key} does not match the 2-D RoPE table of head_dim {hd} on a '
                         f'{model.grid_size}x{model.grid_size} grid')
  weights = {k: v for k, v in state_dict.items() if k not in _ROPE_KEYS}
  return model, from_official(weights, model)


def to_lightningdit(params: Mapping, model: models.DiT) -> dict[str, np.ndarray]:
  """Flax params -> a LightningDiT state dict (its key names and layouts, `pos_embed` and the
  `feat_rope.*` buffers included, computed by models.rope_tables: within 1e-6 of torch's);
  from_lightningdit reads it back, its weights bit-exactly."""
  out = to_official(params, model)
  if model.rope:
    tables = models.rope_tables(model.hidden_size // model.num_heads, model.grid_size)
    out.update(zip(_ROPE_KEYS, tables))
  return out


def read_latent_stats(path: str, latent_multiplier: float = 1.0):
  """LightningDiT's `latents_stats.pt` ({'mean', 'std'}, each [1, C, 1, 1]) -> a
  dit_jax.latent_norm.LatentNorm: x = (z - mean) / std * latent_multiplier."""
  import torch  # pylint: disable=g-import-not-at-top
  from dit_jax import latent_norm  # pylint: disable=g-import-not-at-top
  stats = torch.load(path, map_location='cpu', weights_only=True)
  if not isinstance(stats, Mapping) or not {'mean', 'std'} <= set(stats):
    raise ValueError(f'{path}: expected LightningDiT\'s latents_stats ({{"mean", "std"}}), got '
                     f'{sorted(stats) if isinstance(stats, Mapping) else type(stats).__name__}')
  mean, std = (np.asarray(stats[k], np.float64).reshape(-1) for k in ('mean', 'std'))
  try:
    return latent_norm.LatentNorm(float(latent_multiplier), tuple(mean.tolist()),
                                  tuple(std.tolist()))
  except ValueError as e:
    raise ValueError(f'{path}: {e}') from None


def convert_lightningdit(path: str, out_dir: str, input_size: int, num_classes: int,
                         rope: bool = True, num_heads: int | None = None,
                         latent_stats: str | None = None) -> tuple[models.DiT, dict]:
  """A LightningDiT .pt (its EMA weights if the file holds them) -> a directory for
  load_converted, recorded as the flow objective (LightningDiT's transport: linear path,
  velocity prediction). `latent_stats`: the latents_stats.pt its latents were normalised with
  (recorded, so sampling undoes it). Returns (model, params)."""
  from dit_jax import objectives  # pylint: disable=g-import-not-at-top
  norm = read_latent_stats(latent_stats) if latent_stats else None
  sd = _load_torch_state_dict(path)
  if 'x_embedder.proj.weight' not in sd or 'final_layer.linear.weight' not in sd:
    raise ValueError(f'{path}: not a LightningDiT checkpoint (no x_embedder.proj.weight or '
                     'final_layer.linear.weight)')
  c, p = np.shape(sd['x_embedder.proj.weight'])[1:3]
  out = np.shape(sd['final_layer.linear.weight'])[0]
  model, params = from_lightningdit(sd, input_size, num_classes, rope=rope,
                                    learn_sigma=out == 2 * c * p * p, num_heads=num_heads)
  kwargs = {k: getattr(model, k) for k in (
      'input_size', 'in_channels', 'num_classes', 'learn_sigma', 'class_dropout_prob', 'norm',
      'mlp', 'rope', 'qk_norm', 'adaln_shift', 'mlp_ratio', 'hidden_size', 'depth', 'num_heads',
      'patch_size')}
  try:
    name = lightningdit_name(model)
  except ValueError:  # another size: the recorded kwargs say it
    name = 'LightningDiT-B/2'
  if norm is not None:
    norm.check_channels(model.in_channels, f'{path}: the model\'s latents')
  objective = objectives.from_meta({'objective': {'name': 'flow'}}).to_meta()
  save_converted(out_dir, params, name, objective=objective, latent_norm=norm, **kwargs)
  return model, params


def save_converted(out_dir: str, params: Mapping, model_name: str, objective: dict | None = None,
                   latent_norm: Any = None, **model_kwargs: Any) -> None:
  """Writes `out_dir/params` (orbax, item {'params': params}) and `out_dir/model.json`
  (`objective`: objectives' to_meta() record; None: ADM, as the DiT release; `latent_norm`: a
  dit_jax.latent_norm.LatentNorm; None: the SD-VAE's scale factor)."""
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  out_dir = os.path.abspath(out_dir)
  model = models.get_model(model_name, **model_kwargs)
  params = nn.meta.unbox(params)
  if set(params) == {'params'}:
    params = params['params']
  if model.h_embedder:  # no released DiT layout to check against: the module's own shapes
    if jax.tree.map(lambda a: a.shape, params) != jax.tree.map(lambda s: s.shape,
                                                              models.param_shapes(model)):
      raise ValueError(f'the parameters do not fit {model_name} {model_kwargs}')
  else:
    to_official(params, model)  # validates names and shapes before anything is written
  os.makedirs(out_dir, exist_ok=True)
  ckptr = ocp.StandardCheckpointer()
  ckptr.save(os.path.join(out_dir, 'params'), {'params': params}, force=True)
  ckptr.wait_until_finished()
  with open(os.path.join(out_dir, 'model.json'), 'w') as f:
    record = {'model': model_name, 'kwargs': model_kwargs}
    if objective is not None:
      record['objective'] = objective
    if latent_norm is not None:
      record['latent_norm'] = latent_norm.to_meta()
    json.dump(record, f, indent=2)


def load_converted(ckpt_dir: str, sharding: Any = None) -> tuple[models.DiT, dict]:
  """Reads a directory written by save_converted -> (model, params); apply as {'params': params}.

  `sharding` (e.g. a replicated NamedSharding over all processes' devices) places every array;
  default: the first local device.
  """
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  ckpt_dir = os.path.abspath(ckpt_dir)
  meta = _read_model_json(ckpt_dir)
  model = models.get_model(meta['model'], **meta.get('kwargs', {}))
  target = {'params': models.param_shapes(model)}
  if sharding is not None:
    target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding),
                          target)
  restored = ocp.StandardCheckpointer().restore(os.path.join(ckpt_dir, 'params'), target)
  return model, restored['params']


def _read_model_json(ckpt_dir: str) -> dict:
  meta_path = os.path.join(os.path.abspath(ckpt_dir), 'model.json')
  if not os.path.exists(meta_path):
    raise FileNotFoundError(f'{meta_path} not found: not a directory written by dit_jax.convert')
  with open(meta_path) as f:
    return json.load(f)


def converted_objective(ckpt_dir: str) -> dict | None:
  """The objective record of a directory written by save_converted (None: ADM, the DiT
  release); objectives.from_meta({'objective': record, ...}) builds it."""
  return _read_model_json(ckpt_dir).get('objective')


def converted_latent_norm(ckpt_dir: str):
  """The latent normalisation a directory written by save_converted records (default: the
  SD-VAE's scale factor 0.18215, the DiT release's)."""
  from dit_jax import latent_norm  # pylint: disable=g-import-not-at-top
  return latent_norm.from_record(_read_model_json(ckpt_dir), f'{ckpt_dir}/model.json',
                                 default_scale=0.18215)


def official_objective(path: str, objective: str = '') -> dict | None:
  """The objective record of a released .pt: a registered objective's name, with that
  objective's defaults (for 'flow' SiT's transport: Linear path, velocity prediction); 'adm'
  is None (the DiT release); '' is flow if the file name contains 'SiT', else adm."""
  from dit_jax import objectives  # pylint: disable=g-import-not-at-top
  if not objective:
    objective = 'flow' if 'SiT' in os.path.basename(path) else 'adm'
  if objective not in objectives.names():
    raise ValueError(f"--objective={objective!r}: use one of {list(objectives.names())} or '' "
                     "(from the file name)")
  if objective == 'adm':
    return None
  return objectives.from_meta({'objective': {'name': objective}}).to_meta()


def _load_torch_state_dict(path: str) -> dict[str, np.ndarray]:
  """Reads a .pt file safely (weights_only) -> flat {name: float32 array}."""
  import argparse  # pylint: disable=g-import-not-at-top
  import torch  # pylint: disable=g-import-not-at-top
  # Training checkpoints of the release also pickle their argparse.Namespace under 'args'.
  with torch.serialization.safe_globals([argparse.Namespace]):
    sd = torch.load(path, map_location='cpu', weights_only=True)
  # Released files are flat state_dicts; training checkpoints hold {'model', 'ema', 'opt', 'args'}.
  for entry in ('ema', 'model'):
    if isinstance(sd, Mapping) and entry in sd and isinstance(sd[entry], Mapping):
      sd = sd[entry]
      break
  sd = {k[len('module.'):] if k.startswith('module.') else k: v for k, v in sd.items()}
  return {k: _as_numpy(v) for k, v in sd.items()}


def to_diffusers(out: str, params: Mapping, model: models.DiT, objective: dict | None,
                 vae_dir: str | None = None, id2label: Mapping[int, str] | None = None) -> str:
  """dit_jax params -> a diffusers folder (dit_jax.diffusers_format.write_pipeline); REPA's
  projector left out, scanned blocks unstacked. Returns what was written, in a line."""
  from dit_jax import diffusers_format  # pylint: disable=g-import-not-at-top
  model, params = models.without_projector(model, dict(unstack_blocks(nn.meta.unbox(params))))
  model = _unrolled(model)
  if diffusers_format.release_architecture(model):
    return diffusers_format.write_pipeline(out, model, objective, release_sd=to_official(
        params, model), vae_dir=vae_dir, id2label=id2label)
  return diffusers_format.write_pipeline(out, model, objective,
                                         lightningdit_sd=to_lightningdit(params, model))


def from_diffusers(path: str) -> tuple[models.DiT, dict]:
  """(DiT, params) of a diffusers DiTPipeline folder (or its transformer/ subfolder)."""
  from dit_jax import diffusers_format  # pylint: disable=g-import-not-at-top
  model, release_sd = diffusers_format.read_transformer(path)
  return model, from_official(release_sd, model)


def named(model: models.DiT) -> tuple[str, dict]:
  """(a DiT_models name, kwargs) that build `model` again: its whole architecture as kwargs."""
  size = {384: 'S', 768: 'B', 1024: 'L', 1152: 'XL'}.get(model.hidden_size, 'S')
  kwargs = models.architecture(model)
  return f'DiT-{size}/{model.patch_size}', kwargs


def _diffusers_source(flags) -> tuple[models.DiT, dict, dict | None]:
  """(model, params, objective record) for --to_diffusers: --official, --converted or --workdir."""
  if flags.official:
    objective = official_objective(flags.official, flags.objective)
    model = models.get_model(flags.model, input_size=flags.image_size // 8,
                             num_classes=flags.num_classes)
    return model, from_official(_load_torch_state_dict(flags.official), model), objective
  if flags.converted:
    model, params = load_converted(flags.converted)
    return model, params, converted_objective(flags.converted)
  if flags.workdir:
    from dit_jax import checkpointing  # pylint: disable=g-import-not-at-top
    model, params, meta = checkpointing.load_ema_model(
        flags.workdir, jax.sharding.SingleDeviceSharding(jax.devices()[0]))
    return model, jax.device_get(params), meta.get('objective')
  raise app.UsageError('--to_diffusers needs --official PATH.pt, --converted DIR or --workdir RUN')


def main(argv: list[str]) -> None:
  del argv
  flags = _FLAGS
  if flags.to_diffusers:
    model, params, objective = _diffusers_source(flags)
    id2label = None
    if flags.id2label:
      with open(flags.id2label) as f:
        id2label = {int(k): v for k, v in json.load(f).items()}
    print(to_diffusers(flags.to_diffusers, params, model, objective, flags.vae, id2label))
    return
  if flags.from_diffusers:
    from dit_jax import diffusers_format  # pylint: disable=g-import-not-at-top
    if not flags.out:
      raise app.UsageError('--from_diffusers needs --out DIR')
    model, params = from_diffusers(flags.from_diffusers)
    objective = diffusers_format.read_objective(flags.from_diffusers)
    name, kwargs = named(model)
    save_converted(flags.out, params, name, objective=objective, **kwargs)
    print(f'converted {flags.from_diffusers} -> {flags.out} (width {model.hidden_size}, depth '
          f'{model.depth}, patch {model.patch_size}, {model.num_classes} classes; objective adm, '
          f'{objective["noise_schedule"]} schedule)')
    return
  if flags.to_official:
    import torch  # pylint: disable=g-import-not-at-top
    if not flags.converted or not flags.out:
      raise app.UsageError('--to_official needs --converted DIR and --out PATH.pt')
    model, params = load_converted(flags.converted)
    sd = {k: torch.from_numpy(np.asarray(v)) for k, v in to_official(params, model).items()}
    torch.save(sd, flags.out)
    print(f'wrote {len(sd)} tensors to {flags.out}')
    return
  if flags.lightningdit:
    if not flags.out:
      raise app.UsageError('--lightningdit needs --out DIR')
    model, params = convert_lightningdit(flags.lightningdit, flags.out, flags.image_size //
                                         flags.vae_factor, flags.num_classes, flags.rope,
                                         latent_stats=flags.latent_stats)
    print(f'converted {flags.lightningdit} -> {flags.out} (width {model.hidden_size}, depth '
          f'{model.depth}, patch {model.patch_size}, input_size {model.input_size}, '
          f'{model.in_channels} channels; objective flow; latents normalised by '
          f'{flags.latent_stats or "the SD-VAE scale factor 0.18215"})')
    return
  if flags.repa:
    if not flags.out or not flags.encoder_depth:
      raise app.UsageError('--repa needs --out DIR and --encoder_depth N (its training run\'s '
                           '--encoder-depth: 8 for SiT-XL/2)')
    model, _ = convert_repa(flags.repa, flags.out, flags.encoder_depth, flags.image_size // 8,
                            flags.num_classes)
    print(f'converted {flags.repa} -> {flags.out} (REPA SiT, width {model.hidden_size}, depth '
          f'{model.depth}, patch {model.patch_size}, projector after block '
          f'{model.projector_depth}; objective flow with network_time=repa; sample with '
          f'dit-sample --checkpoint={flags.out} --vae=DIR --sampler=euler)')
    return
  if flags.meanflow:
    if not flags.out:
      raise app.UsageError('--meanflow needs --out DIR')
    model, params = convert_meanflow(flags.meanflow, flags.out, flags.image_size // 8,
                                     flags.num_classes)
    print(f'converted {flags.meanflow} -> {flags.out} (MeanFlow, width {model.hidden_size}, '
          f'depth {model.depth}, patch {model.patch_size}; sample with dit-sample '
          f'--checkpoint={flags.out} --sampler=meanflow --steps=1 --cfg_scale=1)')
    return
  if not flags.official or not flags.out:
    raise app.UsageError('needs --official PATH.pt (or --meanflow CKPT) and --out DIR')
  if flags.image_size % 8:
    raise app.UsageError(f'--image_size={flags.image_size} must be a multiple of 8 (VAE factor)')
  try:
    objective = official_objective(flags.official, flags.objective)
  except ValueError as e:
    raise app.UsageError(str(e)) from None
  model, params = convert_official(flags.official, flags.out, flags.model, objective,
                                   input_size=flags.image_size // 8,
                                   num_classes=flags.num_classes)
  n = sum(int(np.prod(v.shape)) for v in jax.tree_util.tree_leaves(params))
  print(f'converted {flags.official} -> {flags.out} ({flags.model}, input_size '
        f'{model.input_size}, {n:,} trainable params, objective '
        f'{(objective or {}).get("name", "adm")})')


def convert_official(path: str, out_dir: str, model_name: str, objective: dict | None,
                     **model_kwargs: Any) -> tuple[models.DiT, dict]:
  """A released .pt -> a directory for load_converted (the CLI's conversion); returns
  (model, params)."""
  model = models.get_model(model_name, **model_kwargs)
  params = from_official(_load_torch_state_dict(path), model)
  save_converted(out_dir, params, model_name, objective=objective, **model_kwargs)
  return model, params


def from_repa(state_dict: Mapping[str, Any], encoder_depth: int, input_size: int,
              num_classes: int = 1000, num_heads: int | None = None) -> tuple[models.DiT, dict]:
  """(model, params) of a REPA SiT state dict (the DiT release's keys plus `projectors.0.*`;
  no learned sigma); `dit_jax.repa.from_release` documents it."""
  sd = {k[len('module.'):] if k.startswith('module.') else k: v for k, v in state_dict.items()}
  proj = sorted({m.group(1) for k in sd if (m := re.match(r'projectors\.(\d+)\.', k))})
  if proj != ['0']:
    raise ValueError(f'from_release: expected one projector (projectors.0.*), found '
                     f'{proj or "none"}: a REPA SiT state dict with one encoder')
  p = {k: _as_numpy(v) for k, v in sd.items() if k.startswith('projectors.0.')}
  dit_sd = {k: v for k, v in sd.items() if not k.startswith('projectors.')}
  model = infer_model(dit_sd, input_size=input_size, num_classes=num_classes,
                      **({'num_heads': num_heads} if num_heads else {}))
  if model.learn_sigma:
    raise ValueError("from_release: the state dict predicts 2C channels; REPA's SiT has no "
                     'learned sigma (is this a DiT release?)')
  params = dict(from_official(dit_sd, model))
  if not 1 <= encoder_depth <= model.depth:
    raise ValueError(f'from_release: encoder_depth={encoder_depth} outside 1 .. {model.depth}')
  hidden, dim = p['projectors.0.0.weight'].shape[0], p['projectors.0.4.weight'].shape[0]
  model = model.clone(projector_dim=int(dim), projector_hidden=int(hidden),
                      projector_depth=int(encoder_depth))
  params['projector'] = {
      f'fc{i + 1}': {'kernel': np.ascontiguousarray(p[f'projectors.0.{2 * i}.weight'].T),
                     'bias': p[f'projectors.0.{2 * i}.bias']} for i in range(3)}
  return model, params


def convert_repa(path: str, out_dir: str, encoder_depth: int, input_size: int,
                 num_classes: int) -> tuple[models.DiT, dict]:
  """A REPA SiT checkpoint (.pt; its 'ema' weights if it holds several) -> a directory for
  load_converted, recorded as the flow objective in REPA's time (network_time='repa'), the
  projector kept beside the weights."""
  from dit_jax.objectives import flow as flow_objective  # pylint: disable=g-import-not-at-top
  sd = _load_torch_state_dict(path)
  model, params = from_repa(sd, encoder_depth, input_size, num_classes)
  size = {384: 'S', 768: 'B', 1024: 'L', 1152: 'XL'}.get(model.hidden_size)
  if size is None:
    raise ValueError(f'{path}: width {model.hidden_size} is none of SiT\'s (S, B, L, XL)')
  fields = {**dict(flow_objective.Flow.config_fields()), 'network_time': 'repa'}
  objective = flow_objective.Flow._build(fields, False, 'repa').to_meta()
  kwargs = dict(input_size=input_size, in_channels=model.in_channels, num_classes=num_classes,
                learn_sigma=False, depth=model.depth, num_heads=model.num_heads,
                projector_dim=model.projector_dim,
                projector_hidden=model.projector_hidden, projector_depth=model.projector_depth)
  save_converted(out_dir, params, f'DiT-{size}/{model.patch_size}', objective=objective,
                 **kwargs)
  return model, params


# (hidden_size, depth) -> the DiT size name of MeanFlow's DiT_{S,B,L,XL} (its M: L at depth 16).
_SIZES = {(384, 12): 'S', (768, 12): 'B', (1024, 24): 'L', (1152, 28): 'XL', (1024, 16): 'L'}


def convert_meanflow(path: str, out_dir: str, input_size: int,
                     num_classes: int) -> tuple[models.DiT, dict]:
  """An official MeanFlow checkpoint (flax.training.checkpoints; its EMA parameters if it has
  them) -> a directory for load_converted, recorded as the meanflow objective."""
  from flax.training import checkpoints  # pylint: disable=g-import-not-at-top
  from dit_jax.objectives import meanflow  # pylint: disable=g-import-not-at-top
  raw = checkpoints.restore_checkpoint(os.path.abspath(path), target=None)
  if not isinstance(raw, Mapping):
    raise ValueError(f'{path}: no flax checkpoint found')
  tree = next((raw[k] for k in ('ema_params', 'params') if k in raw), raw)
  tree = tree.get('params', tree)
  model, params = meanflow.from_release(tree, input_size, num_classes)
  size = _SIZES.get((model.hidden_size, model.depth))
  if size is None:
    raise ValueError(f'{path}: width {model.hidden_size} and depth {model.depth} are none of '
                     'MeanFlow\'s DiT sizes')
  kwargs = dict(input_size=input_size, in_channels=model.in_channels, num_classes=num_classes,
                learn_sigma=model.learn_sigma, h_embedder=True, depth=model.depth,
                num_heads=model.num_heads)
  objective = meanflow.MeanFlow(learn_sigma=model.learn_sigma).to_meta()
  save_converted(out_dir, params, f'DiT-{size}/{model.patch_size}', objective=objective,
                 **kwargs)
  return model, params


def run() -> None:
  """Console script `dit-convert` (the same as python -m dit_jax.convert): its flags, then main."""
  global _FLAGS  # pylint: disable=global-statement  (main reads it)
  from absl import flags as absl_flags  # pylint: disable=g-import-not-at-top
  absl_flags.DEFINE_string('official', None, 'Released PyTorch checkpoint (.pt) to convert.')
  absl_flags.DEFINE_string('model', 'DiT-XL/2', f'One of {", ".join(models.DiT_models)}.')
  absl_flags.DEFINE_integer('image_size', 256, 'Image size in pixels (latent size = image_size / 8).')
  absl_flags.DEFINE_integer('num_classes', 1000, 'Number of classes (without the null class).')
  absl_flags.DEFINE_string('out', None, 'Output directory (or .pt file with --to_official).')
  absl_flags.DEFINE_bool('to_official', False, 'Convert a dit_jax checkpoint back to a .pt file.')
  absl_flags.DEFINE_string('converted', None, 'dit_jax checkpoint directory for --to_official.')
  absl_flags.DEFINE_string('meanflow', None, 'An official MeanFlow checkpoint (Gsunshine/meanflow, '
                           'flax) to convert, with --image_size, --num_classes and --out.')
  absl_flags.DEFINE_string('to_diffusers', None, 'Write a diffusers DiTPipeline folder here, '
                           'from --official, --converted or --workdir (its EMA weights).')
  absl_flags.DEFINE_string('from_diffusers', None, 'A diffusers DiTPipeline (or transformer) '
                           'folder to read into a dit_jax checkpoint at --out.')
  absl_flags.DEFINE_string('vae', None, '--to_diffusers: the diffusers SD-VAE folder the latents '
                           'were made with (copied into the pipeline).')
  absl_flags.DEFINE_string('workdir', None, '--to_diffusers: a training run (its newest EMA).')
  absl_flags.DEFINE_string('id2label', None, '--to_diffusers: JSON {class index: "name, ..."} '
                           'for DiTPipeline.get_label_ids.')
  absl_flags.DEFINE_string('repa', None, 'A REPA SiT checkpoint (.pt, sihyun-yu/REPA) to '
                           'convert; with --encoder_depth.')
  absl_flags.DEFINE_integer('encoder_depth', 0, '--repa: the block (1-based) its projector '
                            'reads (REPA\'s --encoder-depth; 8 for SiT-XL/2).')
  absl_flags.DEFINE_string('lightningdit', None, 'A LightningDiT checkpoint (.pt, hustvl/'
                           'LightningDiT) to convert, with --image_size, --vae_factor, '
                           '--num_classes, --rope and --out.')
  absl_flags.DEFINE_integer('vae_factor', 16, '--lightningdit: the latents\' downsampling '
                            '(16: VA-VAE f16d32, 8: SD-VAE).')
  absl_flags.DEFINE_string('latent_stats', None, '--lightningdit: the latents_stats.pt its '
                           'latents were normalised with (recorded; sampling undoes it).')
  absl_flags.DEFINE_bool('rope', True, '--lightningdit: the model uses 2-D RoPE (its use_rope).')
  absl_flags.DEFINE_string('objective', '', "What the .pt was trained with, recorded for "
                           "dit_jax.sample: 'adm' (DiT), 'flow' (SiT: Linear path, velocity "
                           "prediction) or '' (flow if the file name contains 'SiT').")
  _FLAGS = absl_flags.FLAGS
  app.run(main)


if __name__ == '__main__':
  run()

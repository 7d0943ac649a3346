"""The train step and everything built from (config, data): model, objective, optimizer, mesh,
shardings and the ahead-of-time compiled step.

`dit_jax.train` runs the loop around it; benchmarks and `dit_jax.aot` use `build` directly. This
module needs only JAX, Flax, Optax, diffrax and ml_collections (no TensorFlow, clu or Orbax),
so the exact step also runs where only a JAX install is at hand (e.g.
benchmarks/accelerator_speed.py on a GPU image).
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import time
from typing import Any, Mapping

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from jax.sharding import PartitionSpec as P

from dit_jax import (attention, flops as flops_lib, hardware, latent_norm, models, objectives,
                     records, repa as repa_lib, sharding)
from dit_jax.data_info import DataInfo
from dit_jax.lr_schedule import learning_rate_schedule


# A layout fits when the compiled step needs at most this share of a device's memory.
MEMORY_HEADROOM = 0.9
# model.remat='auto' tries these in order, lightest (least recomputation) first.
REMAT_AUTO = ("none", "dots_with_no_batch_dims_saveable", "full")


@flax.struct.dataclass
class TrainState:
  step: jax.Array
  params: Any
  ema_params: Any
  opt_state: Any
  rng: jax.Array  # base key; step s uses fold_in(rng, s)
  # The first step whose loss or gradient norm was NaN/inf, else -1. Accumulated on device
  # every step and fetched only when logging or saving; never checkpointed.
  first_bad_step: jax.Array


def create_model(config: ml_collections.ConfigDict, info: DataInfo) -> models.DiT:
  """The configured DiT for this dataset's latent shape and classes (errors name the field)."""
  h, w, c = info.latent_shape
  if h != w:
    raise ValueError(f"data: latents must be square, the manifest says {info.latent_shape}")
  made_from = info.manifest.get("image_size")
  if made_from and config.data.image_size and int(made_from) != int(config.data.image_size):
    raise ValueError(f"config.data.image_size={config.data.image_size} but the latents in "
                     f"{config.data.dir} were made from {made_from}px images")
  vae = info.manifest.get("vae")  # every manifest names one; synthetic DataInfo may not
  factor = int(info.manifest.get("downsample_factor", 1 if vae == "identity" else 8))
  size = int(made_from or config.data.image_size or 0)
  if vae and size and h * factor != size:
    raise ValueError(
        f"{config.data.dir}/manifest.json: latent_shape {list(info.latent_shape)} does not fit "
        f"{size}px images through the {vae!r} VAE (downsampling {factor}x gives "
        f"{size // factor}x{size // factor}): the manifest's latent_shape or image_size is wrong")
  overrides = {k: v for k, v in config.model.get("overrides", {}).items() if v is not None}
  remat = config.model.remat
  if isinstance(remat, str) and remat.lower() in ("true", "false"):  # --config.model.remat=True
    remat = remat.lower() == "true"
  if remat == "auto":  # decided by `build` from the compiled step's memory
    remat = "none"
  for field, check in (("remat", lambda: models.remat_policy(remat)),
                       ("attention_impl", lambda: attention.check_implementation(
                           config.model.attention_impl))):
    try:
      check()
    except ValueError as e:
      raise ValueError(f"config.model.{field}: {e}") from None
  # Every architecture field config.model holds (a variant is a field there, e.g. norm).
  # Unset (None) keeps the named model's value.
  variant = {k: config.model[k] for k in models.architecture_fields()
             if k in config.model and config.model[k] is not None
             and k not in ("input_size", "in_channels", "num_classes")}
  model = models.get_model(
      config.model.name, input_size=h, in_channels=c, num_classes=info.num_classes,
      dtype=jnp.dtype(config.model.dtype), attention_impl=config.model.attention_impl,
      remat=remat, **variant, **overrides)
  try:
    model.validate()
  except ValueError as e:
    raise ValueError(f"config.model ({config.model.name}, overrides {overrides}) does not fit "
                     f"the {h}x{w}x{c} latents of {config.data.dir}: {e}") from None
  return model


def objective_model(model: models.DiT, objective: objectives.Objective,
                    configured_attention: str | None) -> models.DiT:
  """The model as the objective trains it: its model fields (MeanFlow's second time input),
  and an attention path with a JVP for an objective that differentiates the forward."""
  model = model.clone(**objective.model_fields)
  if objective.drops_labels and not models.has_null_class(model):
    raise ValueError(f"config.model.class_dropout_prob={model.class_dropout_prob}: the "
                     f"{objective.name} objective drops labels to the null class, which a "
                     "model without class dropout (or with one class) lacks")
  if objective.needs_jvp:
    if configured_attention in ("cudnn", "splash", "splash_interpret"):
      raise ValueError(f"config.model.attention_impl={configured_attention!r}: the "
                       f"{objective.name} objective differentiates the network forward "
                       "(jax.jvp), which that kernel does not support: use 'xla' or 'auto'")
    if configured_attention in (None, "auto"):  # 'auto' may have chosen cuDNN or splash
      model = model.clone(attention_impl="xla")
  return model


def create_optimizer(config: ml_collections.ConfigDict):
  o = config.optim
  schedule = learning_rate_schedule(config)
  tx = optax.adamw(schedule, b1=o.b1, b2=o.b2, eps=o.eps, weight_decay=o.weight_decay)
  if o.grad_clip_norm:
    tx = optax.chain(optax.clip_by_global_norm(o.grad_clip_norm), tx)
  return tx, schedule


def init_state(key: jax.Array, model: models.DiT, tx: optax.GradientTransformation,
               local_shape: tuple[int, ...]) -> TrainState:
  """Fresh state with BOXED params (LogicallyPartitioned); unbox after taking shardings."""
  k_init, k_train = jax.random.split(key)
  x = jnp.zeros((1, *local_shape), jnp.float32)
  params = model.init(k_init, x, jnp.zeros((1,), jnp.int32), jnp.zeros((1,), jnp.int32),
                      **models.init_kwargs(model))["params"]
  return TrainState(step=jnp.zeros((), jnp.int32), params=params, ema_params=params,
                    opt_state=tx.init(params), rng=k_train,
                    first_bad_step=jnp.full((), -1, jnp.int32))


# How the random flip reaches the latent moments: the stored pair of orientations.
LATENT_FLIPS = {"mean": "pair", "std": "pair"}


def flip_inputs(batch: Mapping[str, jax.Array], flip: jax.Array | None,
                flips: Mapping[str, str]) -> dict[str, jax.Array]:
  """Every per-example input of `batch` in the orientation `flip` [B] bool chose (None: the
  stored one), by its mode in `flips`: 'pair' ([B, 2, ...], index 1 the flipped image),
  'width' ([B, H, W, ...], mirrored along W) or 'none' (absent inputs too: labels)."""
  out = {}
  for name, value in batch.items():
    mode = flips.get(name, "none")
    if mode == "pair":
      out[name] = value[:, 0] if flip is None else jnp.where(
          flip.reshape((-1,) + (1,) * (value.ndim - 2)), value[:, 1], value[:, 0])
    elif mode == "width" and flip is not None:
      out[name] = jnp.where(flip.reshape((-1,) + (1,) * (value.ndim - 1)),
                            jnp.flip(value, axis=2), value)
    else:
      out[name] = value
  return out


def sample_latents(batch: Mapping[str, jax.Array], key: jax.Array,
                   scale: "latent_norm.LatentNorm | float", random_flip: bool,
                   flips: Mapping[str, str] = LATENT_FLIPS) -> tuple[jax.Array, dict]:
  """The release's training input: random flip, fresh posterior sample, normalised (`scale`:
  a dit_jax.latent_norm.LatentNorm, e.g. per-channel statistics, or the release's scale
  factor); and every other per-example input of the batch, flipped with its latent.

  batch mean/std [B, 2, h, w, c] (index 1 = flipped image) -> x0 [B, h, w, c] float32, and
  {name: array} of the batch's other inputs (labels, extra arrays) as `flip_inputs` lays them.
  """
  k_flip, k_eps = jax.random.split(key)
  n = batch["mean"].shape[0]
  flip = jax.random.bernoulli(k_flip, 0.5, (n,)) if random_flip else None
  inputs = flip_inputs(batch, flip, {**flips, **LATENT_FLIPS})
  mean = inputs.pop("mean").astype(jnp.float32)
  std = inputs.pop("std").astype(jnp.float32)
  z = mean + std * jax.random.normal(k_eps, mean.shape, jnp.float32)
  return latent_norm.as_norm(scale).normalize(z), inputs


def gather_params(params: Any, dtypes: Any, shardings: Any) -> Any:
  """The parameters as the forward uses them: each cast to its compute dtype, then laid out in
  the compute layout. From the update layout that is an all-gather in the compute dtype
  (bfloat16 for the token-matmul kernels): the values the forward sees are those of the
  replicated step, bit for bit, at half the bytes. Without shardings: the casts alone."""
  if shardings is None:
    return jax.tree.map(lambda p, dt: p.astype(dt), params, dtypes)
  return jax.tree.map(lambda p, dt, sh: jax.lax.with_sharding_constraint(p.astype(dt), sh),
                      params, dtypes, shardings)


def split_microbatches(tree: Any, n: int, batch_axes: Any = None) -> Any:
  """[B, ...] -> [n, B/n, ...]: microbatch i takes rows i, i + n, i + 2n, ..., so that each
  device's rows split evenly among the microbatches (no data moves between devices). Without
  batch_axes (one device's rows, inside a shard_map) the reshape alone."""
  def one(x):
    x = x.reshape(x.shape[0] // n, n, *x.shape[1:]).swapaxes(0, 1)
    if batch_axes is None:
      return x
    return jax.lax.with_sharding_constraint(x, P(None, batch_axes))
  return jax.tree.map(one, tree)


def accumulate(grads_of: Any, inputs: dict, microbatches: int, split: Any) -> tuple[Any, dict]:
  """grads_of(inputs) -> (float32 gradients, metrics); with microbatches > 1, the mean over the
  microbatches `split(inputs)` gives ([n, B/n, ...] each), summed by a scan."""
  if microbatches == 1:
    return grads_of(inputs)
  def body(acc, mb):
    return jax.tree.map(jnp.add, acc, grads_of(mb)), None
  first = jax.tree.map(lambda x: x[:x.shape[0] // microbatches], inputs)
  zeros = jax.tree.map(lambda x: jnp.zeros(x.shape, jnp.float32),
                       jax.eval_shape(grads_of, first))
  total, _ = jax.lax.scan(body, zeros, split(inputs))
  return jax.tree.map(lambda x: x / microbatches, total)


def explicit_grads(params: Any, inputs: dict, loss_fn: Any, param_dtypes: Any, grad_sh: Any,
                   microbatches: int, stationary: bool = True) -> tuple[Any, dict]:
  """(float32 gradients laid out as grad_sh, metrics) of loss_fn's batch mean, with the
  data-parallel collectives written out: a shard_map over the whole mesh in which each device
  all-gathers every parameter from its stored layout in the forward's dtype
  (`sharding.gather_local`), differentiates its own rows of the batch, and reduce-scatters
  each gradient, in that dtype, back into the stored layout (`sharding.reduce_local`; an
  all-reduce for a replicated one). Microbatches split each device's rows as
  `split_microbatches` splits the batch, each reduced as it is done. Metrics are means over
  the devices of each device's means (the batch means for equal shares: loss, mse, vb).

  `stationary` (config.sharding.modulation='stationary'): the adaLN modulation parameters,
  when all are stored split by output columns (`sharding.stationary_axes`), are not gathered:
  each device computes its columns of the modulations for its group's images
  (`sharding.stationary_matmul`), and their gradients need no reduce-scatter. loss_fn(p, mb,
  adaln_matmul) passes the matmul to the model (`models.Modulation`).
  """
  specs = jax.tree.map(lambda sh: sh.spec, grad_sh)
  mesh = jax.tree.leaves(grad_sh)[0].mesh
  axes = tuple(mesh.axis_names)
  adaln = sharding.stationary_axes(params, specs) if stationary else None
  keep = jax.tree_util.tree_map_with_path(
      lambda path, _: adaln is not None and sharding.is_modulation(path), params)
  # A kept block's gradient is its group's sum already: only the other axes (e.g. 'slice').
  rest = tuple(a for a in axes if a not in (adaln or ()) and mesh.shape[a] > 1)

  def reduce(g, sp, kept):
    if not kept:
      return sharding.reduce_local(g, sp, mesh)
    return jax.lax.psum(g, rest) if rest else g

  def local(p, rows):
    full = jax.tree.map(lambda x, dt, sp, kept: x.astype(dt) if kept else
                        sharding.gather_local(x.astype(dt), sp, mesh), p, param_dtypes, specs,
                        keep)
    matmul = sharding.stationary_matmul(adaln, mesh) if adaln else None

    def grads_of(mb):
      (loss, terms), g = jax.value_and_grad(loss_fn, has_aux=True)(full, mb, matmul)
      g = jax.tree.map(lambda x, sp, kept: reduce(x, sp, kept).astype(jnp.float32) / mesh.size,
                       g, specs, keep)
      return g, jax.tree.map(lambda m: jax.lax.pmean(m, axes), {"loss": loss, **terms})

    # This device's rows i, i + n, ...: its share of the global split's microbatch i.
    split = lambda tree: split_microbatches(tree, microbatches)
    return accumulate(grads_of, rows, microbatches, split)

  return jax.shard_map(local, mesh=mesh, in_specs=(specs, P(axes)), out_specs=(specs, P()),
                       check_vma=False)(params, inputs)


def train_step(state: TrainState, batch: dict, frozen: Any = None, *, model: models.DiT,
               objective: objectives.Objective, tx: optax.GradientTransformation,
               schedule: Any, ema_decay: float, scale: Any, random_flip: bool,
               microbatches: int = 1,
               param_dtypes: Any = None, compute_sh: Any = None, grad_sh: Any = None,
               batch_axes: Any = None, explicit: bool = False,
               stationary_adaln: bool = True,
               flips: Mapping[str, str] = LATENT_FLIPS,
               align: repa_lib.Alignment | None = None) -> tuple[TrainState, dict]:
  """One AdamW step on the objective's loss, then the EMA update. Metrics: loss, the
  objective's logged scalars (ADM: mse, vb), grad_norm, learning_rate.

  The objective sees every per-example input: the batch's (labels, extra arrays of the
  records, each flipped with its latent by its mode in `flips`), its own draws (t, noise) and
  x0; the step names none of them but the latent moments and the labels.

  The parameters are gathered once into the compute layout (`gather_params`); each device's
  share of the gradient is reduce-scattered into `grad_sh` (the stored parameters' layout) and
  cast to float32, so the update runs on each device's 1/N of the state. With `microbatches`
  > 1 the batch is processed in that many slices by a scan, gradients summed in float32: the
  same step as the whole batch at once, up to float rounding. All randomness (flip, posterior
  sample, the objective's draws, label dropout) is drawn for the whole batch first.

  `explicit` (config.sharding.collectives='explicit'; data-parallel compute layouts only): the
  forward and backward run per device in a shard_map over grad_sh's mesh, with the all-gather
  and the reduce-scatter written out (`explicit_grads`) rather than left to XLA's partitioner.
  The same step, up to the order of the float sums. `stationary_adaln`
  (config.sharding.modulation): there, the adaLN modulations are computed where their
  parameters are stored rather than gathered (`explicit_grads`).

  `align` (REPA, dit_jax.repa): the frozen encoder (parameters `frozen`) turns the batch's
  image, flipped with its latent, into per-token targets for the whole batch first; the
  network's first call on the noisy input also returns its projection of the aligned block,
  and coefficient x the alignment loss joins the objective's (logged as `repa`).
  """
  key = jax.random.fold_in(state.rng, state.step)
  k_x0, k_t, k_noise, k_drop = jax.random.split(key, 4)
  x0, extras = sample_latents(batch, k_x0, scale, random_flip, flips)
  if align is not None:  # the encoder's features of each (flipped) image: REPA's targets
    extras["repa_target"] = align.targets(frozen, extras.pop(align.image), model.dtype)
  n = x0.shape[0]
  # Label dropout to the null class (classifier-free guidance), as the model would draw it.
  drop = (jax.random.uniform(k_drop, (n,)) < model.class_dropout_prob).astype(jnp.int32)
  # Every per-example input (the batch's, and the objective's draws) is split by microbatches.
  drawn = {**objective.draw(k_t, k_noise, x0), "x0": x0, "drop": drop}
  clash = sorted(set(drawn) & set(extras))
  if clash:
    raise ValueError(f"the batch's per-example arrays {clash} have the names of the "
                     f"{objective.name} objective's training inputs: rename them in the records")
  inputs = {**extras, **drawn}
  if param_dtypes is None:
    param_dtypes = models.compute_dtypes(model, state.params)

  def loss_fn(p, mb, adaln_matmul=None):
    m = model if adaln_matmul is None else model.clone(adaln_matmul=adaln_matmul)
    projections = []  # REPA: the first call's projection (the objective's noisy input)

    def model_fn(x, tt, y=None, **kwargs):
      # The batch's labels with the step's dropout; labels given (y) are used as they are.
      if model.class_dropout_prob > 0:
        kwargs.setdefault("force_drop_ids", mb["drop"] if y is None else jnp.zeros_like(tt))
      labels = mb["label"] if y is None else y
      if align is not None and not projections:
        out, projection = m.apply({"params": p}, x, tt, labels, train=True, project=True,
                                  **kwargs)
        projections.append(projection)
        return out
      return m.apply({"params": p}, x, tt, labels, train=True, **kwargs)
    loss, logged = objective.training_losses(model_fn, mb["x0"], mb)
    if align is None:
      return loss.mean(), logged
    if not projections:
      raise ValueError(f"config.repa: the {objective.name} objective never called the network")
    aligned = repa_lib.alignment_loss(projections[0], mb["repa_target"]).mean()
    return loss.mean() + align.coefficient * aligned, {**logged, "repa": aligned}

  if explicit:
    grads, metrics = explicit_grads(state.params, inputs, loss_fn, param_dtypes, grad_sh,
                                    microbatches, stationary_adaln)
  else:
    params = gather_params(state.params, param_dtypes, compute_sh)

    def grads_of(mb):
      (loss, terms), g = jax.value_and_grad(loss_fn, has_aux=True)(params, mb)
      if grad_sh is not None:  # each device keeps its share of the summed gradient
        g = jax.tree.map(jax.lax.with_sharding_constraint, g, grad_sh)
      return jax.tree.map(lambda x: x.astype(jnp.float32), g), {"loss": loss, **terms}

    split = lambda tree: split_microbatches(tree, microbatches, batch_axes)
    grads, metrics = accumulate(grads_of, inputs, microbatches, split)

  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  new_params = optax.apply_updates(state.params, updates)
  ema = optax.incremental_update(new_params, state.ema_params, step_size=1.0 - ema_decay)
  grad_norm = optax.tree.norm(grads)
  metrics = {**metrics, "grad_norm": grad_norm, "learning_rate": schedule(state.step)}
  finite = jnp.isfinite(metrics["loss"]) & jnp.isfinite(grad_norm)
  first_bad = jnp.where((state.first_bad_step < 0) & ~finite, state.step + 1,
                        state.first_bad_step)
  new = state.replace(step=state.step + 1, params=new_params, ema_params=ema,
                      opt_state=opt_state, first_bad_step=first_bad)
  return new, metrics


@dataclasses.dataclass
class TrainSetup:
  """The model, objective, mesh, state shardings and ahead-of-time compiled train step built
  from (config, data), with its figures: what training, benchmarks and tools share."""
  model: models.DiT
  objective: objectives.Objective  # what is trained, recorded in checkpoint meta
  mesh: jax.sharding.Mesh
  layout: sharding.Layout  # how each part of the state is sharded (config.sharding)
  state_sh: Any           # NamedShardings of the (unboxed) TrainState
  compute_sh: Any         # NamedShardings of the parameters as the forward uses them
  batch_sh: Any
  repl: Any
  abstract: TrainState    # ShapeDtypeStructs of the state
  init: Any               # key -> sharded fresh TrainState
  compiled: Any           # (state, global batch) -> (state, metrics), donates state
  microbatches: int       # gradient accumulation steps inside one train step
  explicit: bool          # collectives written out in a shard_map (config.sharding.collectives)
  flops: float            # per device per step, from XLA's cost analysis (with recomputation;
                          # on GPUs it misses the cuBLAS/cuDNN calls, which XLA does not count)
  model_flops: float      # per device per step: 3 x the forward's matmul FLOPs (the paper's
                          # count; MFU's numerator, whatever remat recomputes); with REPA also
                          # the encoder's forward and 3 x the projector's
  memory_gib: float       # per device: arguments + outputs + temporaries - aliased
  compile_seconds: float
  # REPA (config.repa): the alignment, the frozen encoder's parameter shardings, and its
  # parameters placed with them (set by `load_frozen` before the first step).
  align: repa_lib.Alignment | None = None
  frozen_sh: Any = None
  frozen: Any = None

  def step(self, state: TrainState, batch: dict) -> tuple[TrainState, dict]:
    """One compiled train step (with the frozen encoder's parameters under REPA)."""
    if self.align is None:
      return self.compiled(state, batch)
    if self.frozen is None:
      raise RuntimeError("REPA: load the encoder first (TrainSetup.load_frozen)")
    return self.compiled(state, batch, self.frozen)

  def load_frozen(self, params: Any) -> None:
    """Places the frozen encoder's parameters (numpy) in the model's dtype and layout."""
    self.frozen = jax.tree.map(
        lambda x, sh: jax.device_put(jnp.asarray(x, frozen_dtype(x, self.model.dtype)), sh),
        params, self.frozen_sh)


def _microbatch_sizes(microbatches: int, per_device: int) -> list[int]:
  """config.optim.microbatches: a count, or 0 = auto (1, then 2, 4, ... while none fits)."""
  m = int(microbatches)
  if m < 0:
    raise ValueError(f"config.optim.microbatches={m}: use 1 (none), N >= 2 or 0 (auto)")
  if m and per_device % m:
    raise ValueError(f"config.optim.microbatches={m} must divide the {per_device} images per "
                     "device (config.data.global_batch_size / devices)")
  if m:
    return [m]
  return [k for k in (2**i for i in range(per_device.bit_length())) if per_device % k == 0]


def build(config: ml_collections.ConfigDict, info: DataInfo,
          devices: Any = None) -> TrainSetup:
  """Model, objective, optimizer, mesh, shardings, and the train step compiled ahead of time.

  `devices` default to jax.devices(); AOT topology devices (jax.experimental.topologies)
  compile for hardware that is not attached. With config.mesh.fsdp = 0 (auto) the layout is
  data parallel if the compiled step fits a device's memory, else the smallest power-of-two
  FSDP within a slice that does. With config.model.remat = 'auto' each layout tries the
  policies of REMAT_AUTO, lightest first; `TrainSetup.model.remat` is the one chosen. With
  config.optim.microbatches = 0 (auto), gradient accumulation is tried (2, 4, ... microbatches
  with the last layout and policy) only when nothing else fits.
  """
  gbs = config.data.global_batch_size
  devices = list(jax.devices() if devices is None else devices)
  layout = sharding.Layout.from_config(config)
  model = create_model(config, info)
  tokens = (model.input_size // model.patch_size) ** 2
  model = model.clone(attention_impl=attention.resolve_for(model.attention_impl, model.dtype,
                                                           devices[0].platform, tokens))
  objective = objectives.from_config(config)
  model = objective_model(model, objective, config.model.attention_impl)
  align = repa_lib.from_config(config, model, info.manifest)
  if align is not None and objective.needs_jvp:
    raise ValueError(f"config.repa.encoder={config.repa.encoder!r}: the {objective.name} "
                     "objective differentiates the network forward (jax.jvp); REPA runs with "
                     "objectives that call it once on the noisy input (adm, flow, edm)")
  model = repa_lib.with_projector(config, model, align)
  tx, schedule = create_optimizer(config)
  if gbs % len(devices):
    raise ValueError(f"config.data.global_batch_size={gbs} must divide by the {len(devices)} "
                     "devices (one image per device at least: raise the batch on large pods)")
  micros = _microbatch_sizes(config.optim.get("microbatches", 1), gbs // len(devices))
  init_fn = functools.partial(init_state, model=model, tx=tx, local_shape=info.latent_shape)
  boxed = jax.eval_shape(init_fn, jax.random.PRNGKey(0))
  auto = config.mesh.fsdp == 0
  sizes = sharding.fsdp_candidates(devices, config.mesh.data) if auto else [config.mesh.fsdp]
  if not sizes:
    raise ValueError(f"config.mesh.data={config.mesh.data} does not divide the "
                     f"{len(devices) // sharding.num_slices(devices)} devices of a slice")
  limit = hardware.memory_bytes(devices[0])
  remat_auto = config.model.remat == "auto"
  # remat 'auto': the lightest policy that fits, within each layout (FSDP shrinks the state,
  # remat the activations); without a known memory size, no remat.
  remats = REMAT_AUTO if remat_auto and limit else (model.remat,)
  micro_auto = len(micros) > 1
  search = (auto or remat_auto or micro_auto) and limit
  if not limit:
    micros = micros[:1]
  candidates = [(fsdp, remat, micros[0]) for fsdp in sizes for remat in remats]
  candidates += [(sizes[-1], remats[-1], m) for m in micros[1:]]
  abstract = nn.meta.unbox(boxed)
  for i, (fsdp, remat, micro) in enumerate(candidates):
    last = i == len(candidates) - 1
    mesh = sharding.create_mesh(config.mesh.data, fsdp, devices)
    if search and not last:
      # The state alone, as laid out: no need to compile a layout whose state does not fit.
      held = sharding.device_bytes(sharding.state_shardings(boxed, mesh, layout), abstract)
      if held > MEMORY_HEADROOM * limit:
        continue
    setup = _compile(config, info, model.clone(remat=remat), objective, tx, schedule, init_fn,
                     boxed, mesh, layout, micro, align)
    need = setup.memory_gib * 2**30
    if not search or need <= MEMORY_HEADROOM * limit:
      if remat_auto or micro_auto:
        logging.info("fsdp=%d, remat %r, %d microbatch(es) fit (%.1f GiB per device)", fsdp,
                     remat, micro, setup.memory_gib)
      break
    if last:
      logging.warning("The train step needs %.1f GiB per device even at fsdp=%d with remat %r "
                      "and %d microbatch(es), more than %.0f%% of the %.1f GiB a device has: "
                      "use %sa smaller batch", setup.memory_gib, fsdp, remat, micro,
                      100 * MEMORY_HEADROOM, limit / 2**30,
                      "" if remat_auto else "model.remat='auto' (or 'full') or ")
    else:
      logging.info("fsdp=%d with remat %r and %d microbatch(es) needs %.1f GiB per device "
                   "(> %.0f%% of %.1f GiB): trying the next layout", fsdp, remat, micro,
                   setup.memory_gib, 100 * MEMORY_HEADROOM, limit / 2**30)
  return setup


def _compile(config: ml_collections.ConfigDict, info: DataInfo,
             model: models.DiT, objective: objectives.Objective, tx: Any, schedule: Any,
             init_fn: Any, boxed: Any, mesh: jax.sharding.Mesh, layout: sharding.Layout,
             microbatches: int, align: repa_lib.Alignment | None = None) -> TrainSetup:
  gbs = config.data.global_batch_size
  sharding.log_mesh(mesh)
  state_sh = sharding.state_shardings(boxed, mesh, layout)
  compute_sh = sharding.compute_shardings(boxed.params, mesh, layout)
  abstract = nn.meta.unbox(boxed)
  sharded_bytes, repl_bytes = sharding.replicated_bytes(compute_sh, abstract.params)
  logging.info("Parameters: %s (as the forward uses them: %s); per device the state holds "
               "%.1f MiB (parameters %s, Adam moments %s, EMA %s)",
               f"{sum(x.size for x in jax.tree.leaves(abstract.params)):,}",
               sharding.describe(compute_sh, abstract.params),
               sharding.device_bytes(state_sh, abstract) / 2**20, layout.params,
               layout.opt_state, layout.ema)
  if mesh.shape["fsdp"] > 1 and repl_bytes > 0.01 * (sharded_bytes + repl_bytes):
    logging.warning("%.1f MiB of parameters stay replicated at fsdp=%d (no dimension divides): "
                    "each device gathers them whole for the forward",
                    repl_bytes / 2**20, mesh.shape["fsdp"])
  batch_sh, repl = sharding.batch_sharding(mesh), sharding.replicated(mesh)
  frozen_sh = frozen_abstract = None
  if align is not None:
    boxed_frozen = align.abstract_params()
    frozen_sh = sharding.compute_shardings(boxed_frozen, mesh, layout)
    frozen_abstract = nn.meta.unbox(boxed_frozen)
  # Written-out collectives for plain data parallelism; FSDP layouts leave them to XLA.
  explicit = layout.collectives == "explicit" and sharding.is_replicated(compute_sh)
  if layout.collectives == "explicit" and not explicit:
    logging.info("config.sharding.collectives='explicit' is for data-parallel layouts: at "
                 "fsdp=%d XLA's partitioner places the collectives", mesh.shape["fsdp"])

  step_fn = jax.jit(
      functools.partial(train_step, model=model, objective=objective, tx=tx,
                        schedule=schedule, ema_decay=config.ema_decay,
                        scale=latent_norm.of_data(info, config.vae.scale_factor),
                        random_flip=config.data.random_flip, microbatches=microbatches,
                        param_dtypes=models.compute_dtypes(model, abstract.params),
                        compute_sh=compute_sh, grad_sh=state_sh.params,
                        batch_axes=sharding.BATCH_AXES, explicit=explicit,
                        stationary_adaln=layout.modulation == "stationary",
                        flips=records.flip_modes(info.manifest), align=align),
      in_shardings=(state_sh, batch_sh) + ((frozen_sh,) if align else ()),
      out_shardings=(state_sh, repl), donate_argnums=0)
  abstract_batch = {name: jax.ShapeDtypeStruct(shape, dtype, sharding=batch_sh)
                    for name, (shape, dtype) in batch_spec(info, gbs).items()}
  args = (abstract, abstract_batch)
  if align is not None:  # the frozen encoder, in the model's dtype, laid out as the params
    args += (jax.tree.map(lambda x, sh: jax.ShapeDtypeStruct(
        x.shape, frozen_dtype(x, model.dtype), sharding=sh), frozen_abstract, frozen_sh),)
  options = sharding.compiler_options(mesh.devices.flat[0].platform,
                                      config.mesh.get("overlap_collectives", False))
  t0 = time.time()
  with jax.set_mesh(mesh):  # kernels that shard_map themselves (splash attention) see the mesh
    lowered = step_fn.lower(*args)
    compiled = lowered.compile(compiler_options=options) if options else lowered.compile()
    compile_s = time.time() - t0
    flops = float(flops_lib.xla_cost(compiled).get("flops", 0.0))
    if model.scan_layers or microbatches > 1:
      # XLA counts a loop's body once (the scanned blocks, the microbatches): add the other
      # iterations' matmuls, a 1/mesh.size share each (the batch is split over all devices;
      # the explicit step's loops run inside its shard_map, on one device's shapes already).
      # Their elementwise work stays uncounted: the figure is ~1% below the unrolled step's.
      macs = flops_lib.uncounted_loop_macs(step_fn, *args)
      flops += 2 * macs / (1 if explicit else mesh.size)
  model_flops = 3 * forward_flops(model) * gbs / mesh.size
  if align is not None:  # REPA: the encoder's forward and the projector's forward and backward
    image = info.manifest["extras"][align.image]["shape"]
    model_flops += align.extra_flops(model, int(image[0]), int(image[2])) * gbs / mesh.size
  mem = compiled.memory_analysis()
  mem_gib = ((mem.argument_size_in_bytes + mem.output_size_in_bytes + mem.temp_size_in_bytes -
              mem.alias_size_in_bytes) / 2**30) if mem is not None else float("nan")
  logging.info("Compiled the train step in %.1fs: %.3g FLOPs/step/device, %.2f GiB/device",
               compile_s, flops, mem_gib)
  init = jax.jit(lambda k: nn.meta.unbox(init_fn(k)), out_shardings=state_sh)
  return TrainSetup(model=model, objective=objective, mesh=mesh, layout=layout, state_sh=state_sh,
               compute_sh=compute_sh, batch_sh=batch_sh, repl=repl, abstract=abstract,
               init=init, compiled=compiled, microbatches=microbatches, explicit=explicit,
               flops=flops,
               model_flops=model_flops, memory_gib=mem_gib, compile_seconds=compile_s,
               align=align, frozen_sh=frozen_sh)


def frozen_dtype(x: Any, model_dtype: Any) -> Any:
  """The dtype a frozen encoder parameter is held in: the model's compute dtype (float ones)."""
  dt = jnp.dtype(getattr(x, "dtype", np.float32))
  return jnp.dtype(model_dtype) if jnp.issubdtype(dt, jnp.floating) else dt


def batch_spec(info: DataInfo, batch_size: int) -> dict:
  """records.batch_spec of the dataset, its latent shape as `info` gives it."""
  return records.batch_spec({**info.manifest, "latent_shape": list(info.latent_shape)},
                            batch_size)


def forward_flops(model: models.DiT) -> float:
  """Matmul FLOPs of one image's forward pass (attention included; the paper's Gflops)."""
  return 2e9 * flops_lib.matmul_gmacs(model.clone(dtype=jnp.float32, remat=False,
                                                    attention_impl=None, scan_layers=False))


def abstract_state(config: ml_collections.ConfigDict, info: DataInfo,
                   model: models.DiT, mesh: jax.sharding.Mesh) -> tuple[TrainState, Any]:
  """(ShapeDtypeStructs, NamedShardings) of `model`'s unboxed TrainState on `mesh`."""
  tx, _ = create_optimizer(config)
  boxed = jax.eval_shape(functools.partial(init_state, model=model, tx=tx,
                                           local_shape=info.latent_shape), jax.random.PRNGKey(0))
  return nn.meta.unbox(boxed), sharding.state_shardings(boxed, mesh,
                                                        sharding.Layout.from_config(config))

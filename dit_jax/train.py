"""DiT training: state, the sharded train step, and the resumable training loop.

Stages of `train_and_evaluate` (read top to bottom):
  1. data: manifest and this process's shards (built-in digits written on first use);
  2. `build`: model, diffusion, optimizer, mesh and shardings (dit_jax/sharding.py), and the
     train step: one jax.jit with in/out shardings and donated state, compiled ahead of time
     with its FLOPs and memory logged (benchmarks/train_speed.py uses the same `build`);
  3. restore the newest readable checkpoint, or initialise the state directly sharded;
  4. sample grids and evaluation (dit_jax/periodic.py), compiled before training starts;
  5. the loop: metrics, checkpoints (saved before grids and evaluation), SIGTERM handling;
     the data stream restarts where the restored step left it.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import os
import signal
import time
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from clu import metric_writers, periodic_actions
from jax.experimental import multihost_utils

from dit_jax import (checkpointing, demo_data, hardware, input_pipeline, models, periodic,
                     runtime, sampling, sharding)
from dit_jax.diffusion import create_diffusion

# A layout fits when the compiled step needs at most this share of a device's memory.
MEMORY_HEADROOM = 0.9


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


def create_model(config: ml_collections.ConfigDict, info: input_pipeline.DataInfo) -> models.DiT:
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
  model = models.get_model(
      config.model.name, input_size=h, in_channels=c, num_classes=info.num_classes,
      class_dropout_prob=config.model.class_dropout_prob, learn_sigma=config.model.learn_sigma,
      dtype=jnp.dtype(config.model.dtype), attention_impl=config.model.attention_impl,
      remat=config.model.remat, **overrides)
  try:
    model.validate()
  except ValueError as e:
    raise ValueError(f"config.model ({config.model.name}, overrides {overrides}) does not fit "
                     f"the {h}x{w}x{c} latents of {config.data.dir}: {e}") from None
  return model


def model_kwargs(model: models.DiT) -> dict:
  keys = ("input_size", "patch_size", "in_channels", "hidden_size", "depth", "num_heads",
          "mlp_ratio", "class_dropout_prob", "num_classes", "learn_sigma")
  return {k: getattr(model, k) for k in keys}


def create_optimizer(config: ml_collections.ConfigDict):
  o = config.optim
  if o.warmup_steps:
    schedule = optax.linear_schedule(0.0, o.learning_rate, o.warmup_steps)
  else:
    schedule = optax.constant_schedule(o.learning_rate)
  tx = optax.adamw(schedule, b1=o.b1, b2=o.b2, eps=o.eps, weight_decay=o.weight_decay)
  if o.grad_clip_norm:
    tx = optax.chain(optax.clip_by_global_norm(o.grad_clip_norm), tx)
  return tx, schedule


def init_state(key: jax.Array, model: models.DiT, tx: optax.GradientTransformation,
               local_shape: tuple[int, ...]) -> TrainState:
  """Fresh state with BOXED params (LogicallyPartitioned); unbox after taking shardings."""
  k_init, k_train = jax.random.split(key)
  x = jnp.zeros((1, *local_shape), jnp.float32)
  params = model.init(k_init, x, jnp.zeros((1,), jnp.int32), jnp.zeros((1,), jnp.int32))["params"]
  return TrainState(step=jnp.zeros((), jnp.int32), params=params, ema_params=params,
                    opt_state=tx.init(params), rng=k_train,
                    first_bad_step=jnp.full((), -1, jnp.int32))


def sample_latents(batch: dict, key: jax.Array, scale: float, random_flip: bool) -> jax.Array:
  """The release's training input: random flip, fresh posterior sample, times the scale.

  batch mean/std [B, 2, h, w, c] (index 1 = flipped image) -> x0 [B, h, w, c] float32.
  """
  mean = batch["mean"].astype(jnp.float32)
  std = batch["std"].astype(jnp.float32)
  k_flip, k_eps = jax.random.split(key)
  if random_flip:
    flip = jax.random.bernoulli(k_flip, 0.5, mean.shape[:1])[:, None, None, None]
    mean = jnp.where(flip, mean[:, 1], mean[:, 0])
    std = jnp.where(flip, std[:, 1], std[:, 0])
  else:
    mean, std = mean[:, 0], std[:, 0]
  return (mean + std * jax.random.normal(k_eps, mean.shape, jnp.float32)) * scale


def train_step(state: TrainState, batch: dict, *, model: models.DiT, diffusion: Any,
               tx: optax.GradientTransformation, schedule: Any, ema_decay: float,
               scale: float, random_flip: bool) -> tuple[TrainState, dict]:
  """One AdamW step on the hybrid diffusion loss, then the EMA update."""
  key = jax.random.fold_in(state.rng, state.step)
  k_x0, k_t, k_noise, k_drop = jax.random.split(key, 4)
  x0 = sample_latents(batch, k_x0, scale, random_flip)
  t = jax.random.randint(k_t, x0.shape[:1], 0, diffusion.num_timesteps)
  noise = jax.random.normal(k_noise, x0.shape, jnp.float32)

  def loss_fn(params):
    def model_fn(x, tt):
      return model.apply({"params": params}, x, tt, batch["label"], train=True,
                         rngs={"dropout": k_drop})
    terms = diffusion.training_losses(model_fn, x0, t, noise=noise)
    return terms["loss"].mean(), terms

  (loss, terms), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  ema = optax.incremental_update(params, state.ema_params, step_size=1.0 - ema_decay)
  grad_norm = optax.tree.norm(grads)
  metrics = {"loss": loss, "mse": terms["mse"].mean(), "vb": terms["vb"].mean(),
             "grad_norm": grad_norm, "learning_rate": schedule(state.step)}
  finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
  first_bad = jnp.where((state.first_bad_step < 0) & ~finite, state.step + 1,
                        state.first_bad_step)
  new = state.replace(step=state.step + 1, params=params, ema_params=ema, opt_state=opt_state,
                      first_bad_step=first_bad)
  return new, metrics


class _Preemption:
  """SIGTERM (preemption notice) -> save and exit at the next step boundary."""

  def __init__(self):
    self.requested = False
    self._old = None

  def __enter__(self):
    if jax.process_count() == 1:
      try:
        self._old = signal.signal(signal.SIGTERM, self._handle)
      except ValueError:  # not the main thread (e.g. called from a test runner thread)
        self._old = None
    return self

  def _handle(self, signum, frame):  # pylint: disable=unused-argument
    logging.warning("SIGTERM received: saving a checkpoint and exiting at the next step")
    self.requested = True

  def __exit__(self, *exc):
    if self._old is not None:
      signal.signal(signal.SIGTERM, self._old)

  def check(self, mngr, step: int) -> bool:
    if jax.process_count() > 1:
      # Every host must agree; JAX's preemption sync service (TPU VMs) gives one answer.
      return bool(mngr.reached_preemption(step))
    return self.requested


@dataclasses.dataclass
class Built:
  """Everything derived from (config, data) that training, benchmarks and tools share."""
  model: models.DiT
  diffusion: Any
  mesh: jax.sharding.Mesh
  state_sh: Any           # NamedShardings of the (unboxed) TrainState
  batch_sh: Any
  repl: Any
  abstract: TrainState    # ShapeDtypeStructs of the state
  init: Any               # key -> sharded fresh TrainState
  compiled: Any           # (state, global batch) -> (state, metrics), donates state
  flops: float            # per device per step, from XLA's cost analysis
  memory_gib: float       # per device: arguments + outputs + temporaries - aliased
  compile_seconds: float


def build(config: ml_collections.ConfigDict, info: input_pipeline.DataInfo,
          devices: Any = None) -> Built:
  """Model, diffusion, optimizer, mesh, shardings, and the train step compiled ahead of time.

  `devices` default to jax.devices(); AOT topology devices (jax.experimental.topologies)
  compile for hardware that is not attached. With config.mesh.fsdp = 0 (auto) the layout is
  data parallel if the compiled step fits a device's memory, else the smallest power-of-two
  FSDP within a slice that does.
  """
  gbs = config.data.global_batch_size
  model = create_model(config, info)
  diffusion = create_diffusion("", noise_schedule=config.diffusion.noise_schedule,
                               learn_sigma=model.learn_sigma,
                               diffusion_steps=config.diffusion.steps)
  tx, schedule = create_optimizer(config)
  devices = list(jax.devices() if devices is None else devices)
  if gbs % len(devices):
    raise ValueError(f"config.data.global_batch_size={gbs} must divide by the {len(devices)} "
                     "devices (one image per device at least: raise the batch on large pods)")
  init_fn = functools.partial(init_state, model=model, tx=tx, local_shape=info.latent_shape)
  boxed = jax.eval_shape(init_fn, jax.random.PRNGKey(0))
  auto = config.mesh.fsdp == 0
  sizes = sharding.fsdp_candidates(devices, config.mesh.data) if auto else [config.mesh.fsdp]
  if not sizes:
    raise ValueError(f"config.mesh.data={config.mesh.data} does not divide the "
                     f"{len(devices) // sharding.num_slices(devices)} devices of a slice")
  limit = hardware.memory_bytes(devices[0])
  state_bytes = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(nn.meta.unbox(boxed)))
  for i, fsdp in enumerate(sizes):
    last = i == len(sizes) - 1
    if auto and limit and not last and state_bytes / fsdp > MEMORY_HEADROOM * limit:
      continue  # the sharded state alone would not fit: no need to compile
    b = _compile(config, info, model, diffusion, tx, schedule, init_fn, boxed,
                 sharding.create_mesh(config.mesh.data, fsdp, devices))
    need = b.memory_gib * 2**30
    if not (auto and limit) or need <= MEMORY_HEADROOM * limit:
      break
    if last:
      logging.warning("The train step needs %.1f GiB per device even at fsdp=%d, more than "
                      "%.0f%% of the %.1f GiB a device has: use model.remat=True or a smaller "
                      "batch", b.memory_gib, fsdp, 100 * MEMORY_HEADROOM, limit / 2**30)
    else:
      logging.info("fsdp=%d needs %.1f GiB per device (> %.0f%% of %.1f GiB): trying more "
                   "sharding", fsdp, b.memory_gib, 100 * MEMORY_HEADROOM, limit / 2**30)
  return b


def _compile(config: ml_collections.ConfigDict, info: input_pipeline.DataInfo,
             model: models.DiT, diffusion: Any, tx: Any, schedule: Any, init_fn: Any,
             boxed: Any, mesh: jax.sharding.Mesh) -> Built:
  gbs = config.data.global_batch_size
  sharding.log_mesh(mesh)
  state_sh = sharding.state_shardings(boxed, mesh)
  abstract = nn.meta.unbox(boxed)
  sharded_bytes, repl_bytes = sharding.replicated_bytes(state_sh.params, abstract.params)
  logging.info("Parameters: %s (%s)",
               f"{sum(x.size for x in jax.tree.leaves(abstract.params)):,}",
               sharding.describe(state_sh.params, abstract.params))
  if mesh.shape["fsdp"] > 1 and repl_bytes > 0.01 * (sharded_bytes + repl_bytes):
    logging.warning("%.1f MiB of parameters stay replicated at fsdp=%d (no dimension divides): "
                    "each device holds them, their EMA and Adam moments whole",
                    repl_bytes / 2**20, mesh.shape["fsdp"])
  batch_sh, repl = sharding.batch_sharding(mesh), sharding.replicated(mesh)

  step_fn = jax.jit(
      functools.partial(train_step, model=model, diffusion=diffusion, tx=tx,
                        schedule=schedule, ema_decay=config.ema_decay,
                        scale=float(config.vae.scale_factor or info.scale_factor),
                        random_flip=config.data.random_flip),
      in_shardings=(state_sh, batch_sh), out_shardings=(state_sh, repl), donate_argnums=0)
  h, w, c = info.latent_shape
  store = jnp.dtype(info.manifest["dtype"])
  abstract_batch = {
      "label": jax.ShapeDtypeStruct((gbs,), jnp.int32, sharding=batch_sh),
      "mean": jax.ShapeDtypeStruct((gbs, 2, h, w, c), store, sharding=batch_sh),
      "std": jax.ShapeDtypeStruct((gbs, 2, h, w, c), store, sharding=batch_sh)}
  t0 = time.time()
  compiled = step_fn.lower(abstract, abstract_batch).compile()
  compile_s = time.time() - t0
  cost = compiled.cost_analysis() or {}
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  flops = float(cost.get("flops", 0.0))
  mem = compiled.memory_analysis()
  mem_gib = ((mem.argument_size_in_bytes + mem.output_size_in_bytes + mem.temp_size_in_bytes -
              mem.alias_size_in_bytes) / 2**30) if mem is not None else float("nan")
  logging.info("Compiled the train step in %.1fs: %.3g FLOPs/step/device, %.2f GiB/device",
               compile_s, flops, mem_gib)
  init = jax.jit(lambda k: nn.meta.unbox(init_fn(k)), out_shardings=state_sh)
  return Built(model=model, diffusion=diffusion, mesh=mesh, state_sh=state_sh,
               batch_sh=batch_sh, repl=repl, abstract=abstract, init=init, compiled=compiled,
               flops=flops, memory_gib=mem_gib, compile_seconds=compile_s)


def vae_path(config: ml_collections.ConfigDict, info: input_pipeline.DataInfo,
             required: bool = True) -> str | None:
  """config.vae.path, else the VAE folder prepare_latents recorded, else identity (pixel data)."""
  if config.vae.path:
    return config.vae.path
  if info.manifest.get("vae", "identity") == "identity":
    return "identity"
  path = info.manifest.get("vae_path")
  if required and not path:
    raise ValueError(f"config.vae.path is unset and {config.data.dir}/manifest.json names no VAE "
                     "folder: pass --config.vae.path=SD_VAE_DIR to decode samples")
  return path


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str,
                       devices: Any = None) -> dict[int, dict]:
  """Trains (resuming from `workdir` if it holds checkpoints); returns the logged metrics by step.

  `devices` restricts the mesh to a subset of jax.devices() (default: all).
  """
  pid, nproc = jax.process_index(), jax.process_count()
  runtime.enable_compilation_cache(
      config.compilation_cache_dir or os.path.join(workdir, "compilation_cache"),
      override=bool(config.compilation_cache_dir))
  writer = metric_writers.create_default_writer(workdir, just_logging=pid > 0)

  # 1. Data.
  data_dir = config.data.dir or demo_data.ensure(config.data.get("builtin", ""), workdir)
  config.data.dir = data_dir
  info = input_pipeline.get_info(data_dir, pid, nproc, config.data.verify_checksums)
  gbs = config.data.global_batch_size
  if gbs % nproc:
    raise ValueError(f"config.data.global_batch_size={gbs} must divide by {nproc} processes")
  local_bs = gbs // nproc
  scale = float(config.vae.scale_factor or info.scale_factor)

  # 2. Model, diffusion, optimizer, mesh, shardings and the compiled step.
  b = build(config, info, devices)
  model, mesh, state_sh, abstract = b.model, b.mesh, b.state_sh, b.abstract
  batch_sh, repl, compiled, flops = b.batch_sh, b.repl, b.compiled, b.flops
  key = jax.random.PRNGKey(config.seed)

  # 3. Restore or initialise; the state is created sharded (never whole on one device).
  mngr = checkpointing.create_manager(workdir, config.checkpoint.keep,
                                      config.checkpoint.async_save,
                                      config.checkpoint.get("keep_period"))
  train_part = lambda s: {"step": s.step, "params": s.params, "opt_state": s.opt_state,
                          "rng": s.rng}
  restored = checkpointing.restore_latest(
      mngr, train_part(abstract), train_part(state_sh), abstract.ema_params,
      state_sh.ema_params, model_kwargs=model_kwargs(model),
      attempts=config.checkpoint.restore_attempts, backoff_s=config.checkpoint.restore_backoff_s)
  if restored is None:
    state = b.init(key)
    # Compile the checkpoint integrity check now (a restore compiles it while verifying):
    # a preemption save must not wait for a compilation.
    checkpointing.summarize(train_part(state), state.ema_params)
    logging.info("Initialised a new model in %s", workdir)
  else:
    tr, ema, meta = restored
    state = TrainState(step=tr["step"], params=tr["params"], ema_params=ema,
                       opt_state=tr["opt_state"], rng=tr["rng"],
                       first_bad_step=jax.device_put(jnp.int32(-1), state_sh.first_bad_step))
    was = meta.get("data", {})
    if (was.get("local_batch_size"), was.get("process_count")) != (local_bs, nproc):
      logging.warning("Resuming with %d processes x batch %d, the checkpoint was written with %s x "
                      "%s: the data order from here on differs from the interrupted run's", nproc,
                      local_bs, was.get("process_count"), was.get("local_batch_size"))
    logging.info("Resumed from step %d in %s", int(state.step), workdir)
  start_step = int(jax.device_get(state.step))
  peak = hardware.peak_flops(mesh.devices.flat[0])
  # With remat the compiled step recomputes the forward pass: its FLOPs give hardware FLOPs
  # utilisation (HFU), not model FLOPs utilisation.
  utilisation = "hfu" if config.model.remat else "mfu"

  # 4. Sample grids and evaluation, compiled now (dit_jax/periodic.py); they decode with the
  #    dataset's VAE (identity for pixel data).
  grid = evaluate = None
  if config.sample.num_images or config.eval.every_steps:
    decoder = sampling.Decoder(vae_path(config, info), scale, repl,
                               matmul_precision=config.sample.matmul_precision)
    if config.sample.num_images:
      grid = periodic.SampleGrid(config, b, decoder, writer, workdir)
    if config.eval.every_steps:
      evaluate = periodic.Evaluator(config, b, decoder, workdir)

  # 5. The loop.
  ds = input_pipeline.create_dataset(
      info, local_batch_size=local_bs, seed=config.seed, process_index=pid,
      start_step=start_step, shuffle_buffer=config.data.shuffle_buffer,
      cycle_length=config.data.cycle_length)
  batches = input_pipeline.iterate(ds, info.files)
  if start_step == 0:
    writer.write_hparams({k: v for k, v in config.to_dict().items() if not isinstance(v, dict)})
  # Progress and ETA in the log (our own scalars below carry the throughput).
  report = periodic_actions.ReportProgress(num_train_steps=config.total_steps,
                                           every_steps=config.log_every_steps)

  def check_finite(step):
    bad = int(jax.device_get(state.first_bad_step))
    if bad >= 0:
      mngr.wait_until_finished()
      raise FloatingPointError(
          f"The loss or gradient norm became NaN/inf at step {bad} (stopped at step {step}, "
          f"nothing saved after it): the checkpoints in {mngr.directory} are kept (newest: "
          f"step {mngr.latest_step()}). Lower config.optim.learning_rate or set "
          "config.optim.grad_clip_norm, then run again to resume from there.")

  def save(step):
    check_finite(step)  # a checkpoint never holds a diverged state
    epoch, offset = input_pipeline.stream_position(step, local_bs, info.local_count)
    meta = {"step": step, "model": config.model.name, "model_kwargs": model_kwargs(model),
            "data": {"dir": data_dir, "epoch": epoch, "offset": offset,
                     "local_batch_size": local_bs, "process_count": nproc},
            "diffusion": {"steps": config.diffusion.steps,
                          "noise_schedule": config.diffusion.noise_schedule},
            "scale_factor": scale, "vae_path": vae_path(config, info, required=False)}
    checkpointing.save(mngr, step, train_part(state), state.ema_params, meta)

  history: dict[int, dict] = {}  # the logged scalars by step (returned; for tests and tools)
  pending: list[dict] = []
  t_log, step = time.time(), start_step

  def log(step):
    nonlocal pending, t_log
    fetched = jax.device_get(pending)  # waits for the steps: time them after
    sps = len(pending) / max(time.time() - t_log, 1e-9)
    scalars = {k: float(np.mean([m[k] for m in fetched])) for k in fetched[0]}
    scalars.update(steps_per_sec=sps, images_per_sec_per_device=sps * gbs / mesh.size)
    if peak and flops:
      scalars[utilisation] = flops * sps / peak
    writer.write_scalars(step, scalars)
    history.setdefault(step, {}).update(scalars)
    pending, t_log = [], time.time()
    check_finite(step)

  try:
    with _Preemption() as preempt:
      while step < config.total_steps:
        local = next(batches)
        batch = {k: jax.make_array_from_process_local_data(batch_sh, v) for k, v in local.items()}
        state, metrics = compiled(state, batch)
        step += 1
        pending.append(metrics)
        report(step)
        if step % config.log_every_steps == 0 or step == config.total_steps:
          log(step)
        preempted = preempt.check(mngr, step)
        # Save before sampling or evaluating, so that nothing there can lose training steps.
        if step % config.checkpoint.every_steps == 0 or step == config.total_steps or preempted:
          save(step)
        if preempted:
          logging.warning("Preempted: checkpoint of step %d written, exiting", step)
          break
        if grid and (step % (config.sample.every_steps or -1) == 0 or step == config.total_steps):
          grid(state.ema_params, step)
        if evaluate and (step % config.eval.every_steps == 0 or step == config.total_steps):
          t_eval = time.time()
          results = {f"eval/{k}": float(v) for k, v in evaluate(state.ema_params, step).items()}
          writer.write_scalars(step, results)
          history.setdefault(step, {}).update(results)
          logging.info("Evaluation at step %d took %.0fs: %s", step, time.time() - t_eval, results)
          t_log += time.time() - t_eval
  except BaseException:
    mngr.wait_until_finished()  # complete a checkpoint that was being written
    raise
  if pending:
    log(step)
  mngr.wait_until_finished()
  mngr.close()
  writer.flush()
  multihost_utils.sync_global_devices("train_and_evaluate done")
  return history

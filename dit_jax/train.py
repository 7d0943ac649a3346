"""DiT training: state, the sharded train step, and the resumable training loop.

Stages of `train_and_evaluate` (read top to bottom):
  1. data: manifest and this process's shards (built-in digits written on first use);
  2. `build`: model, diffusion, optimizer, mesh and shardings (dit_jax/sharding.py), and the
     train step: one jax.jit with in/out shardings and donated state, compiled ahead of time
     with its FLOPs and memory logged (benchmarks/train_speed.py uses the same `build`);
  3. restore the newest readable checkpoint, or initialise the state directly sharded;
  4. sample-grid and evaluation functions (EMA weights, decoded with the dataset's VAE);
  5. the loop: metrics, grids, evaluation, checkpoints, SIGTERM handling; the data stream
     restarts where the restored step left it.
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

from dit_jax import checkpointing, demo_data, input_pipeline, models, sampling, sharding
from dit_jax.diffusion import create_diffusion

# bf16 dense peak FLOP/s per JAX device, for MFU. Unknown kinds (CPU) report no MFU.
PEAK_FLOPS = {
    "TPU v3": 61.5e12, "TPU v4": 275e12, "TPU v5 lite": 197e12, "TPU v5e": 197e12,
    "TPU v5p": 459e12, "TPU v6 lite": 918e12, "TPU v6e": 918e12,
    "NVIDIA A100": 312e12, "NVIDIA H100": 989e12, "NVIDIA H200": 989e12,
}


@flax.struct.dataclass
class TrainState:
  step: jax.Array
  params: Any
  ema_params: Any
  opt_state: Any
  rng: jax.Array  # base key; step s uses fold_in(rng, s)


def peak_flops(device: Any) -> float | None:
  kind = getattr(device, "device_kind", "")
  for name, flops in PEAK_FLOPS.items():
    if kind.startswith(name):
      return flops
  return None


def create_model(config: ml_collections.ConfigDict, info: input_pipeline.DataInfo) -> models.DiT:
  """The configured DiT for this dataset's latent shape and classes (errors name the field)."""
  h, w, c = info.latent_shape
  if h != w:
    raise ValueError(f"data: latents must be square, the manifest says {info.latent_shape}")
  made_from = info.manifest.get("image_size")
  if made_from and config.data.image_size and int(made_from) != int(config.data.image_size):
    raise ValueError(f"config.data.image_size={config.data.image_size} but the latents in "
                     f"{config.data.dir} were made from {made_from}px images")
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
                    opt_state=tx.init(params), rng=k_train)


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
  metrics = {"loss": loss, "mse": terms["mse"].mean(), "vb": terms["vb"].mean(),
             "grad_norm": optax.global_norm(grads), "learning_rate": schedule(state.step)}
  new = state.replace(step=state.step + 1, params=params, ema_params=ema, opt_state=opt_state)
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


def _write_grid(writer, workdir: str, step: int, images: np.ndarray, columns: int) -> None:
  grid = sampling.make_grid(images, columns=columns, upscale=max(1, 128 // images.shape[1]))
  if jax.process_index() == 0:
    sampling.save_png(os.path.join(workdir, "samples", f"step_{step:08d}.png"), grid)
  writer.write_images(step, {"samples": grid[None]})


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
  """Model, diffusion, optimizer, mesh, shardings, and the train step compiled ahead of time."""
  gbs = config.data.global_batch_size
  model = create_model(config, info)
  diffusion = create_diffusion("", noise_schedule=config.diffusion.noise_schedule,
                               learn_sigma=model.learn_sigma,
                               diffusion_steps=config.diffusion.steps)
  tx, schedule = create_optimizer(config)

  mesh = sharding.create_mesh(config.mesh.data, config.mesh.fsdp, devices)
  sharding.log_mesh(mesh)
  if gbs % mesh.size:
    raise ValueError(f"config.data.global_batch_size={gbs} must divide by the {mesh.size} devices")
  init_fn = functools.partial(init_state, model=model, tx=tx, local_shape=info.latent_shape)
  boxed = jax.eval_shape(init_fn, jax.random.PRNGKey(0))
  state_sh = sharding.state_shardings(boxed, mesh)
  abstract = nn.meta.unbox(boxed)
  logging.info("Parameters: %s (%s)",
               f"{sum(x.size for x in jax.tree.leaves(abstract.params)):,}",
               sharding.describe(state_sh.params, abstract.params))
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


def has_null_class(model: models.DiT) -> bool:
  """Whether the label table has the null class that classifier-free guidance needs."""
  return model.num_classes > 1 and model.class_dropout_prob > 0


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


def make_evaluator(config: ml_collections.ConfigDict, b: Built, workdir: str, decoder: Any):
  """FID/sFID/IS/precision/recall of `config.eval.num_samples` EMA samples (e.g. FID-5K).

  Returns eval_fn(ema_params, step) -> dict of floats, identical on every process.
  """
  from dit_jax import evaluation  # pylint: disable=import-outside-toplevel
  e = config.eval
  if not (e.inception and e.reference):
    raise ValueError("config.eval.every_steps is set: config.eval.inception (the "
                     "pt_inception-2015-12-05 .pth or converted .npz) and config.eval.reference "
                     "(an ADM reference batch .npz, image folder or tfds:NAME) are needed")
  inception = evaluation.load_inception(e.inception)
  reference = evaluation.compute_reference(
      e.reference, inception, cache_path=os.path.join(workdir, "eval_reference_stats.npz"),
      batch_size_per_device=e.inception_batch_per_device)
  model = b.model
  if e.batch_size % b.mesh.size:
    raise ValueError(f"config.eval.batch_size={e.batch_size} must divide by {b.mesh.size} devices")
  if e.cfg_scale != 1.0 and not has_null_class(model):
    raise ValueError(f"config.eval.cfg_scale={e.cfg_scale} needs class dropout (a null class)")
  if decoder.path == "identity" and model.in_channels not in (1, 3):
    raise ValueError(f"config.eval needs images, but latents with {model.in_channels} channels are "
                     "decoded with the identity: set config.vae.path to the SD VAE folder")
  sample_fn = sampling.make_sample_fn(
      model, sampler=e.sampler, steps=e.steps, spacing=e.spacing,
      guidance_interval=e.guidance_interval, respacing=e.respacing, guided=e.cfg_scale != 1.0,
      release_cfg=config.sample.release_cfg, diffusion_steps=config.diffusion.steps,
      noise_schedule=config.diffusion.noise_schedule,
      in_shardings=(b.state_sh.ema_params, b.repl, b.batch_sh, b.repl), out_shardings=b.batch_sh)

  def eval_fn(ema_params, step):
    key = jax.random.fold_in(jax.random.PRNGKey(config.seed + 2), step)
    labels = np.asarray(jax.random.randint(jax.random.PRNGKey(config.seed + 3),
                                           (e.num_samples,), 0, model.num_classes), np.int32)
    labels = np.resize(labels, -(-e.num_samples // e.batch_size) * e.batch_size)
    images = []
    for i in range(len(labels) // e.batch_size):
      chunk = labels[i * e.batch_size:(i + 1) * e.batch_size]
      y = jax.make_array_from_callback(chunk.shape, b.batch_sh, lambda idx, c=chunk: c[idx])
      lat = sample_fn(ema_params, jax.random.fold_in(key, i), y, jnp.float32(e.cfg_scale))
      images.append(np.asarray(multihost_utils.process_allgather(decoder(lat), tiled=True)))
    images = np.concatenate(images)[:e.num_samples]
    return evaluation.evaluate_samples(images, inception, reference, fid_method="eigh",
                                       batch_size_per_device=e.inception_batch_per_device)

  return eval_fn


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str,
                       devices: Any = None) -> dict[int, dict]:
  """Trains (resuming from `workdir` if it holds checkpoints); returns the logged metrics by step.

  `devices` restricts the mesh to a subset of jax.devices() (default: all).
  """
  pid, nproc = jax.process_index(), jax.process_count()
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
                                      config.checkpoint.async_save)
  train_part = lambda s: {"step": s.step, "params": s.params, "opt_state": s.opt_state,
                          "rng": s.rng}
  restored = checkpointing.restore_latest(
      mngr, train_part(abstract), train_part(state_sh), abstract.ema_params,
      state_sh.ema_params, model_kwargs=model_kwargs(model))
  if restored is None:
    state = b.init(key)
    logging.info("Initialised a new model in %s", workdir)
  else:
    tr, ema, meta = restored
    state = TrainState(step=tr["step"], params=tr["params"], ema_params=ema,
                       opt_state=tr["opt_state"], rng=tr["rng"])
    was = meta.get("data", {})
    if (was.get("local_batch_size"), was.get("process_count")) != (local_bs, nproc):
      logging.warning("Resuming with %d processes x batch %d, the checkpoint was written with %s x "
                      "%s: the data order from here on differs from the interrupted run's", nproc,
                      local_bs, was.get("process_count"), was.get("local_batch_size"))
    logging.info("Resumed from step %d in %s", int(state.step), workdir)
  start_step = int(jax.device_get(state.step))
  peak = peak_flops(jax.devices()[0])

  # 4. Sample grids and evaluation decode with the dataset's VAE (identity for pixel data).
  sample_fn = decoder = eval_fn = None
  if config.sample.num_images or config.eval.every_steps:
    decoder = sampling.Decoder(vae_path(config, info), scale, repl)
  if config.sample.num_images:
    sample_fn = sampling.make_sample_fn(
        model, sampler=config.sample.sampler, steps=config.sample.steps,
        spacing=config.sample.spacing, guidance_interval=config.sample.guidance_interval,
        respacing=config.sample.respacing, guided=has_null_class(model),
        release_cfg=config.sample.release_cfg, diffusion_steps=config.diffusion.steps,
        noise_schedule=config.diffusion.noise_schedule,
        in_shardings=(state_sh.ema_params, repl, repl, repl), out_shardings=repl)
  if config.eval.every_steps:
    eval_fn = make_evaluator(config, b, workdir, decoder)

  def write_samples(step):
    n = config.sample.num_images
    labels = jnp.arange(n, dtype=jnp.int32) % model.num_classes
    lat = sample_fn(state.ema_params, jax.random.PRNGKey(config.seed + 1), labels,
                    jnp.float32(config.sample.cfg_scale))
    # Labels cycle through the classes: with one column per class, a column is a class.
    _write_grid(writer, workdir, step, np.asarray(jax.device_get(decoder(lat))),
                columns=min(n, model.num_classes, 16))

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

  def save(step):
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
      scalars["mfu"] = flops * sps / peak
    writer.write_scalars(step, scalars)
    history.setdefault(step, {}).update(scalars)
    pending, t_log = [], time.time()
    if not np.isfinite(scalars["loss"]):
      raise FloatingPointError(f"loss became {scalars['loss']} at step {step}")

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
      if sample_fn and (step % (config.sample.every_steps or -1) == 0 or
                        step == config.total_steps):
        write_samples(step)
      if eval_fn and (step % config.eval.every_steps == 0 or step == config.total_steps):
        t_eval = time.time()
        results = {f"eval/{k}": float(v) for k, v in eval_fn(state.ema_params, step).items()}
        writer.write_scalars(step, results)
        history.setdefault(step, {}).update(results)
        logging.info("Evaluation at step %d took %.0fs: %s", step, time.time() - t_eval, results)
        t_log += time.time() - t_eval
      preempted = preempt.check(mngr, step)
      if step % config.checkpoint.every_steps == 0 or step == config.total_steps or preempted:
        save(step)
      if preempted:
        logging.warning("Preempted: checkpoint of step %d written, exiting", step)
        break
  if pending:
    log(step)
  mngr.wait_until_finished()
  mngr.close()
  writer.flush()
  multihost_utils.sync_global_devices("train_and_evaluate done")
  return history

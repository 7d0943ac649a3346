"""DiT training: the resumable training loop around the sharded train step (dit_jax/step.py).

Stages of `train_and_evaluate` (read top to bottom):
  1. data: manifest and this process's shards (built-in digits written on first use);
  2. `step.build`: model, objective, optimizer, mesh and shardings (dit_jax/sharding.py), and
     the train step: one jax.jit with in/out shardings and donated state, compiled ahead of
     time with its FLOPs and memory logged (benchmarks and dit_jax.aot use the same `build`);
  3. `restore_or_init`: the newest readable checkpoint, or a fresh state created sharded;
  4. sample grids and evaluation (dit_jax/periodic.py), compiled before training starts;
  5. `train_loop`: steps, `MetricLogger`, checkpoints (`save`, before grids and evaluation),
     profiler traces (dit_jax/profiling.py), SIGTERM handling; the data stream restarts where
     the restored step left it.
"""

from __future__ import annotations

import collections
import logging
import os
import signal
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from clu import metric_writers, periodic_actions
from jax.experimental import multihost_utils

from dit_jax import (checkpointing, config_checks, convert, demo_data, hardware, input_pipeline,
                     latent_norm, models, objectives, periodic, profiling, repa, runtime,
                     sampling, stopping, workdir_lock)
from dit_jax.data_info import DataInfo
from dit_jax.step import TrainSetup, TrainState, abstract_state, build


class _Preemption:
  """The stop requests of the training loop: SIGTERM or SIGINT (dit_jax/stopping.py), saved
  and exited at the next step boundary; on several hosts JAX's preemption sync, which gives
  every host the same step. Called from Python rather than dit_jax.main (stopping not
  installed), only SIGTERM is taken, for the loop alone."""

  def __init__(self):
    self._old = None

  def __enter__(self):
    stopping.phase(stopping.LOOP)
    if jax.process_count() == 1 and not stopping.installed():
      try:
        self._old = signal.signal(signal.SIGTERM, stopping.record)
      except ValueError:  # not the main thread (e.g. called from a test runner thread)
        self._old = None
    return self

  def __exit__(self, *exc):
    stopping.phase(stopping.FINISHING)
    if self._old is not None:
      signal.signal(signal.SIGTERM, self._old)

  def check(self, mngr, step: int) -> bool:
    if jax.process_count() > 1:
      # Every host must agree; JAX's preemption sync service (TPU VMs) gives one answer.
      return bool(mngr.reached_preemption(step))
    return stopping.requested()


class InFlight:
  """Bounds how far the host dispatches ahead of the device: after dispatching a step, waits
  until at most `depth` steps are unfinished (depth 2: the device always has the next step
  queued while the host prepares the one after). 0: unbounded (JAX's default, where the host
  ran 25-34 steps ahead on the CPU demo). Tells dit_jax.stopping which step is done."""

  def __init__(self, depth: int):
    self.depth = depth
    self.queue: collections.deque = collections.deque()

  def add(self, step: int, output: Any) -> None:
    if not self.depth:
      return
    self.queue.append((step, output))
    while len(self.queue) >= self.depth:
      done, out = self.queue.popleft()
      jax.block_until_ready(out)
      stopping.step_done(done)


def vae_path(configured: str, info: DataInfo, data_dir: str,
             required: bool = True) -> str | None:
  """config.vae.path (`configured`), else the VAE folder prepare_latents recorded in
  data_dir's manifest, else identity (pixel data)."""
  if configured:
    return configured
  if info.manifest.get("vae", "identity") == "identity":
    return "identity"
  path = info.manifest.get("vae_path")
  if required and not path:
    raise ValueError(f"config.vae.path is unset and {data_dir}/manifest.json names no VAE "
                     "folder: pass --config.vae.path=SD_VAE_DIR to decode samples")
  return path


@workdir_lock.hold  # one job per workdir
def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str,
                       devices: Any = None) -> dict[int, dict]:
  """Trains (resuming from `workdir` if it holds checkpoints); returns the logged metrics by step.

  `devices` restricts the mesh to a subset of jax.devices() (default: all).
  """
  config_checks.check(config)
  stopping.reset(workdir)
  pid, nproc = jax.process_index(), jax.process_count()
  runtime.enable_compilation_cache(
      config.compilation_cache_dir or os.path.join(workdir, "compilation_cache"),
      override=bool(config.compilation_cache_dir))
  writer = metric_writers.create_default_writer(workdir, just_logging=pid > 0)

  # 1. Data.
  stopping.starting("reading the data")
  config.data.dir = config.data.dir or demo_data.ensure(
      config.data.get("builtin", ""), workdir, bool(config.data.get("with_images", False)))
  info = input_pipeline.get_info(config.data.dir, pid, nproc, config.data.verify_checksums)
  gbs = config.data.global_batch_size
  if gbs % nproc:
    raise ValueError(f"config.data.global_batch_size={gbs} must divide by {nproc} processes")
  local_bs = gbs // nproc

  # 2. Model, objective (config.objective.name), optimizer, mesh, shardings, compiled step.
  stopping.starting("compiling the train step")
  setup = build(config, info, devices)
  if setup.align is not None:  # REPA's frozen encoder, laid out like the parameters
    repa.ensure_teacher(config, workdir)
    setup.load_frozen(repa.load_encoder(config, setup.align))
    logging.info("REPA: %s from %s aligned with block %d (coefficient %g)", config.repa.encoder,
                 config.repa.encoder_path, setup.align.capture + 1, setup.align.coefficient)

  # 3. Restore or initialise; the state is created sharded (never whole on one device).
  stopping.starting("restoring the newest checkpoint")
  mngr = checkpointing.create_manager(workdir, config.checkpoint.keep,
                                      config.checkpoint.async_save,
                                      config.checkpoint.get("keep_period"))
  state = restore_or_init(config, info, setup, mngr, local_bs)
  start_step = int(jax.device_get(state.step))

  # 4. Sample grids and evaluation, compiled now (dit_jax/periodic.py); they decode with the
  #    dataset's VAE (identity for pixel data).
  grid = evaluate = None
  stopping.starting("compiling the sample grids and evaluation")
  if config.sample.num_images or config.eval.every_steps:
    decoder = sampling.Decoder(vae_path(config.vae.path, info, config.data.dir),
                               latent_norm.of_data(info, config.vae.scale_factor), setup.repl,
                               matmul_precision=config.sample.matmul_precision)
    if config.sample.num_images:
      grid = periodic.SampleGrid(config, setup, decoder, writer, workdir)
    if config.eval.every_steps:
      evaluate = periodic.Evaluator(config, setup, decoder, workdir)

  # 5. The loop.
  stopping.starting("starting the input pipeline")
  ds = input_pipeline.create_dataset(
      info, local_batch_size=local_bs, seed=config.seed, process_index=pid,
      start_step=start_step, shuffle_buffer=config.data.shuffle_buffer,
      cycle_length=config.data.cycle_length)
  if start_step == 0:
    writer.write_hparams({k: v for k, v in config.to_dict().items() if not isinstance(v, dict)})
  metrics = MetricLogger(gbs, setup, writer, mngr)
  batches = input_pipeline.iterate(ds, info.files)
  try:
    state = train_loop(config, info, setup, state, mngr, batches, metrics, grid, evaluate, local_bs,
                       workdir)
  except BaseException:
    checkpointing.finish_quietly(mngr)  # complete a checkpoint that was being written
    raise
  input_pipeline.close_in_background(batches)  # must not delay the exit (see there)
  metrics.write(int(jax.device_get(state.step)), state)
  checkpointing.finish(mngr)
  mngr.close()
  writer.flush()
  multihost_utils.sync_global_devices("train_and_evaluate done")
  return metrics.history


def _train_part(s: Any) -> dict:
  """The checkpoint's 'train' item of a TrainState (or of its shardings / shapes)."""
  return {"step": s.step, "params": s.params, "opt_state": s.opt_state, "rng": s.rng}


def restore_or_init(config: ml_collections.ConfigDict, info: DataInfo, setup: TrainSetup,
                    mngr: Any, local_bs: int) -> TrainState:
  """The newest readable checkpoint's state on setup's mesh, else a fresh one, created sharded."""
  model, state_sh, abstract = setup.model, setup.state_sh, setup.abstract
  # A checkpoint of the other block layout (model.scan_layers) is read in its own layout and
  # converted on device.
  saved_scan = bool(checkpointing.latest_model_kwargs(mngr).get("scan_layers", False))
  relayout = saved_scan != model.scan_layers
  r_abstract, r_sh = abstract, state_sh
  if relayout:
    r_abstract, r_sh = abstract_state(config, info, model.clone(scan_layers=saved_scan), setup.mesh)
  restored = checkpointing.restore_latest(
      mngr, _train_part(r_abstract), _train_part(r_sh), r_abstract.ema_params,
      r_sh.ema_params, model_kwargs=models.architecture(model), objective=setup.objective.to_meta(),
      attempts=config.checkpoint.restore_attempts, backoff_s=config.checkpoint.restore_backoff_s)
  if restored is None:
    state = setup.init(jax.random.PRNGKey(config.seed))
    # Compile the checkpoint integrity check now (a restore compiles it while verifying):
    # a preemption save must not wait for a compilation.
    checkpointing.summarize(_train_part(state), state.ema_params)
    logging.info("Initialised a new model in %s", mngr.directory)
    return state
  tr, ema, meta = restored
  if relayout:
    # Both layouts are held for a moment (no donation: the shapes change).
    tr, ema = jax.jit(convert.stack_blocks if model.scan_layers else convert.unstack_blocks,
                      out_shardings=(_train_part(state_sh), state_sh.ema_params))((tr, ema))
    logging.info("Converted the checkpoint's blocks to the %s layout",
                 "scanned" if model.scan_layers else "per-block")
  state = TrainState(step=tr["step"], params=tr["params"], ema_params=ema,
                     opt_state=tr["opt_state"], rng=tr["rng"],
                     first_bad_step=jax.device_put(jnp.int32(-1), state_sh.first_bad_step))
  if "latent_norm" in meta:  # checkpoints from before it record the scale factor only
    latent_norm.check_same(
        latent_norm.of_data(info, config.vae.scale_factor),
        f"{config.data.dir}/manifest.json" + (" with config.vae.scale_factor"
                                              if config.vae.scale_factor else ""),
        latent_norm.from_record(meta, mngr.directory), f"the checkpoint in {mngr.directory}")
  nproc = jax.process_count()
  was = meta.get("data", {})
  if (was.get("local_batch_size"), was.get("process_count")) != (local_bs, nproc):
    logging.warning("Resuming with %d processes x batch %d, the checkpoint was written with %s x "
                    "%s: the data order from here on differs from the interrupted run's", nproc,
                    local_bs, was.get("process_count"), was.get("local_batch_size"))
  logging.info("Resumed from step %d in %s", int(state.step), mngr.directory)
  return state


def check_finite(state: TrainState, mngr: Any, step: int) -> None:
  """FloatingPointError naming the first step whose loss or gradient norm was NaN/inf."""
  bad = int(jax.device_get(state.first_bad_step))
  if bad >= 0:
    checkpointing.finish(mngr)
    newest = mngr.latest_step()
    kept = (f"the checkpoints in {mngr.directory} are kept (newest: step {newest})"
            if newest is not None else f"no checkpoint was written to {mngr.directory}")
    raise FloatingPointError(
        f"The loss or gradient norm became NaN/inf at step {bad} (stopped at step {step}, "
        f"nothing saved after it): {kept}. Lower config.optim.learning_rate or set "
        "config.optim.grad_clip_norm, then run again"
        + (" to resume from there." if newest is not None else "."))


def save(config: ml_collections.ConfigDict, info: DataInfo, model: models.DiT,
         state: TrainState, mngr: Any, step: int, local_bs: int,
         objective: objectives.Objective | None = None) -> None:
  """Checkpoint of `step` with its meta (model, data position, objective, VAE); `objective`
  defaults to config's."""
  check_finite(state, mngr, step)  # a checkpoint never holds a diverged state
  epoch, offset = input_pipeline.stream_position(step, local_bs, info.local_count)
  norm = latent_norm.of_data(info, config.vae.scale_factor)
  meta = {"step": step, "model": config.model.name, "model_kwargs": models.architecture(model),
          "data": {"dir": config.data.dir, "epoch": epoch, "offset": offset,
                   "local_batch_size": local_bs, "process_count": jax.process_count()},
          "objective": (objective or objectives.from_config(config)).to_meta(),
          # For readers from before objectives (ADM's process; unused with flow).
          "diffusion": {"steps": config.diffusion.steps,
                        "noise_schedule": config.diffusion.noise_schedule},
          # The normalisation training applied, undone at sampling (dit_jax.latent_norm);
          # scale_factor alone for readers from before per-channel statistics.
          "latent_norm": norm.to_meta(), "scale_factor": norm.scale_factor,
          "vae_path": vae_path(config.vae.path, info, config.data.dir, required=False)}
  checkpointing.save(mngr, step, _train_part(state), state.ema_params, meta)


class MetricLogger:
  """The scalars of the steps since the last write, averaged and written every log period:
  loss, mse, vb, grad norm, lr, steps/s, images/s per device, MFU (and HFU with remat)."""

  def __init__(self, global_batch_size: int, setup: TrainSetup, writer: Any, mngr: Any):
    self.writer, self.mngr, self.setup = writer, mngr, setup
    self.images_per_step = global_batch_size / setup.mesh.size
    self.peak = hardware.peak_flops(setup.mesh.devices.flat[0])
    # MFU counts the model's FLOPs (3 x forward). With remat the compiled step recomputes (part
    # of) the forward: XLA's count then also gives hardware FLOPs utilisation (HFU), where it
    # counts the matmuls at all (not on GPUs, whose matmuls are library calls).
    self.log_hfu = (models.remat_policy(setup.model.remat) is not None
                    and setup.flops >= setup.model_flops)
    self.history: dict[int, dict] = {}  # the logged scalars by step (returned; for tests, tools)
    self.pending: list[dict] = []
    self.t_last = time.time()

  def add(self, metrics: dict) -> None:
    self.pending.append(metrics)

  def pause(self, seconds: float) -> None:
    """Time spent outside training (evaluation) that steps/s must not count."""
    self.t_last += seconds

  def record(self, step: int, scalars: dict) -> None:
    self.writer.write_scalars(step, scalars)
    self.history.setdefault(step, {}).update(scalars)

  def write(self, step: int, state: TrainState) -> None:
    """Writes the pending steps' means at `step` (nothing if none is pending), then stops the
    job if `state` has seen a NaN/inf."""
    if not self.pending:
      return
    fetched = jax.device_get(self.pending)  # waits for the steps: time them after
    stopping.step_done(step)
    sps = len(self.pending) / max(time.time() - self.t_last, 1e-9)
    scalars = {k: float(np.mean([m[k] for m in fetched])) for k in fetched[0]}
    scalars.update(steps_per_sec=sps, images_per_sec_per_device=sps * self.images_per_step)
    if self.peak:
      scalars["mfu"] = self.setup.model_flops * sps / self.peak
      if self.log_hfu:
        scalars["hfu"] = self.setup.flops * sps / self.peak
    self.record(step, scalars)
    self.pending, self.t_last = [], time.time()
    check_finite(state, self.mngr, step)


def train_loop(config: ml_collections.ConfigDict, info: DataInfo, setup: TrainSetup,
               state: TrainState, mngr: Any, batches: Any, metrics: MetricLogger, grid: Any,
               evaluate: Any, local_bs: int, workdir: str) -> TrainState:
  """Steps to config.total_steps (or a preemption); checkpoints are saved before grids and
  evaluation. Returns the last state."""
  # Progress and ETA in the log (MetricLogger's scalars carry the throughput).
  report = periodic_actions.ReportProgress(num_train_steps=config.total_steps,
                                           every_steps=config.log_every_steps)
  profile = profiling.Profiler(config.get("profile"), workdir)
  step = int(jax.device_get(state.step))
  inflight = InFlight(config.get("steps_in_flight", 2))
  stopping.step_done(step)
  saved = -1
  with _Preemption() as preempt:
    while step < config.total_steps:
      profile(step, state)
      with jax.profiler.StepTraceAnnotation("train", step_num=step):
        local = next(batches)
        batch = {k: jax.make_array_from_process_local_data(setup.batch_sh, v)
                 for k, v in local.items()}
        state, step_metrics = setup.step(state, batch)
      step += 1
      metrics.add(step_metrics)
      inflight.add(step, step_metrics["loss"])  # the host stays at most 2 steps ahead
      checkpointing.check_saves(mngr)  # a failed background save stops the job here
      report(step)
      if step % config.log_every_steps == 0 or step == config.total_steps:
        metrics.write(step, state)
      preempted = preempt.check(mngr, step)
      # Save before sampling or evaluating, so that nothing there can lose training steps.
      if step % config.checkpoint.every_steps == 0 or step == config.total_steps or preempted:
        save(config, info, setup.model, state, mngr, step, local_bs, setup.objective)
        saved = step
      try:
        if not preempted and grid and (step % (config.sample.every_steps or -1) == 0
                                       or step == config.total_steps):
          grid(state.ema_params, step)
        if not preempted and evaluate and (step % config.eval.every_steps == 0
                                           or step == config.total_steps):
          t_eval = time.time()
          results = {f"eval/{k}": float(v) for k, v in evaluate(state.ema_params, step).items()}
          metrics.record(step, results)
          logging.info("Evaluation at step %d took %.0fs: %s", step, time.time() - t_eval,
                       results)
          metrics.pause(time.time() - t_eval)
      except stopping.Interrupted:  # a signal during the grid or the evaluation: cut short
        preempted = True
        if saved != step:
          save(config, info, setup.model, state, mngr, step, local_bs, setup.objective)
      if preempted:
        checkpointing.finish(mngr)
        came = stopping.finished_step()
        logging.warning("%s: checkpoint of step %d written%s; exiting. Run the same command to "
                        "resume.", stopping.signal_name() or "Preempted", step,
                        "" if came is None else f" (it came after step {came})")
        break
  profile.close(state)
  return state

"""Runs or resumes the scaling grid: training, FID along training from kept checkpoints, samples.

For each model, in ROOT/<model> (the training workdir):
  1. train to the preset's step budget, unless a checkpoint of that step exists. The main job
     resumes from its newest checkpoint by itself, so an interrupted model continues where it
     stopped. Checkpoints at multiples of the evaluation period are kept
     (`config.checkpoint.keep_period`), so evaluation can run later or on other hardware;
  2. evaluate every kept evaluation step missing from ROOT/<model>/metrics.json
     ({"<step>": {metric: value}}), with the EMA weights of that checkpoint and the same
     sampling noise and labels at every step. The last step also leaves its samples in
     ROOT/<model>/samples.npz (ADM layout: arr_0 uint8 [N, H, W, C], arr_1 labels).
Finished work is recognised from those files alone, so rerunning the same command is always safe.

Training runs in this process (`mode='inprocess'`), as `python -m dit_jax.main` subprocesses
('subprocess'), detached on TPU VMs through launch/tpu_vm.sh (`tpu=`), or is only printed
('print'). The preset's metric decides the evaluation: 'proxy' samples in this process and
scores with dit_jax.evaluation.proxy; 'inception' runs `dit_jax.sample` then `dit_jax.evaluate`.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shlex
import subprocess
import sys
import tempfile
import time
from typing import Any, Callable

import numpy as np
import tensorflow as tf

from dit_jax.grid import presets

GRID_FILE, MODEL_FILE, METRICS_FILE, SAMPLES_FILE = ("grid.json", "model.json", "metrics.json",
                                                      "samples.npz")


def read_json(path: str, default: Any = None) -> Any:
  if not tf.io.gfile.exists(path):
    return default
  with tf.io.gfile.GFile(path, "r") as f:
    return json.load(f)


def write_json(path: str, value: Any) -> None:
  """Atomically (temporary file, then rename): readers never see a partial file."""
  tf.io.gfile.makedirs(os.path.dirname(path))
  with tf.io.gfile.GFile(path + ".tmp", "w") as f:
    json.dump(value, f, indent=1, sort_keys=True)
  tf.io.gfile.rename(path + ".tmp", path, overwrite=True)


def read_metrics(workdir: str) -> dict[int, dict]:
  return {int(k): v for k, v in read_json(os.path.join(workdir, METRICS_FILE), {}).items()}


def _add_metrics(workdir: str, step: int, values: dict) -> None:
  metrics = read_metrics(workdir)
  metrics[step] = values
  write_json(os.path.join(workdir, METRICS_FILE), {str(k): metrics[k] for k in sorted(metrics)})


def checkpoint_steps(workdir: str) -> list[int]:
  """Steps of the complete checkpoints in workdir/checkpoints (orbax's own listing)."""
  import orbax.checkpoint as ocp  # pylint: disable=import-outside-toplevel
  path = os.path.join(workdir, "checkpoints")
  if not tf.io.gfile.isdir(path):
    return []
  path = path if "://" in path else os.path.abspath(path)
  mngr = ocp.CheckpointManager(path, options=ocp.CheckpointManagerOptions(create=False),
                               item_names=("train", "ema", "meta"))
  steps = sorted(mngr.all_steps())
  mngr.close()
  return steps


def model_info(preset: presets.Preset, model: str, config) -> dict:
  """Name, patch, parameters and forward Gflops (dit_jax.model_table) of a grid model."""
  # pylint: disable=import-outside-toplevel
  from dit_jax import flops, model_table, models
  h, _, c = preset.latent_shape
  overrides = {k: v for k, v in config.model.overrides.items() if v is not None}
  dit = models.get_model(config.model.name, input_size=h, in_channels=c,
                         num_classes=preset.num_classes,
                         class_dropout_prob=config.model.class_dropout_prob,
                         learn_sigma=config.model.learn_sigma, **overrides)
  size = config.model.name.split("-")[1].split("/")[0]
  return {"model": model, "name": config.model.name, "size": size, "patch": dit.patch_size,
          "depth": dit.depth, "hidden_size": dit.hidden_size, "num_heads": dit.num_heads,
          "tokens": dit.grid_size**2, "params": model_table.count_params(dit),
          "gflops": flops.matmul_gmacs(dit), "batch": config.data.global_batch_size,
          "config": preset.config_spec(model)}


def train_command(preset: presets.Preset, model: str, workdir: str, overrides: dict,
                  tpu: str = "", zone: str = "") -> list[str]:
  spec = preset.config_spec(model)
  flags = [f"--config.{k}={v}" for k, v in overrides.items()]
  if tpu:
    return [os.path.join(presets.ROOT, "launch", "tpu_vm.sh"), tpu.format(model=model), zone,
            spec, workdir, *flags]
  return [sys.executable, "-m", "dit_jax.main", f"--config={spec}", f"--workdir={workdir}", *flags]


def inception_commands(preset: presets.Preset, workdir: str, step: int, out_npz: str,
                       out_json: str, eval_files: dict) -> list[list[str]]:
  """`dit_jax.sample` then `dit_jax.evaluate` of one checkpoint (the paper's FID-50K), with
  the sampler options of the objective its meta records (all of the preset's without one)."""
  sample = [sys.executable, "-m", "dit_jax.sample", f"--workdir={workdir}", f"--step={step}",
            f"--num_samples={preset.num_samples}", f"--cfg_scale={preset.cfg_scale:g}",
            *preset.sampler_flags(_trained_objective(workdir, step)),
            f"--batch_size={preset.sample_batch}",
            f"--out={out_npz}"]
  if eval_files.get("vae"):
    sample.append(f"--vae={eval_files['vae']}")
  evaluate = [sys.executable, "-m", "dit_jax.evaluate", f"--samples={out_npz}",
              f"--reference={eval_files.get('reference') or 'REFERENCE.npz'}",
              f"--inception={eval_files.get('inception') or 'INCEPTION.pth'}",
              f"--out={out_json}",
              # One cache of the reference's Inception features for the whole grid.
              f"--reference_cache={os.path.join(os.path.dirname(workdir), 'reference_stats.npz')}"]
  return [sample, evaluate]


def _trained_objective(workdir: str, step: int) -> Any:
  """The objective of workdir's checkpoint `step`, None where there is none to read."""
  from dit_jax import checkpointing  # pylint: disable=import-outside-toplevel
  try:
    return checkpointing.read_objective(checkpointing.read_meta(workdir, step))
  except (FileNotFoundError, ValueError, OSError):
    return None


def show(cmd: list[str]) -> str:
  """The command as a user would type it (python, not this interpreter's full path)."""
  return shlex.join(["python" if c == sys.executable else c for c in cmd])


def _run(cmd: list[str]) -> None:
  logging.info("grid: %s", show(cmd))
  subprocess.run(cmd, check=True, cwd=presets.ROOT)


class ProxySampler:
  """Samples a grid model's checkpoints and scores them with the digits proxy (one compile)."""

  def __init__(self, preset: presets.Preset, workdir: str):
    self.preset, self.workdir, self._fn = preset, workdir, None

  def __call__(self, step: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray, dict]:
    """(uint8 images [N, H, W, C], labels [N], proxy metrics) of the EMA weights at `step`.

    Labels are balanced over the classes; the noise depends on `seed` only, so every step and
    every model of the same shape start from the same noise.
    """
    # pylint: disable=import-outside-toplevel
    import jax
    from dit_jax import checkpointing, guidance, latent_norm, sampling
    from dit_jax.evaluation import proxy
    p = self.preset
    dev = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    model, params, meta = checkpointing.load_ema_model(self.workdir, dev, step)
    if self._fn is None:
      sampling.check_batch(model, p.cfg_scale, p.sample_batch, 1,
                           (f"the {p.name} preset's cfg_scale", "sample_batch"))
      # The sampler of the objective the model was trained with (its checkpoint's meta).
      objective = checkpointing.read_objective(meta)
      self._fn = guidance.make_sample_fn(
          objective, model, **p.sampler_kwargs(objective),
          guided=p.cfg_scale != 1.0, release_cfg=False, out_shardings=dev)
    decoder = sampling.Decoder(meta.get("vae_path") or "identity",
                               latent_norm.from_record(meta, self.workdir))
    labels = np.arange(p.num_samples, dtype=np.int32) % model.num_classes
    images = np.concatenate([np.asarray(batch) for _, batch in sampling.sample_batches(
        self._fn, decoder, params, labels, batch_size=p.sample_batch,
        key=jax.random.PRNGKey(seed), cfg_scale=p.cfg_scale)])
    return images, labels, proxy.proxy_metrics(images, labels)


def evaluate_proxy(preset: presets.Preset, workdir: str, steps: list[int], final_step: int,
                   seed: int = 0) -> dict[int, dict]:
  """Proxy FID etc. of the EMA weights at each step; the same noise and labels at every step."""
  sampler, out = ProxySampler(preset, workdir), {}
  for step in steps:
    t0 = time.time()
    images, labels, values = sampler(step, seed)
    values.update(metric="proxy", sampler=preset.sampler_name(), cfg_scale=preset.cfg_scale,
                  eval_seconds=round(time.time() - t0, 2))
    if step == final_step:  # the samples before the metrics: metrics of the final step imply both
      _save_samples(workdir, images, labels)
    _add_metrics(workdir, step, values)
    logging.info("grid: %s step %d: %s", workdir, step, values)
    out[step] = values
  return out


def _save_samples(workdir: str, images: np.ndarray, labels: np.ndarray) -> None:
  from dit_jax import image_io  # pylint: disable=import-outside-toplevel
  image_io.save_npz(os.path.join(workdir, SAMPLES_FILE), arr_0=images, arr_1=labels)
  order = np.argsort(labels, kind="stable")[:100]  # a PNG grid: up to 10 of each class
  image_io.save_png(os.path.join(workdir, "samples.png"),
                    image_io.make_grid(images[order], upscale=max(1, 64 // images.shape[1])))


def evaluate_inception(preset: presets.Preset, workdir: str, steps: list[int], final_step: int,
                       eval_files: dict, runner: Callable = _run) -> dict[int, dict]:
  """FID/sFID/IS/precision/recall of each step with the sample and evaluate CLIs."""
  if not (eval_files.get("reference") and eval_files.get("inception")):
    raise ValueError("the paper preset evaluates with ADM's Inception: pass --reference "
                     "(VIRTUAL_imagenet256_labeled.npz) and --inception "
                     "(pt_inception-2015-12-05-6726825d.pth); see docs/evaluation.md")
  out = {}
  for step in steps:
    t0 = time.time()
    npz = os.path.join(workdir, "eval", f"samples_{step}.npz")
    with tempfile.TemporaryDirectory() as tmp:
      result = os.path.join(tmp, "metrics.json")
      for cmd in inception_commands(preset, workdir, step, npz, result, eval_files):
        runner(cmd)
      with open(result, encoding="utf-8") as f:
        values = json.load(f)
    values.update(metric="inception", sampler=preset.sampler_name(), cfg_scale=preset.cfg_scale,
                  eval_seconds=round(time.time() - t0, 2))
    if step == final_step:
      tf.io.gfile.rename(npz, os.path.join(workdir, SAMPLES_FILE), overwrite=True)
    else:  # 50K samples at 256 px are ~10 GB: keep only the final ones
      tf.io.gfile.remove(npz)
    _add_metrics(workdir, step, values)
    out[step] = values
  return out


@dataclasses.dataclass
class Status:
  """What a grid model has, and what `run` did to it."""
  model: str
  checkpoints: list[int]
  evaluated: list[int]
  trained_steps: list[int] = dataclasses.field(default_factory=list)  # logged steps trained now
  newly_evaluated: list[int] = dataclasses.field(default_factory=list)
  launched: bool = False
  error: str = ""
  commands: list[list[str]] = dataclasses.field(default_factory=list)  # printed (mode 'print')

  @property
  def latest(self) -> int:
    return self.checkpoints[-1] if self.checkpoints else 0


def pending_eval_steps(preset: presets.Preset, workdir: str, checkpoints: list[int],
                       evaluated: dict) -> list[int]:
  final = preset.total_steps
  todo = []
  for step in preset.eval_steps():
    if step not in checkpoints:
      continue
    done = step in evaluated
    if step == final and not tf.io.gfile.exists(os.path.join(workdir, SAMPLES_FILE)):
      done = False
    if not done:
      todo.append(step)
  return todo


def run(preset: presets.Preset, root: str, models: list[str] | None = None, *, data: str = "",
        mode: str = "inprocess", tpu: str = "", zone: str = "", train: bool = True,
        evaluate: bool = True, extra: dict | None = None, eval_files: dict | None = None,
        out=None) -> dict[str, Status]:
  """Trains and evaluates `models` of `preset` under root (resuming; see the module docstring).

  Args:
    mode: 'inprocess', 'subprocess' or 'print' (only print what would run).
    tpu: a TPU VM name (or a template with '{model}', one slice per model): training is started
      detached through launch/tpu_vm.sh; with one slice for all, only the first unfinished model
      is started (rerun when it has finished). Evaluation of kept checkpoints still runs here.
    train / evaluate: skip either stage (e.g. evaluate on other hardware than the training).
    extra: more dotted config overrides for every model (e.g. {'model.overrides.depth': 1}).
    eval_files: {'reference', 'inception', 'vae'} for the 'inception' metric.
  Returns:
    {model: Status}.
  """
  out = out or sys.stdout
  models = list(models or preset.models)
  unknown = [m for m in models if m not in preset.models]
  if unknown:
    raise ValueError(f"unknown models {unknown}; the {preset.name} grid has "
                     f"{','.join(preset.models)}")
  if mode not in ("inprocess", "subprocess", "print"):
    raise ValueError(f"mode must be inprocess, subprocess or print, not {mode!r}")
  eval_files = eval_files or {}
  dry = mode == "print"
  if not dry:
    tf.io.gfile.makedirs(root)
  probe = presets.model_config(preset, models[0], data, extra)
  if not data and probe.data.get("builtin") and not dry:
    from dit_jax import demo_data  # pylint: disable=import-outside-toplevel
    data = demo_data.ensure(probe.data.builtin, root)  # one copy for the whole grid
  if not data and not probe.data.get("builtin") and dry:
    data = "LATENTS_DIR"
  if not data and not probe.data.get("builtin"):
    raise ValueError(f"the {preset.name} grid trains on prepared latents: pass --data=DIR "
                     "(python -m dit_jax.prepare_latents --out=DIR)")
  overrides = presets.training_overrides(preset, data, extra)
  if not dry:
    grid = read_json(os.path.join(root, GRID_FILE), {})
    grid.update(preset=preset.name, settings=dataclasses.asdict(preset), data=data,
                extra=extra or {}, models=sorted(set(grid.get("models", [])) | set(models)))
    write_json(os.path.join(root, GRID_FILE), grid)

  settings = GridRun(preset=preset, root=root, data=data, mode=mode, tpu=tpu, zone=zone,
                     train=train, evaluate=evaluate, extra=extra, eval_files=eval_files,
                     overrides=overrides, out=out)
  statuses, launched_one = {}, False
  for model in models:
    try:
      launched_one = _run_model(settings, model, statuses, launched_one)
    except Exception as e:  # pylint: disable=broad-except
      if len(models) == 1 or isinstance(e, KeyboardInterrupt):
        raise
      # One failing model (diverged, bad config) must not stop the rest of a long grid.
      logging.exception("grid: %s failed", model)
      print(f"# {model}: FAILED: {type(e).__name__}: {e}", file=out, flush=True)
      statuses.setdefault(model, Status(model, [], [])).error = f"{type(e).__name__}: {e}"
  failed = [m for m, st in statuses.items() if st.error]
  if failed:
    raise RuntimeError(f"grid: {len(failed)} model(s) failed: {', '.join(failed)} (see the log; "
                       "rerun the same command to retry them)")
  return statuses


@dataclasses.dataclass(frozen=True)
class GridRun:
  """The settings of one `run`, shared by every model (see `run`'s arguments)."""
  preset: presets.Preset
  root: str
  data: str
  mode: str
  tpu: str
  zone: str
  train: bool
  evaluate: bool
  extra: dict | None
  eval_files: dict
  overrides: dict          # the dotted config overrides of every model's training command
  out: Any                 # where the progress lines are printed


def _run_model(r: GridRun, model: str, statuses: dict[str, Status], launched_one: bool) -> bool:
  """One model's training and evaluation; returns whether a TPU job has been launched."""
  preset, root, data, mode, tpu, zone = r.preset, r.root, r.data, r.mode, r.tpu, r.zone
  extra, eval_files, overrides, out = r.extra, r.eval_files, r.overrides, r.out
  dry = mode == "print"
  workdir = os.path.join(root, model)
  config = presets.model_config(preset, model, data, extra)
  if not dry and not tf.io.gfile.exists(os.path.join(workdir, MODEL_FILE)):
    write_json(os.path.join(workdir, MODEL_FILE), model_info(preset, model, config))
  st = Status(model, checkpoint_steps(workdir), sorted(read_metrics(workdir)))
  statuses[model] = st
  print(f"# {model}: checkpoints {st.checkpoints or 'none'}; evaluated {st.evaluated or 'none'}",
        file=out, flush=True)

  # 1. Training (the job resumes from its newest checkpoint by itself).
  if r.train and st.latest < preset.total_steps:
    cmd = train_command(preset, model, workdir, overrides, tpu, zone)
    if dry or (tpu and launched_one and "{model}" not in tpu):
      st.commands.append(cmd)
      print(show(cmd) + ("" if dry else "   # queued: rerun when the slice is free"),
            file=out, flush=True)
    elif tpu:
      print(show(cmd), file=out, flush=True)
      _run(cmd)
      st.launched = launched_one = True
    elif mode == "subprocess":
      print(show(cmd), file=out, flush=True)
      t0 = time.time()
      _run(cmd)
      _add_timing(workdir, "train_seconds", time.time() - t0)
    else:
      from dit_jax import train as train_lib  # pylint: disable=import-outside-toplevel
      t0 = time.time()
      history = train_lib.train_and_evaluate(config, workdir)
      _add_timing(workdir, "train_seconds", time.time() - t0)
      st.trained_steps = sorted(history)
    if not dry:
      st.checkpoints = checkpoint_steps(workdir)

  # 2. Evaluation of the kept checkpoints not evaluated yet.
  if not r.evaluate:
    return launched_one
  todo = pending_eval_steps(preset, workdir, st.checkpoints, read_metrics(workdir))
  if dry:
    for step in todo:
      if preset.metric == "inception":
        for cmd in inception_commands(preset, workdir, step, f"{workdir}/eval/samples_{step}.npz",
                                      f"{workdir}/eval/metrics_{step}.json", eval_files):
          st.commands.append(cmd)
          print(show(cmd), file=out, flush=True)
      else:
        print(f"# evaluate {model} step {step}: proxy FID in-process", file=out, flush=True)
    return launched_one
  if not todo:
    return launched_one
  t0 = time.time()
  if preset.metric == "proxy":
    done = evaluate_proxy(preset, workdir, todo, preset.total_steps)
  else:
    done = evaluate_inception(preset, workdir, todo, preset.total_steps, eval_files)
  _add_timing(workdir, "eval_seconds", time.time() - t0)
  st.newly_evaluated = sorted(done)
  st.evaluated = sorted(read_metrics(workdir))
  for step in st.newly_evaluated:
    main = done[step].get("proxy_fid", done[step].get("fid"))
    print(f"#   {model} step {step}: fid {main:.4g}", file=out, flush=True)
  return launched_one


def _add_timing(workdir: str, key: str, seconds: float) -> None:
  path = os.path.join(workdir, "timing.json")
  timing = read_json(path, {})
  timing[key] = round(timing.get(key, 0.0) + seconds, 1)
  write_json(path, timing)

"""Sample a trained (or converted release) DiT into ADM's .npz layout for evaluation.

  python -m dit_jax.sample --workdir=DIR --num_samples=50000 --cfg_scale=1.5 --out=samples.npz
  python -m dit_jax.sample --checkpoint=CONVERTED_DIR --vae=SD_VAE_DIR --out=samples.npz
  python -m dit_jax.sample --workdir=DIR --sampler=dpm++2m --steps=20 --out=samples.npz
  python -m dit_jax.sample --workdir=FLOW_DIR --sampler=heun2 --steps=50 --out=samples.npz

The objective (dit_jax/objectives/: ADM diffusion, flow matching, ...) is the checkpoint's:
--sampler/--steps take its samplers, listed in --help.

Loads the EMA weights of the newest checkpoint in --workdir (or a checkpoint written by
`python -m dit_jax.convert`), samples with classifier-free guidance sharded over all devices
and processes (one compiled loop per batch shape), decodes with the VAE and writes
`arr_0` uint8 [N, H, W, C] and `arr_1` int labels (uniform over classes unless given),
plus a PNG grid of the first 64 images next to the .npz.

On several hosts each process keeps only the images its own devices made and writes them as
OUT.part-<i>-of-<n>.npz; process 0 then streams the parts into OUT (process-major order,
`arr_1` matching `arr_0`) and removes them (--keep_parts keeps them). Nothing is
all-gathered: 50K images at 256 px are 9.8 GB. Paths may be local or gs://.
"""

from __future__ import annotations

import dataclasses
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
import tensorflow as tf
from absl import app, flags, logging
from jax.experimental import multihost_utils

from dit_jax import (attention, checkpointing, guidance, image_io, latent_norm, models,
                     objectives, runtime, sampling, sharding)

FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", None, "Training workdir: samples its newest checkpoint's EMA.")
flags.DEFINE_integer("step", None, "Checkpoint step in --workdir (default: the newest).",
                     lower_bound=0)
flags.DEFINE_string("checkpoint", None, "A converted release checkpoint (dit_jax.convert --out).")
flags.DEFINE_integer("num_samples", 64, "Number of images.", lower_bound=1)
flags.DEFINE_float("cfg_scale", 1.5, "Guidance scale (1.5 reproduces the paper's FID 2.27; 1 = "
                   "no guidance).", lower_bound=0.0)
flags.DEFINE_string("sampler", None, "A sampler of the checkpoint's objective (default: the "
                    "objective's first below). " + "; ".join(
                        f"{cls.name}: {cls.default_sampler}, " + ", ".join(
                            s for s in cls.samplers if s != cls.default_sampler)
                        for cls in objectives.REGISTRY.values()) + ".")
flags.DEFINE_integer("steps", None, "Steps of the sampler (default: the sampler's). ADM: model "
                     "calls per image, x2 with guidance (250 ddpm, 50 ddim, 20 dpm++*); flow: "
                     "SiT's grid points (250, dopri5 50); EDM: Heun steps, 2 steps - 1 calls "
                     "(18).", lower_bound=1)
flags.DEFINE_string("spacing", "time", "Step spacing (ADM): uniform in 'time', in 'logsnr', or "
                    "'karras' (rho 7). The other objectives take only 'time'.")
flags.DEFINE_list("guidance_interval", None, "LO,HI in the objective's units: ADM and EDM "
                  "guide where the noise level sigma (ADM's sqrt((1-abar_t)/abar_t)) is in "
                  "(lo, hi]; flow where flow time (0 noise, 1 data) is in [lo, hi]; default: "
                  "every step.")
flags.DEFINE_string("respacing", "", "ADM: the release's respacing instead of --sampler/--steps: "
                    "'250' (DDPM) or 'ddimN' (DDIM); the same as --sampler_options=respacing=.")
flags.DEFINE_list("sampler_options", [], "KEY=VALUE,...: the checkpoint's objective's own "
                  "sampler options (see `sampler_options` in dit_jax/objectives/<name>.py).")
flags.DEFINE_bool("release_cfg", None, "Guide only the first 3 channels as the release does "
                  "(default: for ADM checkpoints; every channel for flow and the others).")
flags.DEFINE_integer("batch_size", 64, "Global batch per sampling call.", lower_bound=1)
flags.DEFINE_integer("seed", 0, "Seed for labels and noise.")
flags.DEFINE_list("labels", None, "Class labels to cycle through (default: uniform random).")
flags.DEFINE_string("vae", None, "Decoder: diffusers AutoencoderKL folder, a named VAE "
                    "NAME:WEIGHTS (vavae_f16d32:PATH.pt) or 'identity' (default: the VAE the "
                    "training run used, from its checkpoint).")
flags.DEFINE_string("dtype", "float32", "Activation dtype of sampling (float32 as the release; "
                    "bfloat16 is faster on TPUs/GPUs).")
flags.DEFINE_string("attention_impl", "auto", "Attention kernel (dit_jax/attention.py): 'auto' "
                    "picks cuDNN on GPUs and splash on TPUs from 1,024 tokens when --dtype is "
                    "bfloat16/float16, else the XLA path; 'xla', 'cudnn', 'splash'.")
flags.DEFINE_float("scale_factor", None, "Latent scale factor (default: from the checkpoint; "
                   "per-channel statistics recorded there stay).")
flags.DEFINE_string("out", "samples.npz", "Output .npz (ADM layout), local or gs://.")
flags.DEFINE_bool("keep_parts", False, "Keep the per-process parts after merging them (several "
                  "hosts).")
flags.DEFINE_string("matmul_precision", "highest", "Matmul precision of sampling and decoding: "
                    "'highest' computes float32 as the release, also on TPUs (default: one "
                    "bfloat16 pass); 'default' is faster.")
flags.DEFINE_string("compilation_cache_dir", None, "JAX persistent compilation cache (default: "
                    "WORKDIR/compilation_cache with --workdir).")
runtime.define_flags()


def load_model(mesh) -> tuple[models.DiT, dict, dict]:
  """(model, replicated EMA params, checkpoint meta) from --workdir or --checkpoint; the meta
  records the objective (objectives.from_meta)."""
  dtype = jnp.dtype(FLAGS.dtype)
  repl = sharding.replicated(mesh)
  if FLAGS.checkpoint:
    from dit_jax import convert  # pylint: disable=import-outside-toplevel
    model, params = convert.load_converted(FLAGS.checkpoint, sharding=repl)
    if not FLAGS.vae:
      raise app.UsageError("--checkpoint (a converted release model) samples latents: pass "
                           "--vae=DIR (the sd-vae-ft-ema diffusers folder), or "
                           "--vae=vavae_f16d32:PATH for a LightningDiT on VA-VAE latents")
    norm = convert.converted_latent_norm(FLAGS.checkpoint)
    meta = {"latent_norm": norm.to_meta(), "model_kwargs": {"learn_sigma": model.learn_sigma},
            "objective": convert.converted_objective(FLAGS.checkpoint)}
    model, params = models.without_projector(model, params)  # REPA's: training only
    return model.clone(dtype=dtype), params, meta
  if not FLAGS.workdir:
    raise app.UsageError("pass --workdir (a training run) or --checkpoint (a converted release)")
  return checkpointing.load_ema_model(FLAGS.workdir, repl, FLAGS.step, dtype)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  # The flags that need no checkpoint are checked before one is read.
  try:
    attention.check_implementation(FLAGS.attention_impl)
  except ValueError as e:
    raise app.UsageError(f"--attention_impl: {e}") from None
  try:
    extra = objectives.parse_options(FLAGS.sampler_options)
  except ValueError as e:
    raise app.UsageError(f"--sampler_options: {e}") from None
  if ((FLAGS.respacing or extra.get("respacing"))
      and (FLAGS.steps is not None or FLAGS["sampler"].present)):
    raise app.UsageError("--respacing replaces --sampler/--steps: pass one or the other")
  runtime.setup()
  if FLAGS.compilation_cache_dir or FLAGS.workdir:
    runtime.enable_compilation_cache(
        FLAGS.compilation_cache_dir or os.path.join(FLAGS.workdir, "compilation_cache"),
        override=bool(FLAGS.compilation_cache_dir))
  mesh = sharding.create_mesh(-1, 1)
  batch_sh, repl = sharding.batch_sharding(mesh), sharding.replicated(mesh)
  model, params, meta = load_model(mesh)
  tokens = (model.input_size // model.patch_size) ** 2
  model = model.clone(attention_impl=attention.resolve_for(
      FLAGS.attention_impl, model.dtype, jax.default_backend(), tokens))
  norm = latent_norm.from_record(meta, FLAGS.checkpoint or FLAGS.workdir, default_scale=0.18215)
  if FLAGS.scale_factor:
    norm = dataclasses.replace(norm, scale_factor=FLAGS.scale_factor)
  bs = FLAGS.batch_size
  try:
    sampling.check_batch(model, FLAGS.cfg_scale, bs, mesh.size, ("--cfg_scale", "--batch_size"))
  except ValueError as e:
    raise app.UsageError(str(e)) from None
  objective = objectives.from_meta(meta)
  if FLAGS.sampler and FLAGS.sampler not in objective.samplers:
    raise app.UsageError(f"--sampler={FLAGS.sampler}: the checkpoint was trained with the "
                         f"{objective.name} objective, whose samplers are "
                         f"{', '.join(objective.samplers)}")
  try:
    # --sampler_options go through unfiltered: the objective refuses a key it lacks by name.
    options = {**objectives.sampler_kwargs({
        "sampler": FLAGS.sampler, "steps": FLAGS.steps, "spacing": FLAGS.spacing,
        "guidance_interval": [float(v) for v in FLAGS.guidance_interval or []],
        "respacing": FLAGS.respacing}), **extra}
    sample_fn = guidance.make_sample_fn(
        objective, model, **options, guided=FLAGS.cfg_scale != 1.0,
        release_cfg=FLAGS.release_cfg, in_shardings=(repl, repl, batch_sh, repl),
        out_shardings=batch_sh)
  except ValueError as e:
    raise app.UsageError(f"{e} ({objective.name} objective of the checkpoint)") from None
  decoder = sampling.Decoder(FLAGS.vae or meta.get("vae_path") or "identity", norm, repl,
                             matmul_precision=FLAGS.matmul_precision)

  rng = np.random.default_rng(FLAGS.seed)
  n = FLAGS.num_samples
  if FLAGS.labels:
    labels = np.resize(np.array([int(v) for v in FLAGS.labels], np.int32), n)
  else:
    labels = rng.integers(0, model.num_classes, n).astype(np.int32)
  bad = labels[(labels < 0) | (labels >= model.num_classes)]
  if bad.size:
    raise app.UsageError(f"--labels: {bad[0]} is outside [0, {model.num_classes})")
  mine, mine_labels, t0 = [], [], time.time()
  for start, batch in sampling.sample_batches(
      sample_fn, decoder, params, labels, batch_size=bs, key=jax.random.PRNGKey(FLAGS.seed),
      cfg_scale=FLAGS.cfg_scale, batch_sharding=batch_sh, mesh=mesh,
      matmul_precision=FLAGS.matmul_precision):
    images, rows = local_rows(batch, start, n)
    mine.append(images)
    mine_labels.append(labels[rows])
    done = start + bs
    rate = done / (time.time() - t0)
    logging.info("%d/%d images, %.2f images/s, ETA %.0fs", min(done, n), n, rate,
                 max(0, n - done) / rate)
  write(np.concatenate(mine), np.concatenate(mine_labels), FLAGS.out)


def local_rows(images: jax.Array, offset: int, n: int) -> tuple[np.ndarray, np.ndarray]:
  """This process's rows of a batch-sharded global array (global row = offset + index),
  below n, in order: (images, global row numbers)."""
  shards = sorted((s for s in images.addressable_shards if s.replica_id == 0),
                  key=lambda s: s.index[0].start or 0)
  rows = np.concatenate([offset + np.arange(s.index[0].start or 0,
                                            (s.index[0].start or 0) + s.data.shape[0])
                         for s in shards])
  data = np.concatenate([np.asarray(s.data) for s in shards])
  keep = rows < n
  return data[keep], rows[keep]


def write(images: np.ndarray, labels: np.ndarray, out: str) -> None:
  """One .npz (ADM layout), from one process or merged from every process's part."""
  pid, nproc = jax.process_index(), jax.process_count()
  if nproc == 1:
    image_io.save_npz(out, arr_0=images, arr_1=labels)
  else:
    stem = out[:-4] if out.endswith(".npz") else out
    parts = [f"{stem}.part-{p:05d}-of-{nproc:05d}.npz" for p in range(nproc)]
    image_io.save_npz(parts[pid], arr_0=images, arr_1=labels)
    multihost_utils.sync_global_devices("sample parts written")
    if pid == 0:
      image_io.merge_npz_parts(parts, out)
      if not FLAGS.keep_parts:
        for part in parts:
          tf.io.gfile.remove(part)
    multihost_utils.sync_global_devices("samples merged")
  if pid == 0:
    grid = image_io.make_grid(images[:64], upscale=max(1, 128 // images.shape[1]))
    image_io.save_png((out[:-4] if out.endswith(".npz") else out) + ".png", grid)
    logging.info("Wrote %s: arr_0 uint8 images (%s per process here), arr_1 labels", out,
                 images.shape)


def run() -> None:
  """Console script `dit-sample` (the same as python -m dit_jax.sample)."""
  runtime.run(main)


if __name__ == "__main__":
  run()

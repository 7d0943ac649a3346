"""Periodic work of the training loop: sample grids and in-job evaluation (FID-K).

Both are built, and their sampler, decoder and Inception compiled ahead of time, when the
job starts: a compile error or an out-of-memory there stops the job before it trains, not
after a training step that a restart would lose again and again. The loop calls each with
the EMA parameters and the step, after that step's checkpoint was written.
"""

from __future__ import annotations

import os
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from dit_jax import guidance, image_io, models, objectives, sampling, stopping


def _abstract(tree: Any, shardings: Any) -> Any:
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                      tree, shardings)


def _compile(fn: Any, precision: str | None, mesh: Any, *args: Any) -> Any:
  # Under the mesh: kernels that shard_map themselves (splash attention) need it.
  with jax.default_matmul_precision(precision), jax.set_mesh(mesh):
    return fn.lower(*args).compile()


def _for_sampling(tree: Any) -> Any:
  """A parameter-shaped tree without REPA's projector (trained, never sampled)."""
  return {k: v for k, v in tree.items() if k != "projector"}


def _sample_fn(setup: Any, options: Any, where: str, guided: bool, release_cfg: bool,
               in_shardings: Any, out_shardings: Any) -> Any:
  """The objective's guided sampler of a config section (config.sample or config.eval,
  named `where` in errors): its sampler, steps, guidance interval and the objective's own
  options."""
  try:
    model, _ = models.without_projector(setup.model, {})
    return guidance.make_sample_fn(
        setup.objective, model, **objectives.sampler_kwargs(options), guided=guided,
        release_cfg=release_cfg, in_shardings=in_shardings, out_shardings=out_shardings)
  except ValueError as e:
    raise ValueError(f"{where} ({setup.objective.name} objective): {e}") from None


class SampleGrid:
  """A class-conditional grid from the EMA weights: PNG under WORKDIR/samples and TensorBoard."""

  def __init__(self, config: ml_collections.ConfigDict, setup: Any, decoder: sampling.Decoder,
               writer: Any, workdir: str):
    model, repl = setup.model, setup.repl
    n = config.sample.num_images
    self.decoder, self.writer, self.workdir = decoder, writer, workdir
    # Labels cycle through the classes: with one column per class, a column is a class.
    self.columns = min(n, model.num_classes, 16)
    self.args = jax.device_put(
        (jax.random.PRNGKey(config.seed + 1), jnp.arange(n, dtype=jnp.int32) % model.num_classes,
         jnp.float32(config.sample.cfg_scale)), repl)
    # The EMA (sharded over the devices with config.sharding.ema='update') is gathered whole
    # once per grid, so the sampling loop does no per-step all-gathers (REPA's projector stays).
    ema = _for_sampling(setup.abstract.ema_params)
    repl_tree = jax.tree.map(lambda _: repl, ema)
    self.replicate = jax.jit(_for_sampling, out_shardings=repl_tree).lower(
        _abstract(setup.abstract.ema_params, setup.state_sh.ema_params)).compile()
    guided = models.has_null_class(model) and not setup.objective.trained_guidance
    fn = _sample_fn(setup, config.sample, "config.sample", guided,
                    config.sample.release_cfg, (repl, repl, repl, repl), repl)
    self.sample = _compile(fn, config.sample.matmul_precision, setup.mesh,
                           _abstract(ema, repl_tree), *_abstract(self.args, (repl,) * 3))
    h, w, c = model.input_size, model.input_size, model.in_channels
    decoder.compile(jax.ShapeDtypeStruct((n, h, w, c), jnp.float32, sharding=repl))

  def __call__(self, ema_params: Any, step: int) -> None:
    params = self.replicate(ema_params)
    images = np.asarray(jax.device_get(self.decoder(self.sample(params, *self.args))))
    grid = image_io.make_grid(images, columns=self.columns,
                              upscale=max(1, 128 // images.shape[1]))
    if jax.process_index() == 0:
      image_io.save_png(os.path.join(self.workdir, "samples", f"step_{step:08d}.png"), grid)
    self.writer.write_images(step, {"samples": grid[None]})


class Evaluator:
  """FID/sFID/IS/precision/recall of `config.eval.num_samples` EMA samples (e.g. FID-5K).

  A progress signal, not the paper's protocol (which is FID-50K of `dit_jax.sample` output
  through `dit_jax.evaluate`): fewer samples bias FID upwards. The EMA weights are gathered
  (replicated) once per evaluation, so the sampling loop does no per-step all-gathers; the
  decoded images stay on the devices that made them and go straight into the Inception;
  only features cross hosts. `__call__` returns the same floats on every process.
  """

  def __init__(self, config: ml_collections.ConfigDict, setup: Any, decoder: sampling.Decoder,
               workdir: str):
    from dit_jax import evaluation  # pylint: disable=import-outside-toplevel
    from dit_jax.evaluation import features  # pylint: disable=import-outside-toplevel
    e, model, repl, batch_sh = config.eval, setup.model, setup.repl, setup.batch_sh
    if not (e.inception and e.reference):
      raise ValueError("config.eval.every_steps is set: config.eval.inception (the "
                       "pt_inception-2015-12-05 .pth or converted .npz) and config.eval.reference "
                       "(an ADM reference batch .npz, image folder or tfds:NAME) are needed")
    sampling.check_batch(model, e.cfg_scale, e.batch_size, setup.mesh.size,
                         ("config.eval.cfg_scale", "config.eval.batch_size"))
    if decoder.path == "identity" and model.in_channels not in (1, 3):
      raise ValueError(f"config.eval needs images, but latents with {model.in_channels} channels "
                       "are decoded with the identity: set config.vae.path to the SD VAE folder")
    self.config, self.decoder, self.features = config, decoder, features
    self.inception = jax.device_put(evaluation.load_inception(e.inception), repl)
    self.reference = evaluation.compute_reference(
        e.reference, self.inception, cache_path=os.path.join(workdir, "eval_reference_stats.npz"),
        batch_size_per_device=e.inception_batch_per_device)
    self.metrics = evaluation.compute_metrics
    abstract_ema = _abstract(setup.abstract.ema_params, setup.state_sh.ema_params)
    ema = _for_sampling(setup.abstract.ema_params)
    repl_tree = jax.tree.map(lambda _: repl, ema)
    self.replicate = jax.jit(_for_sampling, out_shardings=repl_tree).lower(abstract_ema).compile()
    n = e.batch_size
    self.labels = np.asarray(jax.random.randint(jax.random.PRNGKey(config.seed + 3),
                                                (e.num_samples,), 0, model.num_classes), np.int32)
    fn = _sample_fn(setup, e, "config.eval", e.cfg_scale != 1.0, config.sample.release_cfg,
                    (repl, repl, batch_sh, repl), batch_sh)
    key = jax.ShapeDtypeStruct((2,), jnp.uint32, sharding=repl)
    self.sample = _compile(fn, config.sample.matmul_precision, setup.mesh,
                           _abstract(ema, repl_tree), key, jax.ShapeDtypeStruct((n,), jnp.int32, sharding=batch_sh),
                           jax.ShapeDtypeStruct((), jnp.float32, sharding=repl))
    h, w, c = model.input_size, model.input_size, model.in_channels
    out = decoder.compile(jax.ShapeDtypeStruct((n, h, w, c), jnp.float32, sharding=batch_sh))
    images = jax.ShapeDtypeStruct(out.shape, out.dtype, sharding=batch_sh)
    self.extract = features.make_sharded_extract_fn(batch_sh).lower(
        _abstract(self.inception, jax.tree.map(lambda _: repl, self.inception)), images).compile()
    self.batch_sh, self.repl = batch_sh, repl

  def __call__(self, ema_params: Any, step: int) -> dict[str, float]:
    e = self.config.eval
    batches = sampling.sample_batches(
        self.sample, self.decoder, self.replicate(ema_params), self.labels,
        batch_size=e.batch_size, key=jax.random.fold_in(jax.random.PRNGKey(self.config.seed + 2),
                                                        step),
        cfg_scale=e.cfg_scale, batch_sharding=self.batch_sh, replicated=self.repl)
    outputs = []
    for _, images in batches:
      stopping.check()  # SIGTERM/SIGINT: cut the evaluation short (the loop saves and exits)
      outputs.append(self.extract(self.inception, images))
    feats = self.features.gather_features(outputs, e.num_samples)
    return self.metrics(feats, self.reference, fid_method="eigh")

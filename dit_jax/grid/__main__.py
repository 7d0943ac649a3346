"""`python -m dit_jax.grid run|report --root=DIR`: the scaling grid's runner and report.

  python -m dit_jax.grid run --preset=mini --root=/tmp/dit_grid_mini        # CPU, ~30 min
  python -m dit_jax.grid report --root=/tmp/dit_grid_mini
  python -m dit_jax.grid run --preset=paper --root=gs://B/grid --data=gs://B/latents256 \
      --models=s2,b2 --reference=VIRTUAL_imagenet256_labeled.npz \
      --inception=pt_inception-2015-12-05-6726825d.pth
  python -m dit_jax.grid run --preset=paper --root=... --data=... --mode=print    # commands only

`run` trains and evaluates what is missing and skips what is done, so the same command resumes
an interrupted grid. Without --preset (and the other settings), a rerun uses those recorded in
ROOT/grid.json. See docs/grid.md.
"""

import ast
import dataclasses
import os
import time

from absl import app, flags, logging

from dit_jax import objectives, runtime
from dit_jax.grid import presets, report, runner

FLAGS = flags.FLAGS
flags.DEFINE_string("root", None, "Grid directory: ROOT/<model> are the training workdirs.")
flags.DEFINE_enum("preset", None, list(presets.PRESETS), "Grid preset (default: the one recorded "
                  "in ROOT/grid.json, else 'paper').")
flags.DEFINE_list("models", None, "Subset of the grid, e.g. s2,b2 (default: all 12).")
flags.DEFINE_string("data", None, "Latent records (prepare_latents --out); the mini preset uses "
                    "the built-in digits.")
flags.DEFINE_integer("steps", None, "Training steps of every model (preset: paper 400K, mini 2K).")
flags.DEFINE_integer("eval_every", None, "Evaluate at every multiple of this step.")
flags.DEFINE_integer("num_samples", None, "Samples per evaluation (paper 50,000, mini 500).")
flags.DEFINE_string("sampler", None, "Sampler of the evaluation, one of the trained objective's "
                    "(ADM: ddpm, ddim, dpm++2m, dpm++3m, dpm++2m-sde), instead of the preset's "
                    "respacing string.")
flags.DEFINE_integer("sampler_steps", None, "Steps of --sampler (default: the sampler's).")
flags.DEFINE_list("sampler_options", None, "KEY=VALUE,...: the objective's own sampler options "
                  "(replacing the preset's), e.g. respacing=250 or spacing=logsnr for ADM.")
flags.DEFINE_string("respacing", None, "ADM: the release's respacing string of the evaluation "
                    "(paper '250'); the same as --sampler_options=respacing=...")
flags.DEFINE_string("spacing", None, "ADM: step spacing of --sampler (time, logsnr, karras); the "
                    "same as --sampler_options=spacing=...")
flags.DEFINE_integer("sample_batch", None, "Global batch of the evaluation's sampler.")
flags.DEFINE_enum("mode", "inprocess", ["inprocess", "subprocess", "print"],
                  "Train in this process, as dit_jax.main subprocesses, or print the commands.")
flags.DEFINE_string("tpu", "", "TPU VM name (or template with {model}): train detached there "
                    "through launch/tpu_vm.sh.")
flags.DEFINE_string("zone", "", "TPU zone.")
flags.DEFINE_bool("train", True, "Train the models whose budget is not reached.")
flags.DEFINE_bool("evaluate", True, "Evaluate the kept checkpoints not evaluated yet.")
flags.DEFINE_string("reference", "", "Paper preset: ADM reference batch .npz.")
flags.DEFINE_string("inception", "", "Paper preset: FID Inception weights (.pth or .npz).")
flags.DEFINE_string("vae", "", "Paper preset: SD VAE folder (default: the one the latents name).")
flags.DEFINE_multi_string("set", [], "Config override for every model, key=value, e.g. "
                          "--set=model.overrides.depth=2 (repeatable).")
runtime.define_flags()

_SETTINGS = {"steps": "total_steps", "eval_every": "eval_every", "num_samples": "num_samples",
             "sample_batch": "sample_batch", "sampler": "sampler",
             "sampler_steps": "sampler_steps"}


def _value(text: str):
  try:
    return ast.literal_eval(text)
  except (ValueError, SyntaxError):
    return text


def resolve(root: str) -> tuple[presets.Preset, str, dict]:
  """Preset (with settings from ROOT/grid.json, then flags), data and extra overrides."""
  grid = runner.read_json(os.path.join(root, runner.GRID_FILE), {})
  name = FLAGS.preset or grid.get("preset") or "paper"
  preset = presets.get_preset(name)
  if grid.get("preset") == name:  # a rerun continues with the recorded settings
    settings = grid.get("settings", {})
    recorded = {k: v for k, v in settings.items() if k in _SETTINGS.values()}
    preset = dataclasses.replace(preset, **recorded,
                                 sampler_options=presets.settings_options(settings))
  changes = {field: getattr(FLAGS, flag) for flag, field in _SETTINGS.items()
             if getattr(FLAGS, flag) is not None}
  options = objectives.parse_options(FLAGS.sampler_options) if FLAGS.sampler_options else None
  for flag in ("respacing", "spacing"):
    if getattr(FLAGS, flag) is not None:
      options = {**(options or {}), flag: getattr(FLAGS, flag)}
  if options is not None or FLAGS.sampler:  # a new sampler replaces the preset's options
    changes["sampler_options"] = options or {}
  preset = dataclasses.replace(preset, **changes)
  extra = dict(grid.get("extra", {})) if grid.get("preset") == name else {}
  for item in FLAGS.set:
    key, sep, value = item.partition("=")
    if not sep:
      raise app.UsageError(f"--set={item}: expected key=value")
    extra[key] = _value(value)
  data = FLAGS.data if FLAGS.data is not None else (
      grid.get("data", "") if grid.get("preset") == name else "")
  return preset, data, extra


def main(argv):
  if len(argv) != 2 or argv[1] not in ("run", "report"):
    raise app.UsageError("usage: python -m dit_jax.grid run|report --root=DIR [flags]")
  if not FLAGS.root:
    raise app.UsageError("--root is required")
  if argv[1] == "report":
    out = report.write_report(FLAGS.root)
    print(f"wrote {out['csv']} ({out['rows']} rows), {out['markdown']}, "
          + ", ".join(out["figures"]))
    print(f"Spearman rho (Gflops vs FID, final step): {out['spearman']:.3f}")
    return
  runtime.setup()
  preset, data, extra = resolve(FLAGS.root)
  t0 = time.time()
  runner.run(preset, FLAGS.root, FLAGS.models, data=data, mode=FLAGS.mode, tpu=FLAGS.tpu,
             zone=FLAGS.zone, train=FLAGS.train, evaluate=FLAGS.evaluate, extra=extra,
             eval_files={"reference": FLAGS.reference, "inception": FLAGS.inception,
                         "vae": FLAGS.vae})
  logging.info("grid run took %.0f s", time.time() - t0)
  print(f"# grid run took {time.time() - t0:.0f} s")


def run() -> None:
  """Console script `dit-grid` (the same as python -m dit_jax.grid)."""
  app.run(main)


if __name__ == "__main__":
  run()

r"""Quality per model evaluation: every sampler x steps on the digits demo, against 250-step DDPM.

  python -m dit_jax.main --config=configs/demo.py --workdir=/tmp/dit_demo
  python benchmarks/sampler_quality.py --workdir=/tmp/dit_demo

Samples `--per_class` images of each digit from the newest checkpoint's EMA weights with each
sampler (ddpm, ddim, dpm++2m, dpm++3m, dpm++2m-sde) at each of `--steps` and `--spacings`, at
each guidance scale, and prints a markdown table of
  - the proxy FID against the 1,797 real digits (dit_jax.evaluation.proxy: Frechet distance in
    the features of an MLP classifier trained on the real digits; comparable only between rows
    with the same number of samples),
  - the share of samples that this classifier assigns to the requested digit,
  - NFE, the network evaluations per image (steps, twice with guidance, once outside a
    guidance interval), and the wall time per image of the compiled sampling loop (compile
    excluded; the fastest of the seeds' runs: the machine may be shared).
Every row starts from the same initial noise (per seed). With --seeds=K each row is sampled
with K seeds and shows mean +- standard deviation; with K = 1 the 250-step DDPM reference is
sampled again with a second seed, to show the seed-to-seed noise of the figures.
"""

import itertools
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from absl import app, flags  # noqa: E402

from dit_jax import checkpointing, guidance, latent_norm, sampling  # noqa: E402
from dit_jax.diffusion import create_sampler, guidance_active  # noqa: E402
from dit_jax.evaluation import proxy  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", None, "Demo workdir (python -m dit_jax.main --config=configs/demo.py).")
flags.DEFINE_integer("per_class", 100, "Samples per digit (the proxy FID depends on the total).")
flags.DEFINE_list("cfg_scales", ["1", "3"], "Guidance scales (1 = unguided).")
flags.DEFINE_list("samplers", ["ddpm", "ddim", "dpm++2m", "dpm++3m", "dpm++2m-sde"], "Samplers.")
flags.DEFINE_list("steps", ["10", "20", "50"], "Step counts.")
flags.DEFINE_list("spacings", ["time"], "Step spacings of the DPM-Solver++ rows (time, logsnr, "
                  "karras); DDPM/DDIM use 'time' (the release's evenly spaced steps).")
flags.DEFINE_list("guidance_interval", None, "Also run each guided DPM-Solver++ row with "
                  "guidance limited to (SIGMA_LO, SIGMA_HI].")
flags.DEFINE_integer("reference_steps", 250, "Steps of the DDPM reference.")
flags.DEFINE_integer("seed", 0, "Seed of the initial noise (shared by all rows).")
flags.DEFINE_integer("seeds", 1, "Seeds per row (seed, seed + 1, ...).")
flags.mark_flags_as_required(["workdir"])


def main(_):
  dev = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  model, params, meta = checkpointing.load_ema_model(FLAGS.workdir, dev)
  objective = checkpointing.read_objective(meta)
  decoder = sampling.Decoder(meta.get("vae_path") or "identity",
                             latent_norm.from_record(meta, FLAGS.workdir))
  labels = jnp.repeat(jnp.arange(model.num_classes, dtype=jnp.int32), FLAGS.per_class)
  clf = proxy.classifier()
  print(f"{model.num_classes * FLAGS.per_class} samples per row; EMA step {meta['step']}; "
        f"proxy classifier held-out accuracy {clf.held_out_accuracy:.3f}; real digits vs "
        f"themselves: proxy FID {proxy.proxy_fid(proxy.real_digits()[0]):.2f}, class accuracy "
        f"{proxy.class_accuracy(*proxy.real_digits()):.3f}; backend {jax.default_backend()}",
        flush=True)
  interval = tuple(float(v) for v in FLAGS.guidance_interval or ())

  def run(sampler, steps, spacing, scale, seeds=None, limit=()):
    fn = guidance.make_sample_fn(objective, model, sampler=sampler, steps=steps,
                                 spacing=spacing, guidance_interval=limit or None,
                                 guided=scale != 1.0, release_cfg=False)
    args = (params, jax.random.PRNGKey(FLAGS.seed), labels, jnp.float32(scale))
    start = time.perf_counter()
    compiled = fn.lower(*args).compile()
    compile_s = time.perf_counter() - start
    fids, accs, secs = [], [], []
    for seed in seeds or range(FLAGS.seed, FLAGS.seed + FLAGS.seeds):
      start = time.perf_counter()
      latents = jax.block_until_ready(compiled(params, jax.random.PRNGKey(seed), *args[2:]))
      secs.append(time.perf_counter() - start)
      images = np.asarray(decoder(latents))
      fids.append(proxy.proxy_fid(images))
      accs.append(proxy.class_accuracy(images, np.asarray(labels)))
    t = create_sampler(sampler, steps, spacing).timesteps
    guided_steps = (0 if scale == 1.0 else len(t) if not limit else
                    int(np.asarray(guidance_active(t, limit)).sum()))
    row = dict(sampler=sampler, steps=steps, spacing=spacing, cfg=scale, seeds=len(fids),
               first_seed=(seeds or [FLAGS.seed])[0], interval=limit, nfe=len(t) + guided_steps,
               fid=np.mean(fids), fid_sd=np.std(fids, ddof=1) if len(fids) > 1 else 0.0,
               acc=np.mean(accs), acc_sd=np.std(accs, ddof=1) if len(accs) > 1 else 0.0,
               ms=1e3 * min(secs) / len(labels), compile_s=compile_s)
    print(_line(row), flush=True)
    return row

  print(_header(), flush=True)
  rows = []
  for scale in map(float, FLAGS.cfg_scales):
    rows.append(run("ddpm", FLAGS.reference_steps, "time", scale))
    if FLAGS.seeds == 1:
      rows.append(run("ddpm", FLAGS.reference_steps, "time", scale, seeds=[FLAGS.seed + 1]))
    for sampler, steps in itertools.product(FLAGS.samplers, map(int, FLAGS.steps)):
      spacings = FLAGS.spacings if sampler.startswith("dpm") else ["time"]
      for spacing in spacings:
        rows.append(run(sampler, steps, spacing, scale))
        if interval and scale != 1.0 and sampler.startswith("dpm"):
          rows.append(run(sampler, steps, spacing, scale, limit=interval))
  print("\nAll rows (FID and accuracy relative to the first 250-step DDPM row of the same cfg):")
  print(_header(relative=True))
  for scale in map(float, FLAGS.cfg_scales):
    same = [r for r in rows if r["cfg"] == scale]
    for r in same:
      print(_line(r, same[0]))


def _header(relative=False):
  extra = " FID / ref | acc - ref |" if relative else ""
  line = ("| sampler | steps | spacing | cfg | guidance interval | NFE | proxy FID | class acc "
          "| ms/image |")
  return line + extra + "\n" + "|---" * (9 + 2 * relative) + "|"


def _line(r, ref=None):
  interval = "({:g}, {:g}]".format(*r["interval"]) if r["interval"] else "all steps"
  name = r["sampler"] + (f" (seed {r['first_seed']})" if r["first_seed"] != FLAGS.seed else "")
  sd = lambda v, f: f" +- {v:{f}}" if r["seeds"] > 1 else ""
  line = (f"| {name} | {r['steps']} | {r['spacing']} | {r['cfg']:g} | {interval} | {r['nfe']} | "
          f"{r['fid']:.2f}{sd(r['fid_sd'], '.2f')} | {r['acc']:.3f}{sd(r['acc_sd'], '.3f')} | "
          f"{r['ms']:.2f} |")
  if ref is not None:
    line += f" {r['fid'] / ref['fid']:.2f} | {r['acc'] - ref['acc']:+.3f} |"
  return line


if __name__ == "__main__":
  app.run(main)

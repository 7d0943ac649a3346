"""REPA against no REPA on the digits demo: equal steps, the real train step, 3 sampling seeds.

  python -m dit_jax.encoders.digits_teacher --out=/tmp/digits_teacher
  python benchmarks/repa_digits.py --teacher=/tmp/digits_teacher --steps=2000 \
      --arms=none,repa,depth=2,coefficient=0.25,coefficient=1.0

Each arm trains configs/demo.py's model (a DiT-S/2 variant, 16 tokens of width 128, 4 blocks)
with the flow objective through dit_jax.step.build's compiled step (REPA's encoder, projector
and loss included) on the in-memory digits with their images, from the same initialisation,
data order and keys. 'none' is no REPA; 'repa' is config.repa's defaults with the digits
teacher (block round(8 * 4 / 28) = 1, coefficient 0.5); 'depth=K' and 'coefficient=C' change
one field of 'repa'. Every --eval_every steps the EMA weights sample 500 digits (euler, 50
NFE, cfg 1, one seed) for the proxy FID curve; at the end each arm samples with
--sample_seeds at cfg 1 and 3. Prints the curves, the step at which each arm first reaches the
'none' arm's final curve FID, and the final table.
"""

import ast
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from absl import app, flags  # noqa: E402

from configs import demo, mini  # noqa: E402
from dit_jax import (data_info, demo_data, guidance, objectives, repa, sampling,  # noqa: E402
                     step)
from dit_jax.evaluation import proxy  # noqa: E402
from dit_jax.grid import presets  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_string("teacher", "", "The digits teacher's directory (digits_teacher --out).")
flags.DEFINE_string("model", "demo", "demo (configs/demo.py), or mini:NAME for one of the "
                    "mini-grid's models (configs/mini.py; patch 2 only: the teacher's 16 tokens).")
flags.DEFINE_integer("steps", 2000, "Training steps per arm.")
flags.DEFINE_integer("eval_every", 500, "Steps between the proxy FID curve's points.")
flags.DEFINE_list("arms", ["none", "repa"], "none, repa, depth=K, coefficient=C (REPA with "
                  "that field changed).")
flags.DEFINE_list("sample_seeds", ["1", "2", "3"], "Sampling seeds of the final table.")
flags.DEFINE_integer("per_class", 50, "Samples per digit.")
flags.DEFINE_integer("seed", 0, "Initialisation and data order seed.")
flags.DEFINE_multi_string("set", [], "A config override for every arm, key=value (Python "
                          "literal value), repeatable.")


def arm_config(arm: str):
  if FLAGS.model == "demo":
    c = demo.get_config()
  else:
    c = mini.get_config(FLAGS.model.split(":", 1)[1])
  c.objective.name = "flow"
  c.model.learn_sigma = False
  c.data.with_images = True
  presets.apply_overrides(c, {k: ast.literal_eval(v) for k, v in
                              (item.split("=", 1) for item in FLAGS.set)})
  if arm != "none":
    c.repa.encoder = "digits_teacher"
    c.repa.encoder_path = FLAGS.teacher
    c.repa.projector_hidden = 512
    if "=" in arm:
      key, value = arm.split("=", 1)
      c.repa[key] = ast.literal_eval(value)
  return c


def main(_):
  images, labels = demo_data.digit_images()
  x = images[..., 0].astype(np.float32) / 15.0 / 8.0 - 1.0
  mean = np.stack([x, x[:, :, ::-1]], axis=1)[..., None]
  want = jnp.repeat(jnp.arange(10, dtype=jnp.int32), FLAGS.per_class)
  decode = sampling.Decoder("identity", 1.0)
  seeds = [int(s) for s in FLAGS.sample_seeds]
  curves, finals = {}, {}
  for arm in FLAGS.arms:
    c = arm_config(arm)
    info = data_info.synthetic_info(c)  # with REPA, the records' image extra too
    setup = step.build(c, info, jax.devices()[:1])
    if setup.align is not None:
      setup.load_frozen(repa.load_encoder(c, setup.align))
    objective = objectives.from_config(c)
    sample_model = setup.model.clone(projector_dim=0, projector_depth=0)
    curve_fn = guidance.make_sample_fn(objective, sample_model, sampler="euler", steps=51,
                                       guided=False, release_cfg=False)
    state = setup.init(jax.random.PRNGKey(FLAGS.seed))
    rng = np.random.default_rng(FLAGS.seed)
    bs = c.data.global_batch_size
    t0, curve, aligned = time.time(), [], []
    for i in range(1, FLAGS.steps + 1):
      idx = rng.integers(0, len(x), bs)
      batch = {"label": labels[idx].astype(np.int32), "mean": mean[idx],
               "std": np.zeros_like(mean[idx])}
      if setup.align is not None:
        batch["image"] = images[idx]
      state, m = setup.step(state, batch)
      if "repa" in m:
        aligned.append(m["repa"])
      if i % FLAGS.eval_every == 0:
        ema = {k: v for k, v in state.ema_params.items() if k != "projector"}
        imgs = np.asarray(decode(curve_fn(ema, jax.random.PRNGKey(0), want, jnp.float32(1.0))))
        curve.append((i, proxy.proxy_fid(imgs)))
        print(f"{arm}: step {i}, proxy FID {curve[-1][1]:.2f}"
              + (f", repa {float(np.mean(jax.device_get(aligned[-50:]))):.3f}" if aligned
                 else ""), flush=True)
    print(f"{arm}: {FLAGS.steps} steps in {time.time() - t0:.0f}s", flush=True)
    curves[arm] = curve
    ema = {k: v for k, v in state.ema_params.items() if k != "projector"}
    cells = []
    for scale in (1.0, 3.0):
      fn = guidance.make_sample_fn(objective, sample_model, sampler="euler", steps=51,
                                   guided=scale != 1.0, release_cfg=False)
      fids, accs = [], []
      for seed in seeds:
        imgs = np.asarray(decode(fn(ema, jax.random.PRNGKey(seed), want, jnp.float32(scale))))
        fids.append(proxy.proxy_fid(imgs))
        accs.append(proxy.class_accuracy(imgs, want))
      cells.append((np.mean(fids), max(fids) - min(fids), np.mean(accs)))
    finals[arm] = cells

  print(f"\n{FLAGS.model}, flow objective, {FLAGS.steps} steps, euler 50 NFE; proxy FID curve "
        "(seed 0, cfg 1)")
  print("step " + " ".join(f"{a:>16}" for a in curves))
  for j, (s, _) in enumerate(curves[FLAGS.arms[0]]):
    print(f"{s:>4} " + " ".join(f"{curves[a][j][1]:>16.2f}" for a in curves))
  if "none" in curves:
    target = curves["none"][-1][1]
    print(f"\nfirst curve step at or below the 'none' arm's final {target:.2f}:")
    for a, cv in curves.items():
      hit = next((s for s, f in cv if f <= target), None)
      print(f"  {a}: {hit if hit is not None else 'not reached'}")
  print(f"\nfinal, sampling seeds {seeds}: proxy FID mean [spread] / class accuracy")
  print(f"{'arm':>16} {'cfg 1':>22} {'cfg 3':>22}")
  for a, cells in finals.items():
    print(f"{a:>16} " + " ".join(f"{f:7.2f} [{s:.2f}] / {acc:.3f}".rjust(22)
                                 for f, s, acc in cells))


if __name__ == "__main__":
  app.run(main)

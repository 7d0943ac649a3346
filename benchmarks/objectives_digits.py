"""The objectives against each other on the digits demo: equal training steps, equal NFE.

  python benchmarks/objectives_digits.py --steps=1500 --objectives=adm,flow,edm

Trains the demo's model (configs/demo.py: a DiT-S/2 variant on scikit-learn's 8x8 digits) once
per objective from the same initialisation, data order and keys, with dit_jax.step's pieces
(create_model, create_optimizer, init_state) and dit_jax.objectives for the loss; the loop here
is a plain jitted step on in-memory digits (no TensorFlow pipeline, no checkpoints), the same
AdamW and EMA as dit_jax.step.train_step. Then samples `--per_class` EMA images of each digit
with samplers of equal model calls (NFE) and prints the proxy FID and the class accuracy
(dit_jax.evaluation.proxy) at guidance scales 1 and 3 (all channels guided, as the demo).
"""

import ast
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from absl import app, flags  # noqa: E402
from sklearn.datasets import load_digits  # noqa: E402

from configs import demo  # noqa: E402
from dit_jax import data_info, guidance, objectives, sampling, step  # noqa: E402
from dit_jax.evaluation import proxy  # noqa: E402
from dit_jax.grid import presets  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_integer("steps", 1500, "Training steps per objective.")
flags.DEFINE_integer("per_class", 50, "Samples per digit for the metrics.")
flags.DEFINE_integer("seed", 0, "Initialisation and data order seed (and the sampling seed, "
                     "seed + 1, unless --sample_seeds).")
flags.DEFINE_list("sample_seeds", [], "Sampling seeds: each cell is then the mean over them, "
                  "with the spread (max - min) of the proxy FID.")
flags.DEFINE_list("cfg_scales", ["1", "3"], "Guidance scales.")
flags.DEFINE_multi_string("set", [], "A config override for every objective's run, key=value "
                          "with a Python literal value (e.g. objective.mf_kappa=0.0, "
                          "model.norm=\"'rmsnorm'\"), repeatable.")
flags.DEFINE_list("rows", [], "Only these rows, as sampler:steps (e.g. euler:51,euler:11); "
                  "default: every row of the trained objectives.")
flags.DEFINE_list("objectives", ["adm", "flow", "edm"], "Registered objectives to train "
                  "(meanflow too: its guidance is trained in, sampled at scale 1 only).")

# (NFE, objective, sampler, steps): rows of about equal model calls per sample. EDM's Heun
# makes 2 steps - 1 calls; flow's heun2 2 (points - 1).
SAMPLERS = [
    (100, "adm", "ddpm", 100), (100, "flow", "sde-euler", 100), (100, "flow", "euler", 101),
    (99, "edm", "heun", 50),
    (35, "adm", "dpm++2m", 35), (34, "flow", "heun2", 18), (35, "edm", "heun", 18),
    (20, "adm", "dpm++2m", 20), (20, "flow", "heun2", 11), (20, "flow", "euler", 21),
    (19, "edm", "heun", 10),
    (50, "flow", "euler", 51), (10, "flow", "euler", 11), (2, "flow", "euler", 3),
    (1, "flow", "euler", 2), (2, "meanflow", "meanflow", 2), (1, "meanflow", "meanflow", 1),
    # The release's sampler: DDPM with 250 steps (500 model calls with CFG).
    (250, "adm", "ddpm", 250),
]


def train(config, objective, info, pixels, labels):
  model = step.objective_model(step.create_model(config, info), objective,
                               config.model.attention_impl)
  tx, schedule = step.create_optimizer(config)
  state = nn.meta.unbox(step.init_state(jax.random.PRNGKey(FLAGS.seed), model, tx,
                                        info.latent_shape))
  decay = config.ema_decay

  @jax.jit
  def train_step(state, x0, y):
    key = jax.random.fold_in(state.rng, state.step)
    k_obj, k_drop = jax.random.split(key)

    # The step's label dropout as a mask, for objectives that read it (MeanFlow); the model's
    # own dropout (from k_drop) otherwise.
    drop = jax.random.uniform(jax.random.fold_in(k_drop, 1), y.shape) < model.class_dropout_prob

    def loss_fn(params):
      def model_fn(x, t, yy=None, **kw):
        if yy is None and "force_drop_ids" not in kw:
          return model.apply({"params": params}, x, t, y, train=True,
                             rngs={"dropout": k_drop}, **kw)
        return model.apply({"params": params}, x, t, y if yy is None else yy, train=True, **kw)
      inputs = {**objective.draw(*jax.random.split(k_obj), x0), "label": y, "drop": drop}
      loss, logged = objective.training_losses(
          lambda x, t, y=None, **kw: model_fn(x, t, y, **kw), x0, inputs)
      return loss.mean(), logged

    (loss, _), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    ema = optax.incremental_update(params, state.ema_params, step_size=1.0 - decay)
    return state.replace(step=state.step + 1, params=params, ema_params=ema,
                         opt_state=opt_state), loss

  rng = np.random.default_rng(FLAGS.seed)
  bs = config.data.global_batch_size
  t0, losses = time.time(), []
  for _ in range(FLAGS.steps):
    idx = rng.integers(0, len(pixels), bs)
    state, loss = train_step(state, pixels[idx], labels[idx])
    losses.append(loss)
  losses = np.asarray(jax.device_get(losses))
  print(f"{objective.name}: {FLAGS.steps} steps in {time.time() - t0:.0f}s, loss "
        f"{losses[:50].mean():.4f} (first 50) -> {losses[-50:].mean():.4f} (last 50)",
        flush=True)
  del schedule
  return model, state.ema_params


def main(_):
  config = demo.get_config()
  info = data_info.synthetic_info(config)
  digits = load_digits()  # what dit_jax.demo_data writes: x in 0..16 trained as x / 8 - 1
  pixels = jnp.asarray(digits.images[..., None] / 8.0 - 1.0, jnp.float32)
  labels = jnp.asarray(digits.target, jnp.int32)
  objs, configs = {}, {}
  for name in FLAGS.objectives:
    c = demo.get_config()
    c.objective.name = name
    presets.apply_overrides(c, {k: ast.literal_eval(v) for k, v in
                                (item.split("=", 1) for item in FLAGS.set)})
    objs[name], configs[name] = objectives.from_config(c), c
  # Each objective's run with its config (--set reaches the model too, e.g. model.norm).
  trained = {name: train(configs[name], obj, info, pixels, labels) for name, obj in objs.items()}

  want = jnp.repeat(jnp.arange(10, dtype=jnp.int32), FLAGS.per_class)
  decode = sampling.Decoder("identity", 1.0)  # as the demo's grids: pixels are the latents
  seeds = [int(s) for s in FLAGS.sample_seeds] or [FLAGS.seed + 1]
  print(f"\n{len(want)} samples, sampling seeds {seeds}, {FLAGS.steps} training steps; proxy "
        "FID (lower is better) / class accuracy" +
        (", means over the seeds, FID spread (max - min) in brackets" if len(seeds) > 1 else ""))
  print(f"{'NFE':>4} {'objective':>9} {'sampler':>10} {'steps':>5} " +
        " ".join(f"{'cfg ' + s:>22}" for s in FLAGS.cfg_scales))
  for nfe, name, sampler, steps in SAMPLERS:
    if name not in trained or (FLAGS.rows and f"{sampler}:{steps}" not in FLAGS.rows):
      continue
    model, params = trained[name]
    cells = []
    for scale in map(float, FLAGS.cfg_scales):
      if scale != 1.0 and objs[name].trained_guidance:
        cells.append("(trained in)")
        continue
      fn = guidance.make_sample_fn(objs[name], model, sampler=sampler, steps=steps,
                                   guided=scale != 1.0, release_cfg=False)
      fids, accs = [], []
      for seed in seeds:
        imgs = np.asarray(decode(fn(params, jax.random.PRNGKey(seed), want, jnp.float32(scale))))
        fids.append(proxy.proxy_fid(imgs))
        accs.append(proxy.class_accuracy(imgs, want))
      spread = f" [{max(fids) - min(fids):.2f}]" if len(seeds) > 1 else ""
      cells.append(f"{np.mean(fids):7.2f}{spread} / {np.mean(accs):.3f}")
    print(f"{nfe:>4} {name:>9} {sampler:>10} {steps:>5} " + " ".join(f"{c:>22}" for c in cells),
          flush=True)


if __name__ == "__main__":
  app.run(main)

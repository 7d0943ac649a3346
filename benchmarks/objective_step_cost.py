"""The train step of one objective against another's on the same model, side by side.

  python benchmarks/objective_step_cost.py --config=configs/demo.py --objectives=flow,meanflow
  python benchmarks/objective_step_cost.py --config=configs/demo.py --objectives=flow \
      --parts=dit,rmsnorm,swiglu,rope,qk_norm,no_shift,lightningdit

Builds each objective's step with the same `step.build` as the main job (MeanFlow: the
second time input and its JVP), then times them in alternating rounds on a synthetic batch so
that the shared machine's load falls on both alike; prints steps/s per round and the ratio of
each objective's step time to the first's (the median over rounds). With --parts: the first
objective's step on the model with each of LightningDiT's parts switched on alone (`dit` is
the release's model), against the first part's.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402
from absl import app, flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from dit_jax import data_info, step  # noqa: E402

import accelerator_speed  # noqa: E402  (beside this file)

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Experiment config.", lock_config=False)
flags.DEFINE_list("objectives", ["flow", "meanflow"], "Registered objectives; the first is the "
                  "reference of the ratios.")
flags.DEFINE_integer("steps", 20, "Timed steps per objective and round.")
flags.DEFINE_integer("rounds", 3, "Alternating rounds.")
flags.DEFINE_list("parts", [], "Model variants to compare instead (PARTS names); the first "
                  "is the reference.")
flags.mark_flags_as_required(["config"])

# LightningDiT's parts, alone and together, as config.model fields.
PARTS = {"dit": {}, "rmsnorm": {"norm": "rmsnorm"}, "swiglu": {"mlp": "swiglu"},
         "rope": {"rope": True}, "qk_norm": {"qk_norm": True}, "no_shift": {"adaln_shift": False},
         "lightningdit": {"norm": "rmsnorm", "mlp": "swiglu", "rope": True}}


def main(_):
  setups = {}
  if FLAGS.parts:
    for part in FLAGS.parts:
      config = FLAGS.config.copy_and_resolve_references()
      config.objective.name = FLAGS.objectives[0]
      for k, v in PARTS[part].items():
        config.model[k] = v
      info = data_info.synthetic_info(config)
      setups[part] = (step.build(config, info), info, config.data.global_batch_size)
    FLAGS.objectives = list(FLAGS.parts)
  for name in [] if FLAGS.parts else FLAGS.objectives:
    config = FLAGS.config.copy_and_resolve_references()
    config.objective.name = name
    if name == "meanflow":
      config.model.learn_sigma = False  # its recipe: the velocity alone
    info = data_info.synthetic_info(config)
    setups[name] = (step.build(config, info), info, config.data.global_batch_size)
  rates = {name: [] for name in setups}
  for r in range(FLAGS.rounds):
    for name, (setup, info, gbs) in setups.items():
      sps, _, _ = accelerator_speed.time_train_step(setup, info, gbs, FLAGS.steps, 0.0)
      rates[name].append(sps)
      print(f"round {r}: {name:>9} {sps:8.2f} steps/s", flush=True)
  first = FLAGS.objectives[0]
  for name in setups:
    ratio = np.median(np.asarray(rates[first]) / np.asarray(rates[name]))
    print(f"{name:>9}: step time {ratio:.2f}x {first}'s (median of {FLAGS.rounds} rounds)")


if __name__ == "__main__":
  app.run(main)

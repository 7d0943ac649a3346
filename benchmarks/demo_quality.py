"""How recognizable are the demo's digits? Classify EMA samples with a classifier of real digits.

  python -m dit_jax.main --config=configs/demo.py --workdir=/tmp/dit_demo
  python benchmarks/demo_quality.py --workdir=/tmp/dit_demo

Samples `--per_class` images of each digit from the newest checkpoint's EMA weights at several
guidance scales, and prints the accuracy with which an SVM trained on scikit-learn's real 8x8
digits (held-out accuracy printed too) recovers the requested class.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from absl import app, flags  # noqa: E402
from sklearn.datasets import load_digits  # noqa: E402
from sklearn.model_selection import train_test_split  # noqa: E402
from sklearn.svm import SVC  # noqa: E402

from dit_jax import checkpointing, guidance  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", None, "Demo workdir.")
flags.DEFINE_integer("per_class", 20, "Samples per digit.")
flags.DEFINE_list("cfg_scales", ["1", "3"], "Guidance scales to evaluate.")
flags.DEFINE_string("respacing", "100", "Sampling steps.")
flags.mark_flags_as_required(["workdir"])


def main(_):
  digits = load_digits()
  xtr, xte, ytr, yte = train_test_split(digits.data, digits.target, test_size=0.25, random_state=0)
  clf = SVC(gamma=0.001).fit(xtr, ytr)
  print(f"classifier accuracy on held-out real digits: {clf.score(xte, yte):.3f}")

  dev = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  model, params, meta = checkpointing.load_ema_model(FLAGS.workdir, dev)
  labels = jnp.repeat(jnp.arange(10, dtype=jnp.int32), FLAGS.per_class)
  for scale in map(float, FLAGS.cfg_scales):
    fn = guidance.make_sample_fn(checkpointing.read_objective(meta), model,
                                 respacing=FLAGS.respacing, guided=scale != 1.0,
                                 release_cfg=False)
    lat = fn(params, jax.random.PRNGKey(0), labels, jnp.float32(scale))
    pixels = (np.clip(np.asarray(lat)[..., 0], -1, 1) + 1) * 8  # back to the 0..16 digit scale
    acc = (clf.predict(pixels.reshape(len(labels), -1)) == np.asarray(labels)).mean()
    print(f"step {meta['step']}  cfg {scale:g}: {acc:.3f} of {len(labels)} samples classified "
          "as the requested digit")


if __name__ == "__main__":
  app.run(main)

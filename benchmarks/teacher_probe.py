"""How much the digits teacher's features say: their shared direction and a linear probe.

  python benchmarks/teacher_probe.py --teacher=/tmp/teacher

Prints the mean cosine of the teacher's patch tokens with their mean direction (512 digits), and
the test accuracy of a least-squares linear probe of the digit from the mean-pooled features,
beside the same probe on the raw pixels (400 training digits, 112 test).
"""

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from dit_jax import demo_data  # noqa: E402
from dit_jax.encoders import digits_teacher  # noqa: E402


def probe(features: np.ndarray, labels: np.ndarray) -> float:
  x = np.c_[features, np.ones(len(features))]
  w = np.linalg.lstsq(x[:400], np.eye(10)[labels[:400]], rcond=None)[0]
  return float((np.argmax(x[400:] @ w, 1) == labels[400:]).mean())


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--teacher", required=True)
  args = ap.parse_args()
  model, params = digits_teacher.load(args.teacher)
  images, labels = demo_data.digit_images()
  images, labels = images[:512], labels[:512]
  f = np.asarray(model.apply({"params": params}, digits_teacher.preprocess(jnp.asarray(images))))
  u = f / np.linalg.norm(f, axis=-1, keepdims=True)
  mean = u.reshape(-1, u.shape[-1]).mean(0)
  print(f"mean cos(token, mean token direction): {float((u @ (mean / np.linalg.norm(mean))).mean()):.2f}")
  print(f"linear probe, teacher (mean-pooled): {probe(f.mean(1), labels):.2f}")
  print(f"linear probe, raw pixels: {probe(images.reshape(512, -1) / 240.0, labels):.2f}")


if __name__ == "__main__":
  main()

"""A proxy FID for the built-in digits: Frechet distance in the features of a small classifier.

Inception-v3 features mean little on 8x8 grayscale digits, so small-data work (MNIST-FID and
the like) measures samples in the penultimate features of a classifier trained on the same
data. This module does that for scikit-learn's 8x8 digits (the demo's and the mini-grid's
data). It is a PROXY: its values are comparable with each other (same classifier, same number
of samples), not with any published FID.

  feats = proxy_features(images)        # uint8 [N, H, W, 1 or 3] -> float64 [N, 64]
  fid = proxy_fid(images)               # vs all 1,797 real digits
  acc = class_accuracy(images, labels)  # share classified as the requested digit

The classifier: scikit-learn's MLPClassifier, 64 pixels -> 128 -> 64 ReLU units -> 10 classes,
Adam (batch 64, lr 3e-3, 100 epochs) with a fixed seed, trained on a fixed 75% split of the
digits (about a second on a CPU, cached in the process); `classifier().held_out_accuracy` is its
accuracy on the other 25% (0.98). Features are the
64 ReLU activations of the last hidden layer. Images of any size are averaged to grayscale and
area-resized to 8x8; pixel values are read as uint8 / 255, the way the pipeline writes samples
(digits x in 0..16 are trained as x / 8 - 1 and saved as clip(127.5 y + 128)).
"""

from __future__ import annotations

import dataclasses
import functools
import warnings

import numpy as np

from dit_jax.evaluation import metrics

SIZE = 8  # the classifier's input: 8x8 grayscale
SEED = 0


def digits_to_uint8(pixels: np.ndarray) -> np.ndarray:
  """Digits in 0..16 -> uint8 as the pipeline saves them: clip(127.5 (x / 8 - 1) + 128)."""
  x = np.asarray(pixels, np.float32) / 8.0 - 1.0
  return np.clip(127.5 * x + 128.0, 0, 255).astype(np.uint8)


@functools.lru_cache(maxsize=1)
def real_digits() -> tuple[np.ndarray, np.ndarray]:
  """All 1,797 real digits as uint8 [N, 8, 8, 1] and their labels [N]."""
  from sklearn.datasets import load_digits  # pylint: disable=import-outside-toplevel
  d = load_digits()
  return digits_to_uint8(d.images)[..., None], d.target.astype(np.int32)


def to_input(images: np.ndarray) -> np.ndarray:
  """uint8 [N, H, W, C] (C = 1 or 3, any H, W) -> the classifier's input float64 [N, 64]."""
  images = np.asarray(images)
  if images.ndim == 3:
    images = images[..., None]
  if images.ndim != 4 or images.shape[-1] not in (1, 3):
    raise ValueError(f"proxy: images must be [N, H, W, 1 or 3], got shape {images.shape}")
  if images.dtype != np.uint8:
    raise ValueError(f"proxy: images must be uint8 (as in ADM sample batches), got {images.dtype}")
  x = images.astype(np.float64).mean(axis=-1) / 255.0  # [N, H, W]
  n, h, w = x.shape
  if (h, w) != (SIZE, SIZE):
    if h % SIZE == 0 and w % SIZE == 0:  # area average over whole blocks
      x = x.reshape(n, SIZE, h // SIZE, SIZE, w // SIZE).mean(axis=(2, 4))
    else:
      from PIL import Image  # pylint: disable=import-outside-toplevel
      x = np.stack([np.asarray(Image.fromarray(im.astype(np.float32), mode="F").resize(
          (SIZE, SIZE), Image.Resampling.BOX)) for im in x]).astype(np.float64)
  return x.reshape(n, SIZE * SIZE)


@dataclasses.dataclass(frozen=True)
class Classifier:
  mlp: object               # the fitted sklearn.neural_network.MLPClassifier
  held_out_accuracy: float  # on the 25% of the digits it was not trained on
  train_size: int

  def features(self, x: np.ndarray) -> np.ndarray:
    """Last hidden layer's ReLU activations [N, 64] of classifier inputs x [N, 64]."""
    h = x
    for w, b in zip(self.mlp.coefs_[:-1], self.mlp.intercepts_[:-1]):
      h = np.maximum(h @ w + b, 0.0)
    return h

  def predict(self, x: np.ndarray) -> np.ndarray:
    return self.mlp.predict(x)


@functools.lru_cache(maxsize=1)
def classifier() -> Classifier:
  """The proxy's classifier, trained deterministically on first use (a few seconds), then cached."""
  # pylint: disable=import-outside-toplevel
  from sklearn.exceptions import ConvergenceWarning
  from sklearn.model_selection import train_test_split
  from sklearn.neural_network import MLPClassifier
  images, labels = real_digits()
  x = to_input(images)
  xtr, xte, ytr, yte = train_test_split(x, labels, test_size=0.25, random_state=SEED,
                                        stratify=labels)
  mlp = MLPClassifier(hidden_layer_sizes=(128, 64), alpha=1e-3, batch_size=64,
                      learning_rate_init=3e-3, max_iter=100, random_state=SEED)
  with warnings.catch_warnings():
    warnings.simplefilter("ignore", ConvergenceWarning)
    mlp.fit(xtr, ytr)
  return Classifier(mlp=mlp, held_out_accuracy=float(mlp.score(xte, yte)), train_size=len(xtr))


def proxy_features(images: np.ndarray) -> np.ndarray:
  """Classifier features float64 [N, 64] of uint8 images [N, H, W, 1 or 3] of digits."""
  return classifier().features(to_input(images))


@functools.lru_cache(maxsize=1)
def _real_statistics() -> tuple[np.ndarray, np.ndarray]:
  return metrics.feature_statistics(proxy_features(real_digits()[0]))


def statistics(images_or_stats) -> tuple[np.ndarray, np.ndarray]:
  """(mu, sigma) of uint8 images, or a (mu, sigma) pair passed through; None: the real digits."""
  if images_or_stats is None:
    return _real_statistics()
  if isinstance(images_or_stats, tuple) and len(images_or_stats) == 2:
    return images_or_stats
  return metrics.feature_statistics(proxy_features(images_or_stats))


def proxy_fid(images: np.ndarray, reference=None) -> float:
  """Frechet distance between the proxy features of `images` and of `reference`.

  Args:
    images: uint8 [N, H, W, 1 or 3] digits, N >= 2.
    reference: None (all 1,797 real digits), uint8 images, or a (mu, sigma) pair from
      `statistics`. Like FID, the value depends on N (fewer samples: larger); compare
      figures computed with the same N.
  """
  mu, sigma = statistics(images)
  mu_r, sigma_r = statistics(reference)
  # eigh: the same trace as sqrtm, and well defined for rank-deficient covariances (small N).
  return metrics.frechet_distance(mu, sigma, mu_r, sigma_r, method="eigh")


def class_accuracy(images: np.ndarray, labels: np.ndarray) -> float:
  """Share of images [N, H, W, C] that the classifier assigns to the requested labels [N]."""
  labels = np.asarray(labels).reshape(-1)
  if len(labels) != len(images):
    raise ValueError(f"proxy: {len(images)} images but {len(labels)} labels")
  return float(np.mean(classifier().predict(to_input(images)) == labels))


def proxy_metrics(images: np.ndarray, labels: np.ndarray | None = None,
                  reference=None) -> dict[str, float]:
  """{'proxy_fid', 'precision', 'recall', 'num_samples'} (+ 'class_accuracy' with labels).

  Precision/recall (k = 3) are computed in the same features against the reference images
  (the real digits by default; not computed when `reference` is a (mu, sigma) pair).
  """
  feats = proxy_features(images)
  mu, sigma = metrics.feature_statistics(feats)
  mu_r, sigma_r = statistics(reference)
  out = {"num_samples": int(len(images)),
         "proxy_fid": metrics.frechet_distance(mu, sigma, mu_r, sigma_r, method="eigh")}
  if not isinstance(reference, tuple):  # moments alone cannot give precision/recall
    ref_images = real_digits()[0] if reference is None else reference
    # float32 distances: no published numbers to match here (ADM's float16 is for Inception).
    out["precision"], out["recall"] = metrics.precision_recall(
        proxy_features(ref_images), feats, distance_dtype="float32")
  if labels is not None:
    out["class_accuracy"] = class_accuracy(images, labels)
  return out

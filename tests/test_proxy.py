"""The digits proxy FID: deterministic classifier, resolution/channel handling, sanity of values."""

import numpy as np
import pytest

from dit_jax.evaluation import proxy


def test_classifier_is_accurate_and_deterministic():
  clf = proxy.classifier()
  assert clf.held_out_accuracy > 0.95
  images, labels = proxy.real_digits()
  assert images.shape == (1797, 8, 8, 1) and images.dtype == np.uint8
  first = proxy.proxy_features(images[:50])
  proxy.classifier.cache_clear()
  try:
    np.testing.assert_allclose(proxy.proxy_features(images[:50]), first, rtol=1e-6, atol=1e-9)
  finally:
    proxy.classifier.cache_clear()
  assert proxy.class_accuracy(images, labels) > 0.97
  assert first.shape == (50, 64)


def test_any_resolution_and_rgb():
  images, _ = proxy.real_digits()
  small = images[:100]
  up = np.repeat(small.repeat(4, axis=1).repeat(4, axis=2), 3, axis=-1)  # 32x32 RGB
  np.testing.assert_allclose(proxy.proxy_features(up), proxy.proxy_features(small), atol=1e-9)
  odd = proxy.proxy_features(small.repeat(3, axis=1).repeat(3, axis=2)[:, 1:-1, 1:-1])  # 22x22
  assert odd.shape == (100, 64) and np.isfinite(odd).all()
  with pytest.raises(ValueError, match="uint8"):
    proxy.proxy_features(small.astype(np.float32))


def test_proxy_fid_orders_real_faded_noise():
  images, labels = proxy.real_digits()
  rng = np.random.default_rng(0)
  idx = rng.permutation(len(images))[:600]
  real = proxy.proxy_fid(images[idx])
  faded = proxy.proxy_fid((images[idx] // 2 + 64).astype(np.uint8))
  noise = proxy.proxy_fid(rng.integers(0, 256, (600, 8, 8, 1), dtype=np.uint8))
  assert 0 <= real < 1.0 < 10 * real < faded < noise
  assert proxy.proxy_fid(images[idx], reference=images[idx]) == pytest.approx(0, abs=1e-4)
  stats = proxy.statistics(images[idx])
  assert proxy.proxy_fid(images[:300], reference=stats) == pytest.approx(
      proxy.proxy_fid(images[:300], reference=images[idx]))
  m = proxy.proxy_metrics(images[idx], labels[idx])
  assert m["proxy_fid"] == pytest.approx(real) and m["num_samples"] == 600
  assert m["precision"] > 0.9 and m["recall"] > 0.8 and m["class_accuracy"] > 0.97
  shuffled = proxy.class_accuracy(images[idx], np.roll(labels[idx], 1))
  assert shuffled < 0.3

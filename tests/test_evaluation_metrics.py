"""FID, IS and precision/recall against closed forms and direct numpy/scipy computations."""
from unittest import mock

import numpy as np
import pytest
from scipy import linalg, special

from dit_jax import image_io
from dit_jax.evaluation import features, metrics, reference


def _rotation(d: int, seed: int) -> np.ndarray:
  q, _ = np.linalg.qr(np.random.default_rng(seed).normal(size=(d, d)))
  return q


@pytest.mark.parametrize("method", ["sqrtm", "eigh"])
def test_frechet_distance_closed_form_for_commuting_covariances(method):
  # Shared eigenvectors: FID = |mu1 - mu2|^2 + sum (sqrt(a) - sqrt(b))^2, exactly; zero
  # eigenvalues make both covariances singular.
  d = 24
  rng = np.random.default_rng(0)
  q = _rotation(d, 1)
  a, b = rng.uniform(0.1, 3.0, d), rng.uniform(0.1, 3.0, d)
  a[:5], b[3:8] = 0.0, 0.0
  mu1, mu2 = rng.normal(size=d), rng.normal(size=d)
  expected = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)
  got = metrics.frechet_distance(mu1, (q * a) @ q.T, mu2, (q * b) @ q.T, method=method)
  np.testing.assert_allclose(got, expected, rtol=1e-6, atol=1e-6)


def test_frechet_distance_matches_scipy_on_sample_covariances():
  rng = np.random.default_rng(1)
  x, y = rng.normal(size=(300, 32)), rng.normal(size=(300, 32)) * 1.5 + 0.3
  mu1, s1, mu2, s2 = x.mean(0), np.cov(x, rowvar=False), y.mean(0), np.cov(y, rowvar=False)
  expected = np.sum((mu1 - mu2) ** 2) + np.trace(s1 + s2) - 2 * np.trace(linalg.sqrtm(s1 @ s2).real)
  assert metrics.feature_statistics(x)[1] == pytest.approx(s1)
  for method in ("sqrtm", "eigh"):
    np.testing.assert_allclose(metrics.frechet_distance(mu1, s1, mu2, s2, method=method), expected,
                               rtol=1e-8)


def test_frechet_distance_near_singular_and_self():
  # Fewer samples than dimensions: rank-deficient covariances, as with FID on small sets.
  rng = np.random.default_rng(2)
  x, y = rng.normal(size=(20, 64)), rng.normal(size=(20, 64)) + 0.5
  (mu1, s1), (mu2, s2) = metrics.feature_statistics(x), metrics.feature_statistics(y)
  eigh = metrics.frechet_distance(mu1, s1, mu2, s2, method="eigh")
  sqrtm = metrics.frechet_distance(mu1, s1, mu2, s2, method="sqrtm")
  assert eigh > 1.0
  np.testing.assert_allclose(sqrtm, eigh, rtol=1e-4)
  for method in ("sqrtm", "eigh"):
    assert abs(metrics.frechet_distance(mu1, s1, mu1, s1, method=method)) < 1e-6 * np.trace(s1)


def test_frechet_distance_falls_back_to_offset_when_sqrtm_fails():
  rng = np.random.default_rng(3)
  d, eps = 8, 1e-6
  s1, s2 = np.diag(rng.uniform(0.5, 2, d)), np.diag(rng.uniform(0.5, 2, d))
  calls, sqrtm = [], linalg.sqrtm

  def failing_once(m):
    calls.append(m)
    return np.full_like(m, np.inf) if len(calls) == 1 else sqrtm(m)

  with pytest.warns(UserWarning, match="singular"), \
       mock.patch.object(metrics.linalg, "sqrtm", failing_once):
    got = metrics.frechet_distance(np.zeros(d), s1, np.zeros(d), s2, eps=eps)
  np.testing.assert_allclose(calls[1], (s1 + eps * np.eye(d)) @ (s2 + eps * np.eye(d)))
  expected = np.trace(s1 + s2) - 2 * np.sum(np.sqrt((np.diag(s1) + eps) * (np.diag(s2) + eps)))
  np.testing.assert_allclose(got, expected, rtol=1e-10)
  with mock.patch.object(metrics.linalg, "sqrtm", lambda m: m + 1j * np.eye(len(m))), \
       pytest.raises(ValueError, match="imaginary"):
    metrics.frechet_distance(np.zeros(d), s1, np.zeros(d), s2)
  with pytest.raises(ValueError, match="mismatched"):
    metrics.frechet_distance(np.zeros(d), s1, np.zeros(d + 1), np.eye(d + 1))


def test_inception_score():
  assert metrics.inception_score(np.zeros((100, 1008))) == pytest.approx(1.0)
  # Confident, balanced predictions over 10 classes: IS = 10.
  confident = 50.0 * np.eye(10)[np.arange(200) % 10]
  assert metrics.inception_score(confident) == pytest.approx(10.0, rel=1e-6)
  # Against a direct computation, with ADM's chunking (120 = 50 + 50 + 20).
  logits = np.random.default_rng(4).normal(size=(120, 30)) * 3
  scores = []
  for part in np.split(logits, [50, 100]):
    p = special.softmax(part, axis=1)
    py = p.mean(axis=0)
    scores.append(np.exp(np.mean([special.rel_entr(row, py).sum() for row in p])))
  assert metrics.inception_score(logits, split_size=50) == pytest.approx(np.mean(scores), rel=1e-10)


def test_manifold_radii_match_brute_force():
  x = np.random.default_rng(5).normal(size=(37, 6)).astype(np.float32)
  d = ((x[:, None] - x[None]) ** 2).sum(-1)
  expected = np.sort(d, axis=1)[:, 3]  # column 0 is the point itself
  np.testing.assert_allclose(metrics.manifold_radii(x, k=3, row_block=16, distance_dtype="float32"),
                             expected, rtol=1e-4, atol=1e-4)
  # ADM's float16 distances (the default): within float16 rounding of the norms (~1e-3).
  np.testing.assert_allclose(metrics.manifold_radii(x, k=3, row_block=16), expected, rtol=1e-2,
                             atol=2e-2)


def test_precision_recall_on_known_clouds():
  rng = np.random.default_rng(6)
  ref = rng.normal(size=(200, 16)).astype(np.float32)
  assert metrics.precision_recall(ref, ref.copy(), row_block=64) == (1.0, 1.0)
  assert metrics.precision_recall(ref, ref + 100.0, row_block=64) == (0.0, 0.0)
  # Reference = two far-apart clusters, samples = fresh draws from one: precision 1, recall 1/2.
  two = np.concatenate([rng.normal(size=(150, 2)), rng.normal(size=(150, 2)) + 50])
  two = two.astype(np.float32)
  one = rng.normal(size=(150, 2)).astype(np.float32)
  precision, recall = metrics.precision_recall(two, one, row_block=64)
  assert precision > 0.95
  assert 0.45 < recall <= 0.5


def test_npz_streaming_and_validation(tmp_path):
  images = np.random.default_rng(7).integers(0, 256, (11, 5, 4, 3), dtype=np.uint8)
  for save in (np.savez, np.savez_compressed):
    path = str(tmp_path / f"{save.__name__}.npz")
    save(path, arr_0=images, arr_1=np.arange(11))
    batches = list(image_io.iter_npz_array(path, batch_size=4))
    assert [len(b) for b in batches] == [4, 4, 3]
    np.testing.assert_array_equal(np.concatenate(batches), images)
    assert image_io.check_images(path) == 11
  with pytest.raises(KeyError, match="arr_9"):
    next(image_io.iter_npz_array(path, "arr_9"))
  np.savez(tmp_path / "float.npz", arr_0=images.astype(np.float32))
  with pytest.raises(ValueError, match="uint8"):
    image_io.check_images(str(tmp_path / "float.npz"))
  np.savez(tmp_path / "empty.npz", labels=np.arange(3))
  with pytest.raises(ValueError, match="arr_0"):
    reference.compute_reference(str(tmp_path / "empty.npz"), variables=None)


def test_reference_stats_round_trip_and_moments_only_npz(tmp_path):
  rng = np.random.default_rng(8)
  feats = {"pool": rng.normal(size=(10, 4)), "spatial": rng.normal(size=(10, 3))}
  stats = reference.ReferenceStats.from_features(feats, source="x")
  path = str(tmp_path / "stats.npz")
  stats.save(path)
  loaded = reference.ReferenceStats.load(path)
  np.testing.assert_array_equal(loaded.sigma_s, stats.sigma_s)
  np.testing.assert_array_equal(loaded.pool, stats.pool)
  assert loaded.source == "x"
  # An ADM-style .npz with only precomputed moments needs no Inception pass.
  np.savez(tmp_path / "moments.npz", mu=stats.mu, sigma=stats.sigma, mu_s=stats.mu_s,
           sigma_s=stats.sigma_s)
  ref = reference.compute_reference(str(tmp_path / "moments.npz"), variables=None)
  np.testing.assert_array_equal(ref.sigma, stats.sigma)
  assert ref.pool is None


def test_rebatch_pads_last_batch_and_replicates_grayscale():
  rebatch = features._rebatch  # pylint: disable=protected-access
  gray = np.arange(5 * 2 * 2, dtype=np.uint8).reshape(5, 2, 2, 1)
  batches = list(rebatch([gray[:3], gray[3:]], 4))
  assert [(b.shape, valid) for b, valid in batches] == [((4, 2, 2, 3), 4), ((4, 2, 2, 3), 1)]
  np.testing.assert_array_equal(batches[1][0][0], np.repeat(gray[4], 3, axis=-1))
  assert not batches[1][0][1:].any()
  with pytest.raises(ValueError, match="NHWC"):
    list(rebatch([np.zeros((2, 4, 4, 2), np.uint8)], 4))


def _adm_float16_distances(u: np.ndarray, v: np.ndarray) -> np.ndarray:
  """ADM's DistanceBlock emulated with numpy's float16: both batches cast to float16 and
  |u|^2 - 2 u.v + |v|^2 evaluated op by op in float16 (sums and the matmul accumulated in
  float32), clamped at 0; the whole block in float32 if any float16 distance is not finite."""
  with np.errstate(over="ignore", invalid="ignore"):
    u16, v16 = u.astype(np.float16), v.astype(np.float16)
    norm_u = np.square(u16).sum(axis=1, dtype=np.float32).astype(np.float16)
    norm_v = np.square(v16).sum(axis=1, dtype=np.float32).astype(np.float16)
    uv = (u16.astype(np.float32) @ v16.astype(np.float32).T).astype(np.float16)
    d = np.maximum(norm_u[:, None] - np.float16(2) * uv + norm_v[None, :], np.float16(0))
  if not np.isfinite(d).all():
    u, v = u.astype(np.float64), v.astype(np.float64)
    d = np.maximum((u * u).sum(1)[:, None] - 2 * u @ v.T + (v * v).sum(1)[None, :], 0)
  return d.astype(np.float32)


def _adm_precision_recall(reference, samples, k=3):
  def radii(x):
    return np.partition(_adm_float16_distances(x, x), k, axis=1)[:, k]
  r_ref, r_samples = radii(reference), radii(samples)
  d = _adm_float16_distances(samples, reference)  # [N samples, M reference]
  precision = np.mean(np.any(d <= r_ref[None, :], axis=1))
  recall = np.mean(np.any(d <= r_samples[:, None], axis=0))
  return float(precision), float(recall)


def _clustered(seed, n, d=64, offset=3.0, noise=0.5, grid=16):
  # Four clusters away from the origin: squared norms of ~600, where float16's step (0.5) is
  # coarse next to the distances between neighbours. Values on a 1/grid grid (8 significant
  # bits), exact in float16, make every float32 accumulation exact, so summation order (numpy's
  # BLAS vs XLA) cannot matter.
  centres = offset + np.random.default_rng(0).normal(size=(4, d)) * 0.5
  rng = np.random.default_rng(seed)
  x = centres[rng.integers(0, 4, n)] + rng.normal(size=(n, d)) * noise
  return (np.clip(np.round(x * grid), 0, 255) / grid).astype(np.float32)


def test_precision_recall_float16_matches_adm_emulation():
  reference, samples = _clustered(10, 300), _clustered(11, 250)
  got = metrics.precision_recall(reference, samples, row_block=64)
  assert got == _adm_precision_recall(reference, samples)
  assert 0.6 < got[0] < 0.9 and 0.6 < got[1] < 0.9
  np.testing.assert_array_equal(metrics.manifold_radii(samples, row_block=64),
                                np.partition(_adm_float16_distances(samples, samples), 3, 1)[:, 3])
  # float32 gives other numbers on these features (here 0.708 and 0.727 against 0.728 and
  # 0.757), so the test above can tell the two apart.
  f32 = metrics.precision_recall(reference, samples, row_block=64, distance_dtype="float32")
  assert f32[0] < got[0] and f32[1] < got[1]
  with pytest.raises(ValueError, match="distance_dtype"):
    metrics.precision_recall(reference, samples, distance_dtype="bfloat16")


def test_precision_recall_float16_overflow_falls_back_to_float32():
  # Squared norms of ~200,000 overflow float16 (max 65,504): ADM recomputes in float32.
  # (Values on a 1/2 grid below 128 keep the float32 sums exact.)
  reference = _clustered(12, 120, offset=56.0, grid=2)
  samples = _clustered(13, 100, offset=56.0, grid=2)
  with np.errstate(over="ignore"):
    assert np.isinf(np.square(reference.astype(np.float16)).sum(1, dtype=np.float32)
                    .astype(np.float16)).all()
  got = metrics.precision_recall(reference, samples, row_block=32)
  assert got == metrics.precision_recall(reference, samples, row_block=32,
                                         distance_dtype="float32")
  assert got == _adm_precision_recall(reference, samples)
  assert 0 < got[0] <= 1 and 0 < got[1] <= 1

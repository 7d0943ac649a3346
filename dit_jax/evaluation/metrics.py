"""FID, sFID, Inception Score and improved precision/recall, as ADM's evaluator computes them.

ADM = guided-diffusion `evaluations/evaluator.py`, which produced the DiT paper's numbers:
  * FID / sFID: Frechet distance of Gaussians fitted to pool_3 / mixed_6/conv[..., :7] features,
    mean and `np.cov` (unbiased) in float64, sqrt of sigma1 @ sigma2 by `scipy.linalg.sqrtm`; if
    that is not finite, 1e-6 is added to both diagonals; an imaginary part above 1e-3 on the
    diagonal is an error, a smaller one is dropped.
  * Inception Score: softmax of the UNBIASED logits (pool_3 @ W), splits of 5,000 samples
    (10 splits for 50K), exp(mean KL(p(y|x) || p(y))) averaged over splits.
  * Precision / recall (Kynkaanniemi et al. 2019): a point's manifold radius is the squared
    distance to its k = 3rd nearest neighbour in its own set (the point itself is the 0th);
    precision = share of samples inside some reference ball, recall = share of references
    inside some sample ball (distance <= radius).
    Pairwise squared distances |u|^2 - 2 u.v + |v|^2 (clamped at 0) are computed as ADM does by
    default: inputs, squared norms, the product and every sum rounded to float16 (accumulation in
    float32, as TensorFlow's GPU kernels do), and a block that overflows float16 recomputed in
    float32. `distance_dtype='float32'` computes them in float32 throughout (HIGHEST precision);
    on clustered features that moves recall by ~0.005, so use the default to compare with
    published numbers. One remaining difference: ADM decides the float32 fallback per block of
    10,000 x 10,000 distances, this code per block of `row_block` rows x all columns; they differ
    only when some distance overflows float16 (65,504).
"""
import functools
import warnings

import jax
import jax.numpy as jnp
import numpy as np
from scipy import linalg

ADM_IS_SPLIT_SIZE = 5000


def feature_statistics(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """Mean [D] and unbiased covariance [D, D] (float64) of features [N, D]."""
  features = np.asarray(features, np.float64)
  if features.ndim != 2 or len(features) < 2:
    raise ValueError(f"feature_statistics needs features [N >= 2, D], got shape {features.shape}")
  return features.mean(axis=0), np.cov(features, rowvar=False)


def _sqrt_psd(sigma: np.ndarray) -> np.ndarray:
  w, v = np.linalg.eigh(sigma)
  return (v * np.sqrt(np.clip(w, 0.0, None))) @ v.T


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray,
                     eps: float = 1e-6, method: str = "sqrtm") -> float:
  """Frechet distance between N(mu1, sigma1) and N(mu2, sigma2).

  d = |mu1 - mu2|^2 + tr(sigma1) + tr(sigma2) - 2 tr(sqrt(sigma1 sigma2)).

  Args:
    mu1, mu2: means [D]. sigma1, sigma2: covariances [D, D].
    eps: diagonal offset of ADM's fallback for a non-finite matrix square root.
    method: 'sqrtm' is ADM's computation (scipy.linalg.sqrtm, the reference for published
      numbers). 'eigh' computes the same trace as the sum of sqrt(eigenvalues) of the symmetric
      sqrt(sigma1) sigma2 sqrt(sigma1): several times faster at D = 2048 and stable when the
      covariances are singular (fewer samples than dimensions); needs no offset.
  """
  mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
  sigma1 = np.atleast_2d(np.asarray(sigma1, np.float64))
  sigma2 = np.atleast_2d(np.asarray(sigma2, np.float64))
  if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape or sigma1.shape != mu1.shape * 2:
    raise ValueError(f"frechet_distance: mismatched statistics mu {mu1.shape} vs {mu2.shape}, "
                     f"sigma {sigma1.shape} vs {sigma2.shape}")
  diff = mu1 - mu2
  if method == "eigh":
    root = _sqrt_psd(sigma1)
    inner = root @ sigma2 @ root
    tr_covmean = np.sqrt(np.clip(np.linalg.eigvalsh((inner + inner.T) / 2), 0.0, None)).sum()
  elif method == "sqrtm":
    covmean = linalg.sqrtm(sigma1 @ sigma2)
    if not np.isfinite(covmean).all():
      warnings.warn(f"frechet_distance: singular product; adding {eps} to the covariance diagonals")
      offset = np.eye(sigma1.shape[0]) * eps
      covmean = linalg.sqrtm((sigma1 + offset) @ (sigma2 + offset))
    if np.iscomplexobj(covmean):
      if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
        raise ValueError("frechet_distance: sqrtm has an imaginary component of "
                         f"{np.max(np.abs(covmean.imag)):.3g}; too few samples for the feature "
                         "size? method='eigh' handles singular covariances")
      covmean = covmean.real
    tr_covmean = np.trace(covmean)
  else:
    raise ValueError(f"frechet_distance: unknown method {method!r} (use 'sqrtm' or 'eigh')")
  return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * tr_covmean)


def inception_score(logits: np.ndarray, split_size: int = ADM_IS_SPLIT_SIZE) -> float:
  """ADM's Inception Score of logits [N, C]: chunks of `split_size`, mean of exp(mean KL).

  Pass the unbiased logits (features['logits_unbiased']) to match ADM. Computed in float64
  with log-softmax, so classes with underflowing probability contribute 0 rather than NaN.
  """
  logits = np.asarray(logits, np.float64)
  if logits.ndim != 2 or not len(logits):
    raise ValueError(f"inception_score needs logits [N, C], got shape {logits.shape}")
  log_p = logits - logits.max(axis=1, keepdims=True)
  log_p -= np.log(np.exp(log_p).sum(axis=1, keepdims=True))
  scores = []
  for start in range(0, len(log_p), split_size):
    part = log_p[start:start + split_size]
    p = np.exp(part)
    log_marginal = np.log(p.mean(axis=0))
    scores.append(np.exp(np.mean(np.sum(p * (part - log_marginal), axis=1))))
  return float(np.mean(scores))


DISTANCE_DTYPES = ("float16", "float32")


def _f16(x: jax.Array) -> jax.Array:
  # Rounds float32 values to float16 (to nearest even; overflow -> inf), kept in float32, with
  # explicit ops that XLA never fuses away (float16 arithmetic on a CPU may run with excess
  # precision). reduce_precision flushes float16's subnormals (below 2^-14) to zero: round
  # those to float16's subnormal step 2^-24 instead.
  tiny = jnp.abs(x) < 2.0**-14
  return jnp.where(tiny, jnp.round(x * 2.0**24) * 2.0**-24,
                   jax.lax.reduce_precision(x, exponent_bits=5, mantissa_bits=10))


def _squared_distances_f32(u: jax.Array, v: jax.Array) -> jax.Array:
  # ADM's |u|^2 - 2 u.v + |v|^2 clamped at 0 (the clamp removes tiny negative round-off).
  uv = jnp.dot(u, v.T, precision=jax.lax.Precision.HIGHEST)
  d = jnp.sum(u * u, axis=1)[:, None] - 2.0 * uv + jnp.sum(v * v, axis=1)[None, :]
  return jnp.maximum(d, 0.0)


def _squared_distances_f16(u: jax.Array, v: jax.Array) -> jax.Array:
  # ADM casts both batches to float16 and evaluates the same expression in float16; each op's
  # result is rounded (sums and the matmul accumulate in float32 first).
  u, v = _f16(u), _f16(v)
  norm_u = _f16(jnp.sum(_f16(u * u), axis=1))
  norm_v = _f16(jnp.sum(_f16(v * v), axis=1))
  uv = _f16(jnp.dot(u, v.T, precision=jax.lax.Precision.HIGHEST))
  d = _f16(_f16(norm_u[:, None] - _f16(2.0 * uv)) + norm_v[None, :])
  return jnp.maximum(d, 0.0)


def _squared_distances(u: jax.Array, v: jax.Array, distance_dtype: str) -> jax.Array:
  if distance_dtype == "float32":
    return _squared_distances_f32(u, v)
  d = _squared_distances_f16(u, v)
  # ADM: a block with a non-finite float16 distance is recomputed in float32.
  return jax.lax.cond(jnp.all(jnp.isfinite(d)), lambda: d, lambda: _squared_distances_f32(u, v))


@functools.partial(jax.jit, static_argnames=("k", "distance_dtype"))
def _kth_neighbour(rows: jax.Array, points: jax.Array, k: int, distance_dtype: str) -> jax.Array:
  neg_smallest, _ = jax.lax.top_k(-_squared_distances(rows, points, distance_dtype), k + 1)
  return -neg_smallest[:, k]


@functools.partial(jax.jit, static_argnames="distance_dtype")
def _inside_any_ball(rows: jax.Array, centres: jax.Array, radii: jax.Array,
                     distance_dtype: str) -> jax.Array:
  return jnp.any(_squared_distances(rows, centres, distance_dtype) <= radii[None, :], axis=1)


def _check_distance_dtype(distance_dtype: str) -> None:
  if distance_dtype not in DISTANCE_DTYPES:
    raise ValueError(f"distance_dtype must be one of {DISTANCE_DTYPES}, not {distance_dtype!r}")


def _row_blocks(fn, rows: np.ndarray, block: int, *args) -> np.ndarray:
  """Applies fn to fixed-size (zero-padded) row blocks, so it compiles once."""
  out = []
  block = min(block, len(rows))
  for start in range(0, len(rows), block):
    chunk = rows[start:start + block]
    valid = len(chunk)
    if valid < block:
      chunk = np.concatenate([chunk, np.zeros((block - valid,) + chunk.shape[1:], chunk.dtype)])
    out.append(np.asarray(fn(chunk, *args))[:valid])
  return np.concatenate(out)


def manifold_radii(features: np.ndarray, k: int = 3, row_block: int = 1024,
                   distance_dtype: str = "float16") -> np.ndarray:
  """Squared distance [N] of each feature [N, D] to its k-th nearest neighbour in the set.

  distance_dtype: 'float16' (ADM's evaluator, the default) or 'float32'; see the module docstring.
  """
  _check_distance_dtype(distance_dtype)
  features = np.asarray(features, np.float32)
  if len(features) <= k:
    raise ValueError(f"manifold_radii: need more than k={k} features, got {len(features)}")
  points = jnp.asarray(features)
  return _row_blocks(lambda r: _kth_neighbour(r, points, k, distance_dtype), features, row_block)


def precision_recall(reference: np.ndarray, samples: np.ndarray, k: int = 3,
                     row_block: int = 1024,
                     distance_dtype: str = "float16") -> tuple[float, float]:
  """Improved precision and recall of sample features [N, D] against reference features [M, D].

  distance_dtype: 'float16' computes the pairwise distances as ADM's evaluator does (comparable
  with published numbers, the default); 'float32' in float32 throughout.
  """
  _check_distance_dtype(distance_dtype)
  reference, samples = np.asarray(reference, np.float32), np.asarray(samples, np.float32)
  if reference.ndim != 2 or samples.ndim != 2 or reference.shape[1] != samples.shape[1]:
    raise ValueError(f"precision_recall: features must be [N, D] with equal D, got "
                     f"{reference.shape} and {samples.shape}")
  ref_radii = jnp.asarray(manifold_radii(reference, k, row_block, distance_dtype))
  sample_radii = jnp.asarray(manifold_radii(samples, k, row_block, distance_dtype))
  ref_dev, sample_dev = jnp.asarray(reference), jnp.asarray(samples)
  in_ref = _row_blocks(lambda r: _inside_any_ball(r, ref_dev, ref_radii, distance_dtype),
                       samples, row_block)
  in_samples = _row_blocks(lambda r: _inside_any_ball(r, sample_dev, sample_radii, distance_dtype),
                           reference, row_block)
  return float(in_ref.mean()), float(in_samples.mean())

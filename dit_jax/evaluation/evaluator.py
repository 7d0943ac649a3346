"""Sample evaluation: features of generated images -> FID, sFID, IS, precision, recall."""
from typing import Any, Iterable

import numpy as np

from dit_jax.evaluation import features as features_lib
from dit_jax.evaluation import metrics
from dit_jax.evaluation.reference import ReferenceStats


def compute_metrics(feats: dict[str, np.ndarray], reference: ReferenceStats, *,
                    fid_method: str = "sqrtm", is_split_size: int = metrics.ADM_IS_SPLIT_SIZE,
                    k: int = 3, distance_dtype: str = "float16") -> dict[str, float]:
  """ADM's metrics of sample features (from `extract_features`) against reference statistics.

  Returns {'fid', 'sfid', 'inception_score', 'precision', 'recall', 'num_samples'};
  precision and recall only when the reference carries pool features, with pairwise distances
  in float16 as ADM (`distance_dtype='float32'`: float32 throughout).
  """
  mu, sigma = metrics.feature_statistics(feats["pool"])
  mu_s, sigma_s = metrics.feature_statistics(feats["spatial"])
  result = {
      "num_samples": int(len(feats["pool"])),
      "fid": metrics.frechet_distance(mu, sigma, reference.mu, reference.sigma, method=fid_method),
      "sfid": metrics.frechet_distance(mu_s, sigma_s, reference.mu_s, reference.sigma_s,
                                       method=fid_method),
      "inception_score": metrics.inception_score(feats["logits_unbiased"], is_split_size),
  }
  if reference.pool is not None:
    result["precision"], result["recall"] = metrics.precision_recall(
        reference.pool, feats["pool"], k, distance_dtype=distance_dtype)
  return result


def evaluate_samples(images_uint8_nhwc: np.ndarray | Iterable[np.ndarray], inception_params: Any,
                     reference_stats: ReferenceStats, *, batch_size_per_device: int = 32,
                     fid_method: str = "sqrtm", mesh: Any = None,
                     distance_dtype: str = "float16") -> dict[str, float]:
  """FID, sFID, IS, precision and recall of generated images, for a training job or a CLI.

  Args:
    images_uint8_nhwc: uint8 [N, H, W, 3] images (or an iterable of such batches); in a
      multi-process job every process passes the same images.
    inception_params: variables from `load_inception(path)`.
    reference_stats: from `compute_reference(...)` or `ReferenceStats.load(path)`.
    batch_size_per_device: Inception batch per device.
    fid_method: 'sqrtm' (ADM's, default) or 'eigh' (same value, faster, handles N < 2048).
    distance_dtype: precision/recall distances, 'float16' (ADM's, default) or 'float32'.
  Returns:
    dict of floats; every process gets the same values.
  """
  feats = features_lib.extract_features(images_uint8_nhwc, inception_params,
                                        batch_size_per_device=batch_size_per_device, mesh=mesh)
  return compute_metrics(feats, reference_stats, fid_method=fid_method,
                         distance_dtype=distance_dtype)

"""Evaluation in JAX comparable with ADM's evaluator: FID, sFID, Inception Score, precision/recall.

  variables = load_inception("pt_inception-2015-12-05-6726825d.pth")
  reference = compute_reference("VIRTUAL_imagenet256_labeled.npz", variables, cache_path="ref.npz")
  metrics = evaluate_samples(images_uint8_nhwc, variables, reference)
"""
from dit_jax.evaluation.convert import load_inception
from dit_jax.evaluation.evaluator import compute_metrics, evaluate_samples
from dit_jax.evaluation.features import extract_features
from dit_jax.evaluation.inception import FIDInceptionV3
from dit_jax.evaluation.reference import ReferenceStats, compute_reference

__all__ = ["FIDInceptionV3", "ReferenceStats", "compute_metrics", "compute_reference",
           "evaluate_samples", "extract_features", "load_inception"]

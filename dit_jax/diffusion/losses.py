"""Likelihood terms of the ADM variational bound (elementwise, any layout).

All functions are elementwise and broadcast their arguments; they compute in the
dtype of their inputs (float32 in practice). Log variances and log scales are
natural logs; results are in nats (callers divide by ln 2 for bits).
"""
import math

import jax
import jax.numpy as jnp


def mean_flat(x: jax.Array) -> jax.Array:
  """Mean over every axis but the first: [N, ...] -> [N]."""
  return jnp.mean(x, axis=tuple(range(1, x.ndim)))


def normal_kl(mean1: jax.Array, logvar1: jax.Array, mean2: jax.Array,
              logvar2: jax.Array) -> jax.Array:
  """KL(N(mean1, exp(logvar1)) || N(mean2, exp(logvar2))), elementwise, nats."""
  return 0.5 * (-1.0 + logvar2 - logvar1 + jnp.exp(logvar1 - logvar2) +
                jnp.square(mean1 - mean2) * jnp.exp(-logvar2))


def approx_standard_normal_cdf(x: jax.Array) -> jax.Array:
  """The tanh approximation of the standard normal CDF that ADM uses.

  Kept instead of `jax.scipy.stats.norm.cdf` so decoder NLLs (and hence `vb`
  at t = 0) match the released numbers.
  """
  return 0.5 * (1.0 + jnp.tanh(math.sqrt(2.0 / math.pi) *
                               (x + 0.044715 * jnp.power(x, 3))))


def discretized_gaussian_log_likelihood(x: jax.Array, means: jax.Array,
                                        log_scales: jax.Array) -> jax.Array:
  """Log-likelihood of data in [-1, 1] discretized to 256 bins of width 2/255.

  Args:
    x: targets, assumed to be uint8 values rescaled to [-1, 1].
    means: Gaussian means, broadcastable to x.
    log_scales: Gaussian log standard deviations, broadcastable to x.

  Returns:
    Elementwise log-probabilities (nats), shape of x. The two edge bins take
    the whole tail mass, so the probabilities of the 256 bins sum to one.
  """
  centered = x - means
  inv_std = jnp.exp(-log_scales)
  cdf_plus = approx_standard_normal_cdf(inv_std * (centered + 1.0 / 255.0))
  cdf_min = approx_standard_normal_cdf(inv_std * (centered - 1.0 / 255.0))
  log_cdf_plus = jnp.log(jnp.maximum(cdf_plus, 1e-12))
  log_one_minus_cdf_min = jnp.log(jnp.maximum(1.0 - cdf_min, 1e-12))
  log_cdf_delta = jnp.log(jnp.maximum(cdf_plus - cdf_min, 1e-12))
  return jnp.where(
      x < -0.999, log_cdf_plus,
      jnp.where(x > 0.999, log_one_minus_cdf_min, log_cdf_delta))

"""dit_jax: Scalable Diffusion Models with Transformers (DiT) in JAX/Flax."""

__version__ = "0.1.0"

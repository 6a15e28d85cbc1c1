"""alignax: reward-feedback alignment of MM-DiT text-to-image models in JAX/Flax."""

__version__ = "0.1.0"

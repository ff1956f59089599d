"""gqa-flax: grouped-query attention for T5.1.1 (Ainslie et al. 2023) in JAX/Flax."""
__version__ = "0.1.0"

"""ept_jax: Expert Pyramid Tuning (EPT) for multi-task parameter-efficient fine-tuning in JAX / Flax NNX."""

__version__ = "0.1.0"

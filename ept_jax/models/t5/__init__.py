"""T5 family: :class:`T5Model` (plain; adapters are injected after building), its config and greedy generation."""

from ept_jax.models.t5.config import T5Config, ff_linears
from ept_jax.models.t5.generation import generate
from ept_jax.models.t5.model import T5Cache, T5Model, relative_position_bucket

__all__ = ["T5Cache", "T5Config", "T5Model", "ff_linears", "generate", "relative_position_bucket"]

"""LLaMA family: :class:`LlamaModel` (plain; adapters are injected after building), its config and greedy
generation."""

from ept_jax.models.llama.config import LlamaConfig, RopeScaling, rope_inv_freq
from ept_jax.models.llama.generation import generate
from ept_jax.models.llama.model import (
    Embedding,
    KVCache,
    LlamaModel,
    RMSNorm,
    apply_rope,
    positions_from_mask,
    rope_cos_sin,
)

__all__ = ["Embedding", "KVCache", "LlamaConfig", "LlamaModel", "RMSNorm", "RopeScaling", "apply_rope", "generate",
           "positions_from_mask", "rope_cos_sin", "rope_inv_freq"]

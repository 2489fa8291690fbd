"""LLaMA-family configuration and rotary position embedding frequencies.

:class:`LlamaConfig` reads a Hugging Face ``config.json`` in both of the forms transformers has written: the
transformers 4 form (``rope_theta`` + ``rope_scaling``) and the transformers 5 form (``rope_parameters`` holding
``rope_type``, ``rope_theta`` and the scaling fields). :func:`rope_inv_freq` reproduces transformers'
``ROPE_INIT_FUNCTIONS`` (``default``, ``linear``, ``llama3``) in float32, operation for operation, so that
rotary angles (and with them the logits) match the PyTorch model to float32 rounding.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Mapping
from typing import Any

import numpy as np

ROPE_TYPES = ("default", "linear", "llama3")
ACTIVATIONS = ("silu",)
MODEL_TYPES = ("llama",)


@dataclasses.dataclass(frozen=True)
class RopeScaling:
    """RoPE frequency scaling (transformers' ``rope_parameters`` minus ``rope_theta``).

    Attributes:
      rope_type: one of :data:`ROPE_TYPES`.
      factor: ``linear``: every inverse frequency is divided by it; ``llama3``: low frequencies are.
      low_freq_factor / high_freq_factor / original_max_position_embeddings: ``llama3`` only (Llama 3.1's
        wavelength bands; see transformers' ``_compute_llama3_parameters``).
    """

    rope_type: str = "default"
    factor: float = 1.0
    low_freq_factor: float | None = None
    high_freq_factor: float | None = None
    original_max_position_embeddings: int | None = None

    def to_hf(self) -> dict[str, Any] | None:
        """The ``rope_scaling`` entry of a transformers 4 ``config.json`` (None for ``default``)."""
        if self.rope_type == "default":
            return None
        out: dict[str, Any] = {"rope_type": self.rope_type, "factor": self.factor}
        if self.rope_type == "llama3":
            out.update(
                low_freq_factor=self.low_freq_factor,
                high_freq_factor=self.high_freq_factor,
                original_max_position_embeddings=self.original_max_position_embeddings,
            )
        return out


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
    """The architecture of a LLaMA-family decoder (LLaMA 1/2/3, SmolLM2, TinyLlama, ...). Frozen and hashable.

    Attributes mirror transformers' ``LlamaConfig``; ``head_dim`` is always resolved (``hidden_size //
    num_attention_heads`` when the checkpoint does not give it).
    """

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling = RopeScaling()
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    mlp_bias: bool = False
    hidden_act: str = "silu"
    bos_token_id: int | None = None
    eos_token_id: int | tuple[int, ...] | None = None
    pad_token_id: int | None = None

    def __post_init__(self):
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                     "num_attention_heads", "num_key_value_heads", "head_dim", "max_position_embeddings"):
            v = getattr(self, name)
            if not isinstance(v, (int, np.integer)) or isinstance(v, bool) or v < 1:
                raise ValueError(f"LlamaConfig.{name}={v!r}: must be a positive integer")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"num_attention_heads={self.num_attention_heads} is not a multiple of "
                f"num_key_value_heads={self.num_key_value_heads} (grouped-query attention needs one)"
            )
        if self.head_dim % 2:
            raise ValueError(f"head_dim={self.head_dim}: rotary embeddings need an even head dimension")
        if self.hidden_act not in ACTIVATIONS:
            raise ValueError(f"hidden_act={self.hidden_act!r} is not supported; accepted: {ACTIVATIONS}")
        if not self.rms_norm_eps > 0:
            raise ValueError(f"rms_norm_eps={self.rms_norm_eps!r}: must be > 0")
        if not self.rope_theta > 0:
            raise ValueError(f"rope_theta={self.rope_theta!r}: must be > 0")
        rs = self.rope_scaling
        if rs.rope_type not in ROPE_TYPES:
            raise ValueError(f"rope_type={rs.rope_type!r} is not supported; accepted: {ROPE_TYPES}")
        if rs.rope_type != "default" and not rs.factor > 0:
            raise ValueError(f"rope scaling factor={rs.factor!r}: must be > 0")
        if rs.rope_type == "llama3":
            missing = [k for k in ("low_freq_factor", "high_freq_factor", "original_max_position_embeddings")
                       if getattr(rs, k) is None]
            if missing:
                raise ValueError(f"rope_type='llama3' needs {missing} in the rope scaling parameters")
            if rs.high_freq_factor == rs.low_freq_factor:
                raise ValueError("rope_type='llama3' needs high_freq_factor != low_freq_factor")

    @property
    def num_key_value_groups(self) -> int:
        """Query heads per key/value head."""
        return self.num_attention_heads // self.num_key_value_heads

    @classmethod
    def from_hf(cls, d: Mapping[str, Any]) -> LlamaConfig:
        """Builds the config from a Hugging Face ``config.json`` dict (transformers 4 or 5 form).

        ``pretraining_tp`` is ignored: in transformers it only splits the same matmuls differently.

        Raises:
          ValueError: a required key is missing, or a value this implementation does not support (another
            ``model_type``, activation, RoPE type or a partial rotary factor), naming it and what is accepted.
        """
        model_type = d.get("model_type", "llama")
        if model_type not in MODEL_TYPES:
            raise ValueError(f"model_type={model_type!r} is not a LLaMA-family config; accepted: {MODEL_TYPES}")
        required = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")
        missing = [k for k in required if d.get(k) is None]
        if missing:
            raise ValueError(f"LLaMA config.json lacks required key(s) {missing}")
        heads = int(d["num_attention_heads"])
        head_dim = d.get("head_dim") or int(d["hidden_size"]) // heads
        theta, scaling = _rope_from_hf(d)
        eos = d.get("eos_token_id")
        if isinstance(eos, (list, tuple)):
            eos = tuple(int(e) for e in eos)
        return cls(
            vocab_size=int(d["vocab_size"]),
            hidden_size=int(d["hidden_size"]),
            intermediate_size=int(d["intermediate_size"]),
            num_hidden_layers=int(d["num_hidden_layers"]),
            num_attention_heads=heads,
            num_key_value_heads=int(d.get("num_key_value_heads") or heads),
            head_dim=int(head_dim),
            rms_norm_eps=float(d.get("rms_norm_eps", 1e-6)),
            rope_theta=theta,
            rope_scaling=scaling,
            max_position_embeddings=int(d.get("max_position_embeddings") or 2048),
            tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
            attention_bias=bool(d.get("attention_bias", False)),
            mlp_bias=bool(d.get("mlp_bias", False)),
            hidden_act=d.get("hidden_act", "silu"),
            bos_token_id=d.get("bos_token_id"),
            eos_token_id=eos,
            pad_token_id=d.get("pad_token_id"),
        )

    def to_hf(self) -> dict[str, Any]:
        """A transformers 4-style ``config.json`` dict (transformers 5 reads it too) that :meth:`from_hf` inverts."""
        eos = list(self.eos_token_id) if isinstance(self.eos_token_id, tuple) else self.eos_token_id
        return {
            "architectures": ["LlamaForCausalLM"],
            "model_type": "llama",
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "head_dim": self.head_dim,
            "rms_norm_eps": self.rms_norm_eps,
            "rope_theta": self.rope_theta,
            "rope_scaling": self.rope_scaling.to_hf(),
            "max_position_embeddings": self.max_position_embeddings,
            "tie_word_embeddings": self.tie_word_embeddings,
            "attention_bias": self.attention_bias,
            "mlp_bias": self.mlp_bias,
            "hidden_act": self.hidden_act,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": eos,
            "pad_token_id": self.pad_token_id,
            "torch_dtype": "float32",
        }


def _rope_from_hf(d: Mapping[str, Any]) -> tuple[float, RopeScaling]:
    """``(rope_theta, RopeScaling)`` from either config form; ``rope_parameters`` wins where both are given."""
    params = dict(d.get("rope_parameters") or {})
    legacy = dict(d.get("rope_scaling") or {})
    merged = {**legacy, **params}
    if any(isinstance(v, Mapping) for v in merged.values()):
        raise ValueError(
            f"per-layer-type rope parameters {sorted(merged)} are not supported by the LLaMA family; "
            "expected one flat rope_parameters/rope_scaling dict"
        )
    theta = float(merged.get("rope_theta", d.get("rope_theta", 10000.0)))
    rope_type = merged.get("rope_type", merged.get("type", "default"))
    partial = merged.get("partial_rotary_factor", d.get("partial_rotary_factor"))
    if partial not in (None, 1, 1.0):
        raise ValueError(f"partial_rotary_factor={partial!r} is not supported by the LLaMA family; accepted: 1.0")
    if rope_type not in ROPE_TYPES:
        raise ValueError(f"rope_type={rope_type!r} is not supported; accepted: {ROPE_TYPES}")
    if rope_type == "default":
        return theta, RopeScaling()
    if "factor" not in merged:
        raise ValueError(f"rope_type={rope_type!r} needs a 'factor' in rope_scaling/rope_parameters")
    if rope_type == "linear":
        return theta, RopeScaling("linear", float(merged["factor"]))
    # transformers falls back to max_position_embeddings when llama3 scaling omits the original length.
    original = merged.get("original_max_position_embeddings", d.get("max_position_embeddings"))
    return theta, RopeScaling(
        "llama3",
        float(merged["factor"]),
        low_freq_factor=float(merged["low_freq_factor"]) if "low_freq_factor" in merged else None,
        high_freq_factor=float(merged["high_freq_factor"]) if "high_freq_factor" in merged else None,
        original_max_position_embeddings=int(original) if original is not None else None,
    )


@functools.lru_cache(maxsize=64)
def rope_inv_freq(cfg: LlamaConfig, dtype=np.float32) -> np.ndarray:
    """Inverse RoPE frequencies ``(head_dim // 2,)`` float32, as transformers' ``ROPE_INIT_FUNCTIONS`` compute them.

    ``dtype=np.float64`` computes the same operations in float64 (exact float64 tests). Every operation is done in
    float32 in the same order as the PyTorch code (``base ** (arange / dim)``, then the
    type's rescaling), because the angles ``position * inv_freq`` amplify any rounding difference with position.
    """
    dim = cfg.head_dim
    f = np.dtype(dtype).type
    exponent = np.arange(0, dim, 2, dtype=np.int64).astype(f) / f(dim)
    inv_freq = (f(1.0) / (f(cfg.rope_theta) ** exponent)).astype(f)
    rs = cfg.rope_scaling
    if rs.rope_type == "linear":
        return (inv_freq / f(rs.factor)).astype(f)
    if rs.rope_type == "llama3":
        factor = f(rs.factor)
        low_wavelen = rs.original_max_position_embeddings / rs.low_freq_factor
        high_wavelen = rs.original_max_position_embeddings / rs.high_freq_factor
        wavelen = (f(2 * math.pi) / inv_freq).astype(f)
        scaled = np.where(wavelen > low_wavelen, inv_freq / factor, inv_freq).astype(f)
        smooth = ((f(rs.original_max_position_embeddings) / wavelen - f(rs.low_freq_factor))
                  / f(rs.high_freq_factor - rs.low_freq_factor)).astype(f)
        smoothed = ((1 - smooth) * scaled / factor + smooth * scaled).astype(f)
        medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
        return np.where(medium, smoothed, scaled).astype(f)
    return inv_freq

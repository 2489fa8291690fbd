"""T5-family configuration (T5 v1.0, T5 v1.1, Flan-T5, mT5) and the activations its feed-forward blocks use.

:class:`T5Config` reads a Hugging Face ``config.json`` as transformers does:

* ``feed_forward_proj`` is ``"ACT"`` or ``"gated-ACT"``; ``"gated-gelu"`` means the tanh-approximated
  ``gelu_new`` (transformers' backwards-compatibility rule), a plain ``"gelu"`` the exact erf GELU;
* ``tie_word_embeddings`` (default True) decides whether the output projection is the shared embedding matrix;
  the ``d_model ** -0.5`` output scaling of T5 v1.0 goes with tied embeddings, unless the file says otherwise
  in ``scale_decoder_outputs`` (transformers 5 writes it);
* ``num_decoder_layers`` defaults to ``num_layers``; ``decoder_start_token_id`` to ``pad_token_id``.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

MODEL_TYPES = ("t5", "mt5")


def _gelu_tanh(x: jax.Array) -> jax.Array:
    # transformers' NewGELUActivation, operation for operation.
    return 0.5 * x * (1.0 + jnp.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * jnp.power(x, 3.0))))


# transformers' ACT2FN names for the activations T5 checkpoints use.
ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "relu": jax.nn.relu,
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "gelu_new": _gelu_tanh,
    "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "silu": jax.nn.silu,
    "swish": jax.nn.silu,
}


@dataclasses.dataclass(frozen=True)
class T5Config:
    """The architecture of a T5-family encoder-decoder. Frozen and hashable (usable as a static jit argument).

    Attributes mirror transformers' ``T5Config``: ``d_model`` (hidden size), ``d_kv`` (head dim), ``d_ff``
    (feed-forward size), ``num_layers`` / ``num_decoder_layers`` (encoder / decoder depth), ``num_heads``,
    ``relative_attention_num_buckets`` / ``relative_attention_max_distance`` (relative position buckets),
    ``layer_norm_epsilon``, ``feed_forward_proj``, ``tie_word_embeddings``, ``scale_decoder_outputs``
    (multiply the decoder output by ``d_model ** -0.5`` before the output projection, T5 v1.0) and the special
    token ids.
    """

    vocab_size: int
    d_model: int
    d_kv: int
    d_ff: int
    num_layers: int
    num_decoder_layers: int
    num_heads: int
    relative_attention_num_buckets: int = 32
    relative_attention_max_distance: int = 128
    layer_norm_epsilon: float = 1e-6
    feed_forward_proj: str = "relu"
    tie_word_embeddings: bool = True
    scale_decoder_outputs: bool = True
    pad_token_id: int = 0
    eos_token_id: int | tuple[int, ...] | None = 1
    decoder_start_token_id: int = 0
    model_type: str = "t5"

    def __post_init__(self):
        for name in ("vocab_size", "d_model", "d_kv", "d_ff", "num_layers", "num_decoder_layers", "num_heads",
                     "relative_attention_num_buckets", "relative_attention_max_distance"):
            v = getattr(self, name)
            if not isinstance(v, (int, np.integer)) or isinstance(v, bool) or v < 1:
                raise ValueError(f"T5Config.{name}={v!r}: must be a positive integer")
        if self.relative_attention_num_buckets < 4:
            # bidirectional buckets halve the count and half of those are exact: below 4 no log bins remain
            raise ValueError(
                f"T5Config.relative_attention_num_buckets={self.relative_attention_num_buckets}: must be >= 4"
            )
        if not self.layer_norm_epsilon > 0:
            raise ValueError(f"T5Config.layer_norm_epsilon={self.layer_norm_epsilon!r}: must be > 0")
        if self.model_type not in MODEL_TYPES:
            raise ValueError(
                f"model_type={self.model_type!r} is not a T5-family config; accepted: {MODEL_TYPES}"
            )
        parts = self.feed_forward_proj.split("-")
        if len(parts) > 2 or (len(parts) == 2 and parts[0] != "gated"):
            raise ValueError(
                f"feed_forward_proj={self.feed_forward_proj!r} is malformed; expected 'ACT' or 'gated-ACT' "
                f"(e.g. 'relu', 'gated-gelu')"
            )
        if self.dense_act_fn not in ACTIVATIONS:
            raise ValueError(
                f"feed_forward_proj={self.feed_forward_proj!r}: activation {self.dense_act_fn!r} is not "
                f"supported; accepted: {sorted(ACTIVATIONS)}"
            )

    @property
    def is_gated(self) -> bool:
        """Gated feed-forward (``wi_0``, ``wi_1``, T5 v1.1 / Flan-T5 / mT5) rather than ``wi`` (T5 v1.0)."""
        return self.feed_forward_proj.startswith("gated-")

    @property
    def dense_act_fn(self) -> str:
        """The activation's transformers name (``"gated-gelu"`` -> ``"gelu_new"``, as transformers does)."""
        if self.feed_forward_proj == "gated-gelu":
            return "gelu_new"
        return self.feed_forward_proj.split("-")[-1]

    @property
    def activation(self) -> Callable[[jax.Array], jax.Array]:
        return ACTIVATIONS[self.dense_act_fn]

    @property
    def inner_dim(self) -> int:
        """``num_heads * d_kv``: the width of the attention projections (need not equal ``d_model``)."""
        return self.num_heads * self.d_kv

    @classmethod
    def from_hf(cls, d: Mapping[str, Any]) -> T5Config:
        """Builds the config from a Hugging Face ``config.json`` dict (transformers 4 or 5).

        Raises:
          ValueError: a required key is missing, or a value this implementation does not support (another
            ``model_type``, an unknown activation), naming it and what is accepted.
        """
        model_type = d.get("model_type", "t5")
        if model_type not in MODEL_TYPES:
            raise ValueError(f"model_type={model_type!r} is not a T5-family config; accepted: {MODEL_TYPES}")
        required = ("vocab_size", "d_model", "d_kv", "d_ff", "num_layers", "num_heads")
        missing = [k for k in required if d.get(k) is None]
        if missing:
            raise ValueError(f"T5 config.json lacks required key(s) {missing}")
        tied = d.get("tie_word_embeddings", True) is not False
        scale = d.get("scale_decoder_outputs")
        eos = d.get("eos_token_id", 1)
        if isinstance(eos, (list, tuple)):
            eos = tuple(int(e) for e in eos)
        pad = d.get("pad_token_id")
        pad = 0 if pad is None else int(pad)
        start = d.get("decoder_start_token_id")
        return cls(
            vocab_size=int(d["vocab_size"]),
            d_model=int(d["d_model"]),
            d_kv=int(d["d_kv"]),
            d_ff=int(d["d_ff"]),
            num_layers=int(d["num_layers"]),
            num_decoder_layers=int(d.get("num_decoder_layers") or d["num_layers"]),
            num_heads=int(d["num_heads"]),
            relative_attention_num_buckets=int(d.get("relative_attention_num_buckets", 32)),
            relative_attention_max_distance=int(d.get("relative_attention_max_distance", 128)),
            layer_norm_epsilon=float(d.get("layer_norm_epsilon", 1e-6)),
            feed_forward_proj=str(d.get("feed_forward_proj", "relu")),
            tie_word_embeddings=tied,
            scale_decoder_outputs=tied if scale is None else bool(scale),
            pad_token_id=pad,
            eos_token_id=eos,
            decoder_start_token_id=pad if start is None else int(start),
            model_type=model_type,
        )

    def to_hf(self) -> dict[str, Any]:
        """A ``config.json`` dict that transformers (4 and 5) and :meth:`from_hf` read back to this config."""
        eos = list(self.eos_token_id) if isinstance(self.eos_token_id, tuple) else self.eos_token_id
        arch = "MT5ForConditionalGeneration" if self.model_type == "mt5" else "T5ForConditionalGeneration"
        return {
            "architectures": [arch],
            "model_type": self.model_type,
            "vocab_size": self.vocab_size,
            "d_model": self.d_model,
            "d_kv": self.d_kv,
            "d_ff": self.d_ff,
            "num_layers": self.num_layers,
            "num_decoder_layers": self.num_decoder_layers,
            "num_heads": self.num_heads,
            "relative_attention_num_buckets": self.relative_attention_num_buckets,
            "relative_attention_max_distance": self.relative_attention_max_distance,
            "layer_norm_epsilon": self.layer_norm_epsilon,
            "feed_forward_proj": self.feed_forward_proj,
            "dense_act_fn": self.dense_act_fn,
            "is_gated_act": self.is_gated,
            "tie_word_embeddings": self.tie_word_embeddings,
            "scale_decoder_outputs": self.scale_decoder_outputs,
            "pad_token_id": self.pad_token_id,
            "eos_token_id": eos,
            "decoder_start_token_id": self.decoder_start_token_id,
            "is_encoder_decoder": True,
            "dropout_rate": 0.0,
            "torch_dtype": "float32",
        }


def ff_linears(cfg: T5Config) -> tuple[str, ...]:
    """The feed-forward Linears of ``cfg``: ``(wi_0, wi_1, wo)`` when gated, else ``(wi, wo)``."""
    return ("wi_0", "wi_1", "wo") if cfg.is_gated else ("wi", "wo")

"""The model families, plain flax NNX: T5 (encoder-decoder, :mod:`ept_jax.models.t5`) and LLaMA (decoder-only,
:mod:`ept_jax.models.llama`). Building and loading: :mod:`ept_jax.checkpoints.load`; adapters:
:func:`ept_jax.adapters.inject.inject`."""

from __future__ import annotations

MODEL_FAMILIES = ("llama", "t5")


def family_module(family: str):
    """The module implementing ``family`` (``ept_jax.models.t5`` or ``ept_jax.models.llama``)."""
    if family == "t5":
        from ept_jax.models import t5

        return t5
    if family == "llama":
        from ept_jax.models import llama

        return llama
    raise ValueError(f"model family {family!r} is not supported; accepted: {list(MODEL_FAMILIES)}")


def config_and_model_classes(family: str):
    """``(ConfigClass, ModelClass)`` of a family; ``ConfigClass.from_hf(config_json_dict)`` builds the config."""
    mod = family_module(family)
    if family == "t5":
        return mod.T5Config, mod.T5Model
    return mod.LlamaConfig, mod.LlamaModel

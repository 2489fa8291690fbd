"""The model families: T5 (encoder-decoder) and LLaMA (decoder-only), flax NNX, loaded from Hugging Face checkpoints.

:func:`from_pretrained` dispatches on the checkpoint's ``model_type``; each family module has its own
``from_pretrained``, config class and mapping table.
"""

from __future__ import annotations

import os
from pathlib import Path

from ept_jax.checkpoints.hf import CheckpointError, read_config, resolve_model_dir

FAMILIES = {"t5": "t5", "mt5": "t5", "umt5": None, "llama": "llama", "mistral": None}


def family_of(model_type: str) -> str:
    """``"t5"`` or ``"llama"`` for a Hugging Face ``model_type``; a clear error for anything else."""
    fam = FAMILIES.get(model_type)
    if fam is None:
        accepted = sorted(k for k, v in FAMILIES.items() if v)
        raise CheckpointError(f"model_type {model_type!r} is not supported; accepted: {accepted}")
    return fam


def family_module(family: str):
    """The module implementing ``family`` (``ept_jax.models.t5`` or ``ept_jax.models.llama``)."""
    if family == "t5":
        from ept_jax.models import t5

        return t5
    if family == "llama":
        from ept_jax.models import llama

        return llama
    raise ValueError(f"model family {family!r} is not supported; accepted: ['llama', 't5']")


def from_pretrained(name_or_path: str | os.PathLike, **kwargs):
    """Loads any supported model (directory, hub id, or a ``.gguf`` file for LLaMA) with its family's loader."""
    p = Path(name_or_path)
    if p.suffix == ".gguf":
        return family_module("llama").from_pretrained(p, **kwargs)
    d = resolve_model_dir(name_or_path)
    fam = family_of(read_config(d).get("model_type", ""))
    return family_module(fam).from_pretrained(d, **kwargs)


def config_and_model_classes(family: str):
    """``(ConfigClass, ModelClass)`` of a family; ``ConfigClass.from_hf(config_json_dict)`` builds the config."""
    mod = family_module(family)
    if family == "t5":
        return mod.T5Config, mod.T5Model
    return mod.LlamaConfig, mod.LlamaModel


def build(family: str, arch: dict, *, injection=None, dtype: str = "float32", param_dtype: str = "float32", rngs):
    """A randomly initialised model of ``family`` from a Hugging Face ``config.json`` dict ``arch``."""
    cfg_cls, model_cls = config_and_model_classes(family)
    return model_cls(cfg_cls.from_hf(dict(arch)), injection=injection, dtype=dtype, param_dtype=param_dtype, rngs=rngs)

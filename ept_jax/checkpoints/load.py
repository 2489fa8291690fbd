"""The one way a model is built: from a Hugging Face checkpoint (or a GGUF file), or randomly from a config;
optionally truncated to its first layers; then adapters injected post hoc (:func:`ept_jax.adapters.inject`).

    model = from_pretrained("google-t5/t5-base", injection=Injection(cfg, targets=("q", "v")))
    model = build("llama", arch_dict, injection=..., rngs=nnx.Rngs(0))

A loaded model is built abstractly and its base weights allocated as zeros before the checkpoint's tensors are
written in (drawing millions of random numbers only to overwrite them costs minutes on a host); adapters are then
initialised for real (or left abstract for an importer that fills them, ``abstract_adapters=True``).
"""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
from flax import nnx

from ept_jax.adapters.inject import Injection, inject
from ept_jax.checkpoints.gguf import layer_index, read_gguf, split_gguf_path
from ept_jax.checkpoints.hf import CheckpointError, load_into, read_config, read_tensors, resolve_model_dir
from ept_jax.core.params import KeyStream
from ept_jax.models import config_and_model_classes
from ept_jax.models.layers import compute_dtype

FAMILIES = {"t5": "t5", "mt5": "t5", "umt5": None, "llama": "llama", "mistral": None}


def family_of(model_type: str) -> str:
    """``"t5"`` or ``"llama"`` for a Hugging Face ``model_type``; a clear error for anything else."""
    fam = FAMILIES.get(model_type)
    if fam is None:
        accepted = sorted(k for k, v in FAMILIES.items() if v)
        raise CheckpointError(f"model_type {model_type!r} is not supported; accepted: {accepted}")
    return fam


def truncated_config(config: dict, num_layers, source: str) -> dict:
    """``config`` (a ``config.json`` dict) with its decoder depth cut to ``num_layers`` (``1 .. num_hidden_layers``)."""
    total = int(config.get("num_hidden_layers", 0))
    if isinstance(num_layers, bool) or not isinstance(num_layers, int) or not 1 <= num_layers <= total:
        raise CheckpointError(f"num_layers={num_layers!r}: {source} has {total} layers; accepted: 1 .. {total}")
    return {**config, "num_hidden_layers": num_layers}


def build(
    family: str,
    arch: dict,
    *,
    injection: Injection | None = None,
    dtype: str = "float32",
    param_dtype: str = "float32",
    scan_layers: bool = True,
    num_layers: int | None = None,
    rngs: nnx.Rngs | KeyStream | None = None,
):
    """A randomly initialised model of ``family`` (``"t5"`` / ``"llama"``) from a ``config.json`` dict ``arch``.

    The base weights draw from ``rngs`` (default ``KeyStream(0)``; use a KeyStream under ``nnx.eval_shape`` / jit),
    then the adapters from its next key. ``num_layers`` cuts a LLaMA model to its first layers.
    """
    cfg_cls, model_cls = config_and_model_classes(family)
    arch = dict(arch)
    if num_layers is not None:
        if family != "llama":
            raise ValueError(f"num_layers={num_layers!r} is supported for the llama family only, not {family!r}")
        arch = truncated_config(arch, num_layers, "the architecture")
    rngs = rngs if rngs is not None else KeyStream(0)
    model = model_cls(cfg_cls.from_hf(arch), dtype=dtype, param_dtype=param_dtype, scan_layers=scan_layers,
                      rngs=rngs)
    return inject(model, injection, rngs=rngs)


def from_pretrained(
    name_or_path: str | os.PathLike,
    *,
    injection: Injection | None = None,
    dtype: str = "float32",
    param_dtype: str = "float32",
    rngs: nnx.Rngs | KeyStream | None = None,
    gguf_file: str | None = None,
    num_layers: int | None = None,
    scan_layers: bool = True,
    abstract_adapters: bool = False,
):
    """Loads a T5- or LLaMA-family checkpoint, strictly, then injects ``injection``'s adapters.

    Args:
      name_or_path: a Hugging Face model directory (``config.json`` + ``model.safetensors``, a sharded index,
        ``flax_model.msgpack`` or ``pytorch_model.bin``), a hub id, or a ``.gguf`` file (LLaMA).
      injection: adapters to inject (targets by short name, e.g. ``q``, ``wi_0``, ``q_proj``, or path pattern).
      dtype / param_dtype: ``"float32"`` or ``"bfloat16"`` (``"float64"`` with ``jax_enable_x64``).
      rngs: keys for the adapters' initialisation (default ``nnx.Rngs(0)``); adapter ``j`` (in construction
        order) gets ``fold_in(rngs.params(), j)``.
      gguf_file: a GGUF file name inside ``name_or_path`` (transformers' convention), instead of a ``.gguf`` path.
      num_layers: LLaMA: build and load only the first this many decoder layers (``1 .. num_hidden_layers``;
        None = all). The other layers' tensors are not read (GGUF: never dequantised; safetensors: never touched
        in the memory map); what is read is loaded as strictly as a full checkpoint. For fast tests and probes.
      abstract_adapters: leave the adapters' values abstract (``jax.ShapeDtypeStruct``) for an importer to fill.
    Raises:
      CheckpointError: no weights, an unsupported config, or a missing / unexpected / wrongly shaped tensor
        (each named).
      ValueError: an unknown dtype or an injection target naming no Linear of the model.
    """
    compute_dtype(dtype, "dtype")
    compute_dtype(param_dtype, "param_dtype")
    if gguf_file is not None and not os.path.isdir(name_or_path):
        name_or_path = resolve_model_dir(name_or_path, allow_patterns=[gguf_file, "*.json"])
    gguf_path = split_gguf_path(name_or_path, gguf_file)
    tensors = None
    if gguf_path is not None:
        config, tensors = read_gguf(gguf_path, num_layers=num_layers)
        source, family = str(gguf_path), "llama"
    else:
        model_dir = resolve_model_dir(name_or_path)
        config, source = read_config(model_dir), str(model_dir)
        family = family_of(config.get("model_type", ""))
        if num_layers is not None:
            if family != "llama":
                raise CheckpointError(f"num_layers={num_layers!r}: supported for the llama family only; {source} "
                                      f"is {family!r}")
            config = truncated_config(config, num_layers, source)
    cfg_cls, model_cls = config_and_model_classes(family)
    try:
        cfg = cfg_cls.from_hf(config)
    except ValueError as e:
        raise CheckpointError(f"{source}: {e}") from e
    if tensors is None:  # read after the config is validated: a bad config fails before any weight is touched
        tensors = read_tensors(model_dir)
        if num_layers is not None:  # safetensors are memory-mapped: dropping the names means never reading them
            tensors = {k: v for k, v in tensors.items() if (layer_index(k) or 0) < num_layers}
    abstract = nnx.eval_shape(
        lambda: model_cls(cfg, dtype=dtype, param_dtype=param_dtype, scan_layers=scan_layers, rngs=KeyStream(0)))
    graphdef, state = nnx.split(abstract)
    model = nnx.merge(graphdef, jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), state))
    rules, ignore = hf_mapping(family, cfg)
    load_into(model, tensors, rules, ignore=ignore, source=source)
    return inject(model, injection, rngs=rngs if rngs is not None else nnx.Rngs(0), abstract=abstract_adapters)


def hf_mapping(family: str, cfg):
    """``(rules, ignore)``: the Hugging Face mapping table of ``family`` for the architecture ``cfg``."""
    if family == "t5":
        from ept_jax.checkpoints import t5_map as m
    else:
        from ept_jax.checkpoints import llama_map as m
    return m.hf_rules(cfg), m.hf_ignore(cfg)

"""Config -> adapter injection -> model (real weights, random init, or abstract shapes)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from flax import nnx

from ept_jax.adapters.config import AdapterConfig
from ept_jax.adapters.inject import Injection
from ept_jax.checkpoints.load import build, from_pretrained
from ept_jax.core.params import KeyStream
from train.errors import UserError

# ConfigDict keys under `adapter` that are not AdapterConfig fields.
INJECTION_KEYS = ("targets", "contrastive_lambda", "contrastive_stacks", "contrastive_divisor", "trex_embedder")


def adapter_config(config) -> AdapterConfig:
    """The :class:`AdapterConfig` of ``config.adapter`` (``n_tasks`` from ``config.data.tasks``).

    Raises:
      ValueError: a key under ``adapter`` that is neither an AdapterConfig field nor an injection key.
    """
    fields = {f.name for f in dataclasses.fields(AdapterConfig)}
    raw = dict(config.adapter)
    unknown = sorted(k for k in raw if k not in fields and k not in INJECTION_KEYS)
    if unknown:
        accepted = sorted(fields - {"n_tasks"}) + list(INJECTION_KEYS)
        raise ValueError(f"unknown adapter option(s) {unknown}; accepted: {accepted}")
    kwargs = {k: v for k, v in raw.items() if k in fields and k != "n_tasks"}
    for k in ("expert_kernel_sizes",):
        if k in kwargs and kwargs[k] is not None:
            kwargs[k] = tuple(kwargs[k])
    return AdapterConfig(**kwargs, n_tasks=len(config.data.tasks))


def injection(config) -> Injection | None:
    """Where adapters go, from ``config.adapter`` (None when ``adapter.kind`` is ``"none"``)."""
    if str(config.adapter.kind) == "none":
        return None
    return Injection(
        adapter=adapter_config(config),
        targets=tuple(config.adapter.targets),
        # no contrastive term (lambda 0, as the release's LLaMA): its per-module losses are not computed at all
        contrastive_stacks=tuple(config.adapter.get("contrastive_stacks", ("encoder",)))
        if float(config.adapter.get("contrastive_lambda", 0.0)) > 0 else (),
    )


def _arch(config) -> dict:
    """The architecture dict: the local checkpoint's config.json when at hand, else ``config.model.arch``."""
    from ept_jax.checkpoints.hf import read_config

    p = Path(str(config.model.name_or_path)).expanduser()
    if (p / "config.json").is_file():
        arch = read_config(p)
    else:
        arch = config.model.get("arch")
        if not arch:
            raise ValueError(
                f"model.name_or_path={str(config.model.name_or_path)!r} has no local config.json and the config "
                "records no model.arch to build the model from"
            )
    return dict(arch)


def model_from_config(config) -> nnx.Module:
    """The model of ``config`` with adapters injected: random base weights from ``model.arch``
    (``model.random_init``) or loaded from ``model.name_or_path``; ``model.num_layers`` cuts a LLaMA model to its
    first layers. Adapters (and random base weights) draw from ``train.seed``.

    Raises UserError (``num_layers`` on a non-LLaMA family), ValueError / CheckpointError naming what is wrong (a
    kernel size the variant cannot use, an unknown target, a model directory without weights, ...).
    """
    family = str(config.model.family)
    num_layers = config.model.get("num_layers")
    if num_layers is not None and family != "llama":
        raise UserError(f"model.num_layers={num_layers!r} is supported for model.family='llama' only, not {family!r}")
    kw = dict(injection=injection(config), dtype=str(config.model.dtype), param_dtype=str(config.model.param_dtype),
              rngs=nnx.Rngs(int(config.train.seed)), num_layers=None if num_layers is None else int(num_layers))
    if config.model.random_init:
        arch = config.model.arch.to_dict() if hasattr(config.model.arch, "to_dict") else dict(config.model.arch)
        return build(family, arch, **kw)
    return from_pretrained(str(config.model.name_or_path), **kw)


def random_model(config, *, rngs: nnx.Rngs | KeyStream | None = None):
    """A randomly initialised model of ``config``'s architecture (``model.num_layers`` applied as
    :func:`model_from_config` applies it), adapters injected (keys from ``train.seed``)."""
    family, num_layers = str(config.model.family), config.model.get("num_layers")
    return build(
        family,
        _arch(config),
        num_layers=None if num_layers is None or family != "llama" else int(num_layers),
        injection=injection(config),
        dtype=str(config.model.dtype),
        param_dtype=str(config.model.param_dtype),
        rngs=rngs or KeyStream(int(config.train.seed)),
    )


def build_abstract_model(config):
    """``(abstract model, n_tasks)``: the model with ``jax.ShapeDtypeStruct`` leaves; nothing allocated or read."""
    model = nnx.eval_shape(lambda: random_model(config, rngs=KeyStream(0)))
    return model, len(config.data.tasks)

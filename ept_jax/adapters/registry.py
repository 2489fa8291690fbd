"""The one place an adapter kind string is read: ``kind -> (class, validator)``, filled from a table of the
built-in kinds and extended with :func:`register_adapter`."""

from __future__ import annotations

from collections.abc import Callable

from flax import nnx

from ept_jax.adapters.base import Adapter
from ept_jax.adapters.config import AdapterConfig, validate_common
from ept_jax.adapters.dcft import DCFTAdapter
from ept_jax.adapters.ept import EPTAdapter
from ept_jax.adapters.lora import LoRAAdapter
from ept_jax.adapters.moelora import MoELoRAAdapter, MOELoRAReleaseAdapter
from ept_jax.adapters.more import MoREAdapter
from ept_jax.adapters.trex import TREXAdapter

AdapterFactory = Callable[..., Adapter]


_REGISTRY: dict[str, tuple[AdapterFactory, Callable[[AdapterConfig, int, int], None] | None]] = {}


def register_adapter(kind: str, validator: Callable[[AdapterConfig, int, int], None] | None = None):
    """Class decorator: registers an adapter class (``cls(cfg, d_in, d_out, *, rngs, axes)``) under ``kind``.

    ``validator(cfg, d_in, d_out)`` runs after the common checks of :func:`validate` and raises ValueError.
    """

    def wrap(cls):
        if kind in _REGISTRY and _REGISTRY[kind][0] is not cls:
            raise ValueError(f"adapter kind {kind!r} is already registered to {_REGISTRY[kind][0].__name__}")
        _REGISTRY[kind] = (cls, validator)
        return cls

    return wrap


BUILTIN_KINDS: dict[str, type[Adapter]] = {
    "ept": EPTAdapter,
    "lora": LoRAAdapter,
    "moelora": MoELoRAAdapter,
    "dcft": DCFTAdapter,
    "more": MoREAdapter,
    "moelora_release": MOELoRAReleaseAdapter,
    "trex": TREXAdapter,
}
_REGISTRY.update({kind: (cls, cls.check) for kind, cls in BUILTIN_KINDS.items()})


def registered_kinds() -> tuple[str, ...]:
    """All adapter kinds :func:`make_adapter` accepts."""
    return tuple(sorted(_REGISTRY))


def validate(cfg: AdapterConfig, d_in: int, d_out: int) -> None:
    """Raises ValueError naming the bad value (and what is accepted) if ``cfg`` cannot adapt ``d_in -> d_out``."""
    kinds = registered_kinds()
    if cfg.kind not in kinds:
        raise ValueError(f"adapter kind={cfg.kind!r} is unknown; accepted: {kinds}")
    validate_common(cfg, d_in, d_out)
    validator = _REGISTRY[cfg.kind][1]
    if validator is not None:
        validator(cfg, d_in, d_out)


def make_adapter(
    cfg: AdapterConfig,
    d_in: int,
    d_out: int,
    *,
    rngs: nnx.Rngs,
    axes: tuple[str | None, str | None] | None = None,
    shared: nnx.Module | None = None,
) -> Adapter:
    """Builds the adapter ``cfg.kind`` for a ``d_in -> d_out`` Linear.

    Args:
      axes: the base kernel's ``(input, output)`` logical axis names; ``A``'s input dimension and ``B``'s output
        dimension take them (None: replicated).
      shared: the model-wide module of kinds that share state across Linears (:func:`make_shared`); None for
        the others.
    Raises:
      ValueError: an unknown kind or a configuration that cannot adapt this Linear (see :func:`validate`).
    """
    validate(cfg, d_in, d_out)
    cls = _REGISTRY[cfg.kind][0]
    if shared is not None:
        return cls(cfg, d_in, d_out, rngs=rngs, axes=axes, shared=shared)
    return cls(cfg, d_in, d_out, rngs=rngs, axes=axes)


def make_shared(cfg: AdapterConfig, *, rngs: nnx.Rngs) -> nnx.Module | None:
    """The module that every adapter of kind ``cfg.kind`` in one model shares, or None for kinds without one.

    A kind declares it with a ``build_shared(cfg, *, rngs)`` classmethod (MOELoRA's release: one task
    embedding and one gate for the whole model). :func:`ept_jax.adapters.inject.inject` calls this once per model
    and hands the result to every :func:`make_adapter` call.
    """
    if cfg.kind not in _REGISTRY:
        return None  # make_adapter reports the unknown kind
    build = getattr(_REGISTRY[cfg.kind][0], "build_shared", None)
    return build(cfg, rngs=rngs) if build is not None else None

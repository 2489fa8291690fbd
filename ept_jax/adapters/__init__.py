"""Adapters: EPT (both variants) and the systems it is compared with, applied post hoc to a built, plain model.

* :mod:`~ept_jax.adapters.base`: the :class:`Adapter` interface, :class:`AdaptedLinear` (a frozen Linear plus an
  adapter) and the checks and initialisers every kind shares;
* :mod:`~ept_jax.adapters.config`: :class:`AdapterConfig` (frozen, hashable) and the common checks;
* :mod:`~ept_jax.adapters.registry`: ``kind -> class``, the one place a kind string is read;
* :mod:`~ept_jax.adapters.inject`: :func:`inject` (targets by short name or path pattern);
* the kinds: :mod:`~ept_jax.adapters.ept` (its math in :mod:`~ept_jax.adapters.pyramid` and
  :mod:`~ept_jax.adapters.pyramid_fast`), :mod:`~ept_jax.adapters.lora`, :mod:`~ept_jax.adapters.moelora`,
  :mod:`~ept_jax.adapters.dcft`, :mod:`~ept_jax.adapters.more`, :mod:`~ept_jax.adapters.trex`.
"""

from ept_jax.adapters.base import (
    AdaptedLinear,
    Adapter,
    ab_init_spec,
    adapted_linears,
    adapter_axes,
    check_input,
    check_task,
    count_params,
    draw_params,
    shape_bound,
)
from ept_jax.adapters.config import (
    FORWARD_PATHS,
    INITS,
    KERNEL_INITS,
    VARIANTS,
    ZERO_INITS,
    AdapterConfig,
    dtype_of,
    validate_common,
)
from ept_jax.adapters.dcft import DCFTAdapter
from ept_jax.adapters.ept import EPTAdapter, validate_ept
from ept_jax.adapters.inject import Injection, inject
from ept_jax.adapters.lora import LoRAAdapter
from ept_jax.adapters.moelora import MoELoRAAdapter, MOELoRAReleaseAdapter, MOELoRARouter
from ept_jax.adapters.more import MoREAdapter
from ept_jax.adapters.registry import (
    BUILTIN_KINDS,
    make_adapter,
    make_shared,
    register_adapter,
    registered_kinds,
    validate,
)
from ept_jax.adapters.trex import TREXAdapter

__all__ = [
    "BUILTIN_KINDS", "FORWARD_PATHS", "INITS", "KERNEL_INITS", "VARIANTS", "ZERO_INITS", "AdaptedLinear", "Adapter",
    "AdapterConfig", "DCFTAdapter", "EPTAdapter", "Injection", "LoRAAdapter", "MOELoRAReleaseAdapter",
    "MOELoRARouter", "MoELoRAAdapter", "MoREAdapter", "TREXAdapter", "ab_init_spec", "adapted_linears",
    "adapter_axes", "check_input", "check_task", "count_params", "draw_params", "dtype_of", "inject",
    "make_adapter", "make_shared", "register_adapter", "registered_kinds", "shape_bound", "validate",
    "validate_common", "validate_ept",
]

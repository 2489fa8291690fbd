"""Identical layers of a model run as one ``jax.lax.scan``.

The models unroll their layers in Python, so a training step compiles every layer's forward and backward
separately: for SmolLM2-135M with EPT on all seven Linears, 30 copies of a layer with ~7 adapters, each a few
dozen small kernels. :func:`run_layers` traces one layer instead and scans it over the layers, which is the same
computation: the same ops per layer in the same order, and the same dropout masks, because an adapted Linear
folds ``index + ctx.index_offset`` into the dropout key and the scan passes ``offset = layer * (indices per
layer)``, the unrolled model's indices (checked).

Layers qualify when they are the same program: equal graph structure (module types, static attributes,
Variable types, shapes and dtypes) except each :class:`~ept_jax.adapters.base.AdaptedLinear`'s ``name`` (not read in the
forward) and ``index`` (which must step by the same amount from layer to layer). Otherwise, with fewer than two
layers, with a KV cache or with ``enabled=False``, the layers run unrolled as before.

What the scan iterates over:

* the adapters' trainable leaves (:data:`~ept_jax.core.params.TRAINABLE`) are stacked (``jnp.stack`` inside the jitted
  function; the gradient of a layer's leaf is its slice of the stacked gradient): small;
* the frozen leaves (base kernels, norms) are *selected*, not stacked: iteration ``i`` takes layer ``i``'s arrays
  with ``jax.lax.switch`` (one branch per layer), and the body is a ``jax.checkpoint`` whose policy
  (:func:`_saveable`) recomputes the selection (and reshapes, casts and transposes of it) in the backward pass
  instead of saving it per iteration. A stack of the frozen weights would be a copy of all of them living
  through the backward pass (measured on SmolLM2-135M, float32: XLA temporaries +453 MiB for the frozen forward
  and backward, +251 MiB for the LoRA step); selected, the scanned steps' temporaries are -21..+8 % of the
  unrolled ones (T5-small and SmolLM2, limit, LoRA and EPT steps; :mod:`benchmarks` records them). The price
  is a copy of one layer's frozen weights per iteration into the switch's result, forward and backward, and on
  a GPU a conditional per iteration (not measured here: no GPU was available).

Auxiliary losses (:class:`~ept_jax.core.params.AuxLoss`, EPT's contrastive loss) sown inside the scan are re-sown, one
scalar per layer and loss, on the ``owner`` module, so :func:`ept_jax.core.params.pop_aux_losses` returns the same
set of
values (in another order; the trainer averages them).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from ept_jax.adapters.base import AdaptedLinear
from ept_jax.core.params import TRAINABLE, AdapterContext, AuxLoss

#: attributes of an AdaptedLinear that may differ between scanned layers (see the module docstring)
_PER_LAYER = ("name", "index")

#: primitives whose outputs the backward pass recomputes instead of saving (see the module docstring): the
#: selection of a layer's frozen weights and the free or cheap rearrangements that may follow it
_RECOMPUTED = frozenset({"cond", "convert_element_type", "copy", "copy_p", "transpose", "reshape", "squeeze",
                         "expand_dims", "broadcast_in_dim", "name"})


def _saveable(prim, *_, **__) -> bool:
    """The ``jax.checkpoint`` policy of a scanned layer: save every residual except :data:`_RECOMPUTED` outputs."""
    return prim.name not in _RECOMPUTED


def _static(value) -> Any:
    if isinstance(value, (jax.Array, np.ndarray)):
        return ("array", value.shape, str(value.dtype))
    return repr(value)


def _signature(layer: nnx.Module) -> list:
    """Everything about ``layer``'s program except the per-layer AdaptedLinear attributes."""
    sig = []
    for path, node in nnx.iter_graph(layer):
        if isinstance(node, nnx.Variable):
            v = node.get_value() if hasattr(node, "get_value") else node.value
            sig.append((path, type(node).__name__, getattr(v, "shape", None), str(getattr(v, "dtype", type(v)))))
        elif isinstance(node, nnx.Module):
            skip = _PER_LAYER if isinstance(node, AdaptedLinear) else ()
            statics = sorted((k, _static(v)) for k, v in vars(node).items()
                             if not k.startswith("_") and k not in skip
                             and not isinstance(v, (nnx.Variable, nnx.Module)))
            sig.append((path, type(node).__qualname__, tuple(statics)))
        else:
            sig.append((path, type(node).__qualname__))
    return sig


def scan_plan(layers: Sequence[nnx.Module]) -> tuple[Any, int] | None:
    """``(graphdef, index_step)`` when ``layers`` can run as one scan (see the module docstring), else None."""
    if len(layers) < 2:
        return None
    adapted = [[m for _, m in nnx.iter_graph(layer) if isinstance(m, AdaptedLinear)] for layer in layers]
    first = adapted[0]
    if any(len(a) != len(first) for a in adapted):
        return None
    step = adapted[1][0].index - first[0].index if first else 0
    for i, a in enumerate(adapted):
        if any(m.index != m0.index + i * step for m, m0 in zip(a, first, strict=True)):
            return None
    graphdefs = [nnx.graphdef(layer) for layer in layers]
    if any(g.nodes != graphdefs[0].nodes for g in graphdefs[1:]):
        return None
    sig = _signature(layers[0])
    if any(_signature(layer) != sig for layer in layers[1:]):
        return None
    return graphdefs[0], step


def run_layers(
    layers: Sequence[nnx.Module],
    h: jax.Array,
    ctx: AdapterContext | None,
    apply: Callable[[nnx.Module, jax.Array, AdapterContext | None], jax.Array],
    *,
    owner: nnx.Module,
    enabled: bool = True,
) -> jax.Array:
    """``h`` through every layer in order, ``h = apply(layer, h, ctx)``: one ``jax.lax.scan`` when possible.

    Args:
      layers: the layers, first to last.
      apply: runs one layer (closing over what all layers share: masks, rotary tables, position bias).
      owner: the module the scanned layers' auxiliary losses are sown on.
      enabled: False always unrolls.
    """
    plan = scan_plan(layers) if enabled else None
    if plan is None:
        for layer in layers:
            h = apply(layer, h, ctx)
        return h
    _, step = plan
    splits = [nnx.split(layer, TRAINABLE, ...) for layer in layers]
    graphdef, frozen_def = splits[0][0], jax.tree.structure(splits[0][2])
    trainable = jax.tree.map(lambda *xs: jnp.stack(xs), *(s[1] for s in splits))
    # one branch per layer returning that layer's frozen leaves: selected, never stacked (see the module docstring)
    branches = [lambda leaves=jax.tree.leaves(s[2]): leaves for s in splits]

    def body(h, xs):
        tr, i = xs
        frozen = jax.tree.unflatten(frozen_def, jax.lax.switch(i, branches))
        layer = nnx.merge(graphdef, tr, frozen)
        c = ctx
        if ctx is not None and ctx.dropout_rng is not None:
            base = 0 if ctx.index_offset is None else ctx.index_offset
            c = ctx.replace(index_offset=base + i * step)
        h = apply(layer, h, c)
        return h, jax.tree.leaves(nnx.pop(layer, AuxLoss))

    body = jax.checkpoint(body, prevent_cse=False, policy=_saveable)
    h, aux = jax.lax.scan(body, h, (trainable, jnp.arange(len(layers), dtype=jnp.int32)))
    for values in aux:
        for i in range(len(layers)):
            owner.sow(AuxLoss, "scanned_layers", values[i])
    return h


def set_scan_layers(model: nnx.Module, enabled: bool) -> None:
    """Turns the layer scan on or off in every module of ``model`` that has a ``scan_layers`` switch (call it
    outside of any jit trace)."""
    for _, node in nnx.iter_graph(model):
        if isinstance(node, nnx.Module) and hasattr(node, "scan_layers"):
            node.scan_layers = bool(enabled)

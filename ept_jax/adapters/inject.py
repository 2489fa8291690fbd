"""Adapters applied to a built, plain model (post hoc, as qwix / Levanter / PEFT do).

A model is built from its config with frozen :class:`~ept_jax.core.linear.Linear` s only; :func:`inject` then
replaces, in place, every Linear whose path matches a target with an
:class:`~ept_jax.adapters.base.AdaptedLinear` (the same Linear plus an adapter). A target is a Linear's short name
(``q``, ``wi_0``, ``q_proj`` ...: every Linear of that name) or a regular expression matched against the whole
Hugging Face path (``encoder\\.block\\.0\\..*\\.q``, ``.*(q_proj|v_proj)``). Linears a model lists in
``never_adapted`` (the output projection ``lm_head``) are never candidates.

Determinism: the Linears are visited in construction order (the order of the modules' attributes and list
items); adapter ``j`` in that order gets ``index = j`` (folded into the dropout key) and is initialised from
``fold_in(key, j)``; the model-wide state of kinds that share one (MOELoRA's router) from
``fold_in(key, n_adapters)``.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Iterator

import jax
from flax import nnx

from ept_jax.adapters.base import AdaptedLinear
from ept_jax.adapters.config import AdapterConfig
from ept_jax.adapters.registry import make_adapter, make_shared
from ept_jax.core.linear import Linear
from ept_jax.core.params import KeyStream, logical_axes


@dataclasses.dataclass(frozen=True)
class Injection:
    """Where adapters go and which: ``targets`` (short names or path patterns, see the module docstring), the
    adapter config, and the stacks (``encoder``, ``decoder``) whose adapted Linears' contrastive losses count."""

    adapter: AdapterConfig
    targets: tuple[str, ...]
    contrastive_stacks: tuple[str, ...] = ("encoder",)


def _walk(node, path: tuple) -> Iterator[tuple[object, object, tuple]]:
    """``(parent, slot, path)`` of every frozen Linear under ``node``, in construction order."""
    if isinstance(node, nnx.List):
        for i in range(len(node)):
            child = node[i]
            if isinstance(child, Linear):
                yield node, i, path + (i,)
            elif isinstance(child, nnx.Module):
                yield from _walk(child, path + (i,))
        return
    for name, child in vars(node).items():
        if name.startswith("_"):
            continue
        if isinstance(child, Linear):
            yield node, name, path + (name,)
        elif isinstance(child, nnx.Module) and not isinstance(child, AdaptedLinear):
            yield from _walk(child, path + (name,))


def linears(model: nnx.Module) -> list[tuple[object, object, str]]:
    """``(parent, slot, "dotted.hf.path")`` of every frozen Linear of ``model`` an adapter may target, in
    construction order."""
    never = set(getattr(model, "never_adapted", ()))
    out = []
    for parent, slot, path in _walk(model, ()):
        p = ".".join(str(x) for x in path)
        if p not in never:
            out.append((parent, slot, p))
    return out


def matches(target: str, path: str) -> bool:
    """Whether ``target`` (a short name or a full-path regular expression) selects the Linear at ``path``."""
    if target == path.rsplit(".", 1)[-1]:
        return True
    try:
        return re.fullmatch(target, path) is not None
    except re.error:
        return False


def _key(rngs) -> jax.Array:
    if rngs is None:
        return jax.random.key(0)
    if isinstance(rngs, int):
        return jax.random.key(rngs)
    if hasattr(rngs, "params"):
        return rngs.params()
    return rngs


def inject(model: nnx.Module, injection: Injection | None, *, rngs=None, abstract: bool = False) -> nnx.Module:
    """Replaces, in place, the Linears of ``model`` that ``injection`` targets with adapted ones; returns ``model``.

    Args:
      model: a built model whose Linears are frozen :class:`~ept_jax.core.linear.Linear` s; it may say which
        stack a path is in with ``stack_of(path)`` (default ``"decoder"``) and list ``never_adapted`` paths.
      injection: targets and adapter config; None leaves the model as it is.
      rngs: the adapters' initialisation key: ``nnx.Rngs`` / :class:`~ept_jax.core.params.KeyStream` (one
        ``params()`` draw), an int seed, a PRNG key, or None (seed 0).
      abstract: build the adapters with ``jax.ShapeDtypeStruct`` values (nothing drawn or allocated), for an
        importer that fills every adapter parameter (the release's adapters, :mod:`ept_jax.checkpoints.reference`).
    Raises:
      ValueError: a target that selects no Linear (the accepted short names are listed), or a config that cannot
        adapt a selected Linear.
    """
    if injection is None:
        return model
    candidates = linears(model)
    unknown = [t for t in injection.targets if not any(matches(t, p) for _, _, p in candidates)]
    if unknown:
        names = sorted({p.rsplit(".", 1)[-1] for _, _, p in candidates})
        raise ValueError(f"adapter target(s) {unknown} name no Linear of this model; accepted: {names}")
    chosen = [c for c in candidates if any(matches(t, c[2]) for t in injection.targets)]
    key = _key(rngs)
    stack_of = getattr(model, "stack_of", lambda path: "decoder")
    def build(fn):
        return nnx.eval_shape(fn) if abstract else fn()

    cfg = injection.adapter
    shared = build(lambda: make_shared(cfg, rngs=KeyStream(jax.random.fold_in(key, len(chosen)))))
    for j, (parent, slot, path) in enumerate(chosen):
        base = parent[slot] if isinstance(parent, nnx.List) else getattr(parent, slot)
        adapter = build(lambda j=j, base=base: make_adapter(
            cfg, base.d_in, base.d_out, rngs=KeyStream(jax.random.fold_in(key, j)),
            axes=tuple(logical_axes(base.kernel)), shared=shared))
        stack = stack_of(path)
        lin = AdaptedLinear(base, adapter, name=path, stack=stack,
                            contrastive=stack in injection.contrastive_stacks, index=j)
        if isinstance(parent, nnx.List):
            parent[slot] = lin
        else:
            setattr(parent, slot, lin)
    return model

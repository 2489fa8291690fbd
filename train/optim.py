"""The optimizer as the EPT release trains: PyTorch's gradient clipping and AdamW, in optax.

The release's trainer (its vendored transformers 4.41 ``Trainer``, ``optim="adamw_torch"``) clips with
``torch.nn.utils.clip_grad_norm_`` and steps ``torch.optim.AdamW``. Two of their behaviours differ from
``optax.clip_by_global_norm`` + ``optax.adamw``:

* **Clipping** multiplies every gradient by ``min(1, max_norm / (norm + 1e-6))`` (optax: ``max_norm / norm``
  when ``norm > max_norm``). :func:`clip_by_global_norm_torch`.
* **Parameters without a gradient are not stepped.** PyTorch leaves ``.grad`` at None for a tensor the forward
  did not use, and AdamW then skips it entirely: no weight decay, no moment update, and no step count, so its
  bias correction runs on its own count. In EPT that is every expert kernel that no route chose in that step
  (the release's ``adam_step_counts_final`` differ per kernel). JAX has no "no gradient": the training step
  tells :func:`adamw_torch` which leaves the forward used (``active``, a tree of booleans like the parameters;
  ``train.unrouted_experts="skip"``). Without it every leaf is stepped, as in ``optax.adamw``.

Both work leaf by leaf or on leaves stacked by shape (:mod:`train.stacking`): per-leaf scalars (step counts,
``active``) are stacked to ``(n_group,)`` vectors and broadcast against the ``(n_group, *shape)`` stacks.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

Array = jax.Array

# ``torch.nn.utils.clip_grad_norm_`` adds this to the norm before dividing.
TORCH_CLIP_EPS = 1e-6


def clip_by_global_norm_torch(max_norm: float, eps: float = TORCH_CLIP_EPS) -> optax.GradientTransformation:
    """``g * min(1, max_norm / (||g|| + eps))`` over the whole tree (``torch.nn.utils.clip_grad_norm_``).

    Raises:
      ValueError: ``max_norm <= 0``.
    """
    if not max_norm > 0:
        raise ValueError(f"max_norm={max_norm!r}: must be > 0 (0 means no clipping: leave the transformation out)")

    def init(params):
        del params
        return optax.EmptyState()

    def update(updates, state, params=None):
        del params
        norm = optax.global_norm(updates)
        coef = jnp.minimum(1.0, max_norm / (norm + eps))
        return jax.tree.map(lambda g: (g * coef.astype(g.dtype)).astype(g.dtype), updates), state

    return optax.GradientTransformation(init, update)


class AdamWTorchState(NamedTuple):
    """State of :func:`adamw_torch`.

    Attributes:
      count: ``()`` int32, optimizer steps taken (the learning-rate schedule's argument).
      counts: per leaf, ``()`` int32: the steps that leaf took (its bias correction).
      mu, nu: first and second moments, like the parameters.
    """

    count: Array
    counts: Any
    mu: Any
    nu: Any


def _bcast(x: Array, like: Array) -> Array:
    """A per-leaf scalar (``()``) or per-stack vector (``(n,)``) shaped to broadcast against ``like``."""
    return x.reshape(x.shape + (1,) * (like.ndim - x.ndim))


def adamw_torch(
    learning_rate: optax.ScalarOrSchedule,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    weight_decay: float = 0.0,
    mask: Any = None,
    lr_scale: Any = None,
) -> optax.GradientTransformationExtraArgs:
    """``torch.optim.AdamW`` with per-leaf step counts; leaves marked inactive are not stepped at all.

    Per active leaf with step count ``n`` (after this step) and learning rate ``lr = learning_rate(count) * s``
    (``s`` the leaf's ``lr_scale``, 1 by default: PyTorch's parameter groups with their own ``lr``)::

        p <- p * (1 - lr * wd)          (wd = weight_decay where ``mask`` is True, else 0)
        m <- b1 * m + (1 - b1) * g
        v <- b2 * v + (1 - b2) * g^2
        p <- p - lr / (1 - b1^n) * m / (sqrt(v) / sqrt(1 - b2^n) + eps)

    An inactive leaf keeps its value, moments and count. The update returned is the change of the parameters
    (apply it with ``optax.apply_updates``).

    Args:
      learning_rate: a float or an optax schedule of the global step count (0-based: the first step uses
        ``learning_rate(0)``).
      mask: a tree of booleans like the parameters (or a callable of the parameters returning one): weight
        decay where True.
      lr_scale: a tree of floats like the parameters (or a callable of the parameters returning one): each
        leaf's learning-rate multiplier; None = 1 everywhere.
    Extra args of ``update``:
      active: a tree of booleans like the parameters (per-leaf ``()``, per-stack ``(n,)``), or None (all).
    """

    def init(params):
        zeros = jax.tree.map(jnp.zeros_like, params)
        return AdamWTorchState(
            count=jnp.zeros((), jnp.int32),
            counts=jax.tree.map(lambda _: jnp.zeros((), jnp.int32), params),
            mu=zeros,
            nu=jax.tree.map(jnp.zeros_like, params),
        )

    def update(updates, state, params=None, *, active=None, **extra):
        del extra
        if params is None:
            raise ValueError("adamw_torch needs the parameters (weight decay): call update(grads, state, params)")
        lr = learning_rate(state.count) if callable(learning_rate) else learning_rate
        decay = mask(params) if callable(mask) else mask
        if decay is None:
            decay = jax.tree.map(lambda _: True, params)
        if active is None:
            active = jax.tree.map(lambda c: jnp.ones(c.shape, bool), state.counts)
        scale = lr_scale(params) if callable(lr_scale) else lr_scale
        if scale is None:
            scale = jax.tree.map(lambda _: 1.0, params)

        hp = jnp.result_type(float)  # the scalars' dtype: float64 with jax_enable_x64 (PyTorch: Python floats)

        def leaf(g, p, m, v, n, on, wd_on, sc):
            dt = p.dtype
            on_b = _bcast(on, p)
            n_new = n + on.astype(n.dtype)
            nb = _bcast(jnp.maximum(n_new, 1), p).astype(hp)
            lr_ = jnp.asarray(lr, hp) * sc if sc != 1.0 else jnp.asarray(lr, hp)
            g = g.astype(dt)
            m_new = b1 * m + (1 - b1) * g
            v_new = b2 * v + (1 - b2) * g * g
            wd = jnp.where(_bcast(jnp.asarray(wd_on), p), jnp.asarray(weight_decay, hp), jnp.zeros((), hp))
            decayed = p * (1 - lr_ * wd).astype(dt)
            # 1 - b^n as -expm1(n log(1 - (1 - b))): in float32, 1 - 0.999**n loses ~1e-5 of its value to
            # cancellation at small n, which every update then carries (PyTorch computes it in float64)
            bc1 = -jnp.expm1(nb * jnp.log1p(jnp.asarray(-(1 - b1), hp)))
            bc2_sqrt = jnp.sqrt(-jnp.expm1(nb * jnp.log1p(jnp.asarray(-(1 - b2), hp))))
            step_size = (lr_ / bc1).astype(dt)
            new_p = decayed - step_size * m_new / (jnp.sqrt(v_new) / bc2_sqrt.astype(dt) + eps)
            return (jnp.where(on_b, new_p - p, jnp.zeros_like(p)), jnp.where(on_b, m_new, m),
                    jnp.where(on_b, v_new, v), n_new)

        treedef = jax.tree.structure(params)
        flat = [treedef.flatten_up_to(t) for t in (updates, params, state.mu, state.nu, state.counts, active)]
        flat_decay = treedef.flatten_up_to(decay)
        flat_scale = [float(x) for x in treedef.flatten_up_to(scale)]
        out = [leaf(*xs, wd, sc) for *xs, wd, sc in zip(*flat, flat_decay, flat_scale, strict=True)]
        new_updates, mu, nu, counts = (jax.tree.unflatten(treedef, [o[i] for o in out]) for i in range(4))
        return new_updates, AdamWTorchState(count=optax.safe_increment(state.count), counts=counts, mu=mu, nu=nu)

    return optax.GradientTransformationExtraArgs(init, update)


def find_adamw_state(opt_state) -> AdamWTorchState:
    """The :class:`AdamWTorchState` inside an optimizer state (e.g. ``train.state.make_optimizer``'s chain).

    Raises:
      ValueError: there is none.
    """
    found = [s for s in jax.tree.leaves(opt_state, is_leaf=lambda x: isinstance(x, AdamWTorchState))
             if isinstance(s, AdamWTorchState)]
    if len(found) != 1:
        raise ValueError(f"expected one adamw_torch state in the optimizer state, found {len(found)}")
    return found[0]

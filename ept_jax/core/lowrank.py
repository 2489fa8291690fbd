"""Low-rank products on activations with a hand-written backward: ``y = (x @ P) @ Q`` (shared or per-example Q).

Every adapter fast path (LoRA; EPT's expansions, :func:`ept_jax.adapters.pyramid_fast.forward_fast`) is two thin
matmuls on the activations. Their automatic transpose computes the first factor's gradient as
``x.T @ (g @ Q.T)``: the big activation ``x (T, d_in)`` is the *left* operand contracted over its major (token)
axis, and XLA's CPU backend materialises ``x.T`` for it, fusing whatever produced ``x`` (dropout's random bits,
an activation's derivative) into that strided copy; on a 2-core CPU this made the T5-small LoRA step (rank 8,
dropout 0.1) about 1.5 x slower than with the backward below (see the README's Benchmarks section). The
backward forms ``(G.T @ x).T`` instead: the small ``G (T, r)`` is transposed, the big operand is read in its
natural ``[K, N]`` layout. The values are the same products in another order (tested to
float64 rounding against ``jax.grad`` of the plain expressions); on accelerators both forms are native.

Shapes: ``T`` tokens (all leading axes flattened), ``B`` batch, ``S`` tokens per example, ``d_in``/``d_out`` the
Linear's widths, ``r`` the inner rank.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

Array = jax.Array


def _contract(a: Array, b: Array, ca: int, cb: int) -> Array:
    """``dot_general`` of two 2-D arrays contracting axis ``ca`` of ``a`` with axis ``cb`` of ``b``."""
    return lax.dot_general(a, b, (((ca,), (cb,)), ((), ())))


def _check(x: Array, p: Array, q: Array, q_ndim: int) -> None:
    if p.ndim != 2 or x.shape[-1] != p.shape[0]:
        raise ValueError(f"low-rank product: x {x.shape} and P {p.shape} do not chain (expected P (d_in, r))")
    if q.ndim != q_ndim or q.shape[-2] != p.shape[1]:
        want = "(r, d_out)" if q_ndim == 2 else "(B, r, d_out)"
        raise ValueError(f"low-rank product: P {p.shape} and Q {q.shape} do not chain (expected Q {want})")


@jax.custom_vjp
def _lowrank_2d(x: Array, p: Array, q: Array) -> Array:
    return (x @ p) @ q


def _lowrank_2d_fwd(x, p, q):
    v = x @ p
    return v @ q, (x, p, q, v)


def _lowrank_2d_bwd(res, g):
    x, p, q, v = res
    gv = _contract(g, q, 1, 1)  # (T, r)
    return _contract(gv, p, 1, 1), _contract(gv, x, 0, 0).T, _contract(v, g, 0, 0)


_lowrank_2d.defvjp(_lowrank_2d_fwd, _lowrank_2d_bwd)


def lowrank(x: Array, p: Array, q: Array) -> Array:
    """``(x @ p) @ q``: ``x (..., d_in)``, ``p (d_in, r)``, ``q (r, d_out)`` -> ``(..., d_out)``; one dtype.

    Raises:
      ValueError: shapes that do not chain.
    """
    _check(x, p, q, 2)
    lead = x.shape[:-1]
    return _lowrank_2d(x.reshape(-1, x.shape[-1]), p, q).reshape(*lead, q.shape[-1])


@jax.custom_vjp
def _lowrank_batched(x: Array, p: Array, q: Array) -> Array:
    return jnp.einsum("bsq,bqo->bso", x @ p, q)


def _lowrank_batched_fwd(x, p, q):
    v = x @ p  # (B, S, r)
    return jnp.einsum("bsq,bqo->bso", v, q), (x, p, q, v)


def _lowrank_batched_bwd(res, g):
    x, p, q, v = res
    gv = jnp.einsum("bso,bqo->bsq", g, q)  # (B, S, r)
    dq = jnp.einsum("bsq,bso->bqo", v, g)  # per example: small v transposed, g read as [K, N]
    t = x.shape[0] * x.shape[1]
    gv2 = gv.reshape(t, gv.shape[-1])
    dp = _contract(gv2, x.reshape(t, x.shape[-1]), 0, 0).T
    return _contract(gv2, p, 1, 1).reshape(x.shape), dp, dq


_lowrank_batched.defvjp(_lowrank_batched_fwd, _lowrank_batched_bwd)


def lowrank_per_example(x: Array, p: Array, q: Array) -> Array:
    """``y[b] = (x[b] @ p) @ q[b]``: ``x (B, ..., d_in)``, ``p (d_in, r)``, ``q (B, r, d_out)`` -> ``(B, ..., d_out)``.

    Raises:
      ValueError: shapes that do not chain, or ``q``'s batch not ``x``'s.
    """
    _check(x, p, q, 3)
    if x.ndim < 2 or q.shape[0] != x.shape[0]:
        raise ValueError(f"low-rank product: per-example Q {q.shape} does not match the batch of x {x.shape}")
    lead = x.shape[:-1]
    x3 = x.reshape(x.shape[0], -1, x.shape[-1])
    return _lowrank_batched(x3, p, q).reshape(*lead, q.shape[-1])


@jax.custom_vjp
def _lowrank_both(x: Array, pt: Array, q: Array) -> Array:
    return jnp.einsum("bsr,bro->bso", jnp.einsum("bsm,brm->bsr", x, pt), q)


def _lowrank_both_fwd(x, pt, q):
    v = jnp.einsum("bsm,brm->bsr", x, pt)  # (B, S, r)
    return jnp.einsum("bsr,bro->bso", v, q), (x, pt, q, v)


def _lowrank_both_bwd(res, g):
    x, pt, q, v = res
    gv = jnp.einsum("bso,bro->bsr", g, q)  # (B, S, r)
    dq = jnp.einsum("bsr,bso->bro", v, g)  # per example: small v transposed, g read as [K, N]
    dpt = jnp.einsum("bsr,bsm->brm", gv, x)  # likewise: x is never transposed
    return jnp.einsum("bsr,brm->bsm", gv, pt), dpt, dq


_lowrank_both.defvjp(_lowrank_both_fwd, _lowrank_both_bwd)


def lowrank_both_per_example(x: Array, pt: Array, q: Array) -> Array:
    """``y[b] = (x[b] @ pt[b].T) @ q[b]``: ``x (B, ..., d_in)``, ``pt (B, r, d_in)``, ``q (B, r, d_out)``.

    Both factors per example (``pt`` in the layout of a LoRA ``A``); the backward reads ``x`` untransposed, as
    :func:`lowrank` does.

    Raises:
      ValueError: shapes that do not chain, or factors whose batch is not ``x``'s.
    """
    if pt.ndim != 3 or q.ndim != 3 or x.ndim < 2:
        raise ValueError(
            f"low-rank product: x {x.shape}, P.T {pt.shape}, Q {q.shape}: expected x (B, ..., d_in), "
            "P.T (B, r, d_in) and Q (B, r, d_out)"
        )
    if pt.shape[2] != x.shape[-1] or pt.shape[1] != q.shape[1] or not x.shape[0] == pt.shape[0] == q.shape[0]:
        raise ValueError(f"low-rank product: x {x.shape}, P.T {pt.shape} and Q {q.shape} do not chain")
    lead = x.shape[:-1]
    x3 = x.reshape(x.shape[0], -1, x.shape[-1])
    return _lowrank_both(x3, pt, q).reshape(*lead, q.shape[-1])


@jax.custom_vjp
def _thin_2d(a: Array, b: Array) -> Array:
    return a @ b


def _thin_2d_fwd(a, b):
    return a @ b, (a, b)


def _thin_2d_bwd(res, g):
    a, b = res
    # b's gradient a.T @ g with the thinner of a (T, K) and g (T, N) as the transposed operand, the big one read
    # in its natural [K, N] layout
    db = _contract(a, g, 0, 0) if a.shape[1] <= g.shape[1] else _contract(g, a, 0, 0).T
    return _contract(g, b, 1, 1), db


_thin_2d.defvjp(_thin_2d_fwd, _thin_2d_bwd)


def thin_matmul(a: Array, b: Array) -> Array:
    """``a @ b`` for ``a (..., K)`` and ``b (K, N)`` with ``K`` or ``N`` small (a projection to or from a thin
    width): the backward forms ``b``'s gradient with the thin operand transposed, so neither the big activation
    nor the big cotangent is (left to autodiff, XLA's CPU backend may transpose either; see the module docstring).

    Raises:
      ValueError: shapes that do not chain.
    """
    if b.ndim != 2 or a.shape[-1] != b.shape[0]:
        raise ValueError(f"thin matmul: a {a.shape} and b {b.shape} do not chain (expected b (K, N))")
    lead = a.shape[:-1]
    return _thin_2d(a.reshape(-1, a.shape[-1]), b).reshape(*lead, b.shape[1])

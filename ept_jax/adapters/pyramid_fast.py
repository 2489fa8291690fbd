"""EPT's fast training paths: the adapter output of :mod:`ept_jax.adapters.pyramid`'s formula, never materialising
``dW``.

:mod:`ept_jax.adapters.pyramid` states the method (ALP slices, both expansions, routing, the materialised deltas); this
module computes the same ``y[b] = x[b] @ dW[t_b].T`` in the order that is cheap on activations, exact to rounding
(``tests/unit/test_pyramid_fast.py`` checks values and every parameter gradient against the definitions).

* Reference expansion (:func:`reference_fused_factors`, :func:`reference_routed_factors`): two thin matmuls on the
  activations, factors built from parameter-sized banks; with top-k routing only each example's routed experts.
* Paper expansion (:func:`paper_forward`): small kernel sizes in one dense low-rank product with Kronecker
  factors ``(A_g (x) I_k)`` (:func:`paper_dense_factors`); each larger ``k``, with ``x`` viewed as ``(m, k)``,
  ``y = B_g @ ((A_g @ X) @ Keff^T)``: one transpose of ``x`` and of ``y`` per kernel size and thin products whose
  hand-written backward keeps the big operands in their layout. (Tried and not kept: permuting ``x`` once per
  chain of kernel sizes that divide each other, so every size's view is contiguous. XLA's CPU pipeline drops
  ``optimization_barrier`` and fuses the permutation, with whatever produced ``x``, into every group's read
  anyway, so the copies stay one per kernel size; a gather instead of the transpose was slower still.)
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from ept_jax.adapters.pyramid import Pyramid, effective_kernel, expert_seed, group_seed, reference_expert_factors
from ept_jax.core.lowrank import lowrank_both_per_example, lowrank_per_example, thin_matmul

Array = jax.Array


# ----------------------------------------------------------------------------------------------------------
# Reference expansion.
# ----------------------------------------------------------------------------------------------------------


def _reference_banks(p: Pyramid, A, B, kernels: Sequence[Array], dtype) -> tuple[Array, Array]:
    """Every expert's exact factors (:func:`reference_expert_factors`) stacked as parameter-sized banks.

    ``a_bank[e] = [A_e, 0] (r, M)``: expert ``e``'s seed slice zero-padded to ``M = d_in // k_min`` columns, in
    ``A``'s layout (a low-rank product's backward then yields its gradient in that layout, no transposes), and
    ``bank[e] = F_B.T (r, d_out)``, ``bank[e, q, c*k + j] = K_e[c, j] * B_e[c, q]``: the expansion of the seed's
    rows by the expert's kernel.

    Returns:
      ``a_bank (n_experts, r, M)`` and ``bank (n_experts, r, d_out)``, in ``dtype``.
    """
    width = max(p.d_in // k for k in p.kernel_sizes)
    # F_A padded to ``width`` columns (not d_in) is [A_e, 0] of the bank: the factors are exact for any width >= m
    factors = [
        reference_expert_factors(*expert_seed(p, A, B, e), kernels[e], width, p.d_out) for e in range(p.n_experts)
    ]
    a_bank = jnp.stack([f_a for _, f_a in factors])
    bank = jnp.swapaxes(jnp.stack([f_b for f_b, _ in factors]), 1, 2)
    return a_bank.astype(dtype), bank.astype(dtype)


def reference_fused_factors(p: Pyramid, A, B, kernels: Sequence[Array], weights: Array) -> tuple[Array, Array]:
    """The reference fast path's two factors over all groups: ``y = (x[..., :M] @ A_cat.T) @ W[b]``.

    Every group ``g`` (kernel size ``k``, slice ``A_g (r, m)``, ``B_g (h, r)``, effective kernel
    ``Keff_g = sum_e w[b, e] K_e (h, k)``) contributes ``y_g[c*k + j] = Keff_g[c, j] * (u_g @ B_g.T)[c]`` with
    ``u_g = x[..., :m] @ A_g.T``. Stacking the groups' slices (zero-padded to ``M = max m``) gives one projection
    ``u = x[..., :M] @ A_cat.T`` of width ``n_groups * r``; the expansion and the kernel are folded into a small
    per-example matrix ``W[b, g*r + q, c*k + j] = Keff_g[b, c, j] * B_g[c, q]`` (zero rows/columns pad to ``d_out``).
    The whole adapter is then two matmuls on activations whatever the number of experts.

    ``W[b, g] = sum_{e in g} w[b, e] bank[e]`` (:func:`_reference_banks`) is one matmul of the routing weights
    with the bank, so its gradients are matmuls too (per-group constructions with reductions over the batch, or
    with a few small ops per group, cost more than the adapter's arithmetic on a CPU).

    Args:
      weights: ``(Bt, n_experts)`` per-example mixing weights (scales folded in).
    Returns:
      ``A_cat (n_groups * r, M)`` and ``W (Bt, n_groups * r, d_out)``.
    """
    a_bank, bank = _reference_banks(p, A, B, kernels, weights.dtype)
    n_experts, r, d_out = bank.shape
    groups = p.groups
    # static rows (a gather's gradient would be a scatter, which XLA compiles as a loop)
    a_cat = jnp.concatenate([a_bank[members[0]] for _, members in groups], 0)
    member = np.zeros((len(groups), n_experts), np.float32)
    for g, (_, members) in enumerate(groups):
        member[g, list(members)] = 1.0
    lhs = (weights[:, None, :] * jnp.asarray(member, weights.dtype)).reshape(-1, n_experts)  # (Bt * G, E)
    w = lhs @ bank.reshape(n_experts, r * d_out)
    return a_cat, w.reshape(weights.shape[0], len(groups) * r, d_out)


def reference_routed_factors(
    p: Pyramid, A, B, kernels: Sequence[Array], weights: Array, experts: Array
) -> tuple[Array, Array]:
    """The reference fast path's two factors over each example's routed experts only.

    ``y[b] = sum_s w[b, e_s] * expert_{e_s}(x[b])`` over the ``K`` routed experts ``e_s = experts[b, s]``, which
    equals the mixture over all experts because ``w[b]`` is zero off them: ``y[b] = (x[b, :, :M] @ Pt[b].T) @
    W[b]`` with ``Pt[b, s] = [A_{e_s}, 0] (r, M)`` and ``W[b, s] = w[b, e_s] * bank[e_s]``, both of width
    ``K * r``. With top-2 routing that is ``2 r`` whatever the number of experts or kernel sizes: a rank-``2r``
    LoRA's cost, where :func:`reference_fused_factors` costs ``n_groups * r``. The selection is a one-hot matmul,
    so the gradients of the selected experts' parameters are matmuls too; unselected experts get exactly the
    zero gradient they get from the full mixture.

    Args:
      weights: ``(Bt, n_experts)`` per-example mixing weights (scales folded in; zero off ``experts``).
      experts: ``(Bt, K)`` int, distinct per row: the routed experts of each example.
    Returns:
      ``Pt (Bt, K * r, M)`` and ``W (Bt, K * r, d_out)``.
    """
    a_bank, bank = _reference_banks(p, A, B, kernels, weights.dtype)
    n_experts, r, d_out = bank.shape
    bt, n_slots = experts.shape
    onehot = jax.nn.one_hot(experts, n_experts, dtype=weights.dtype)  # (Bt, K, E)
    pt = (onehot.reshape(-1, n_experts) @ a_bank.reshape(n_experts, -1)).reshape(bt, n_slots * r, -1)
    lhs = (onehot * weights[:, None, :]).reshape(-1, n_experts)
    w = (lhs @ bank.reshape(n_experts, r * d_out)).reshape(bt, n_slots * r, d_out)
    return pt, w


# ----------------------------------------------------------------------------------------------------------
# Paper expansion.
# ----------------------------------------------------------------------------------------------------------


#: Kernel sizes up to this one take the paper path's dense Kronecker form (:func:`paper_dense_factors`) by
#: default; larger ones the transposed form. Chosen by measurement on a 2-core CPU (README, Benchmarks).
PAPER_DENSE_MAX_K = 8


def paper_dense_factors(p: Pyramid, A, B, kernels: Sequence[Array], weights: Array, groups) -> tuple[Array, Array]:
    """The paper expansion of ``groups`` as one low-rank product ``y[b] = (x[b] @ P) @ Q[b]``, no transposes.

    Group ``g`` (kernel size ``k``, seed ``A_g (r, m)``, ``B_g (h, r)``, ``m k = d_in``, ``h k = d_out``) is
    ``Z (x) Keff`` with ``Z = B_g A_g``; by the mixed-product rule (as in
    :func:`ept_jax.adapters.pyramid.paper_expert_factors`)
    ``Z (x) Keff = (B_g (x) Keff) @ (A_g (x) I_k)``, so ``P`` stacks ``(A_g (x) I_k).T`` and ``Q[b]`` stacks
    ``(B_g (x) Keff[b]).T``. The projection has width ``r * sum k``: ``k`` times a thin product's arithmetic per
    group, for which the activations are read once, in their layout.

    Returns:
      ``P (d_in, r * sum k)`` and ``Q (Bt, r * sum k, d_out)``, in ``weights``' dtype.
    """
    ps, qs = [], []
    for k, members in groups:
        a_g, b_g = group_seed(p, A, B, members)
        keff = effective_kernel(kernels, members, weights)  # (Bt, k, k)
        ps.append(jnp.kron(a_g, np.eye(k, dtype=a_g.dtype)))  # a constant: no iota-and-compare program
        qs.append(jnp.swapaxes(jax.vmap(jnp.kron, (None, 0))(b_g.astype(keff.dtype), keff), 1, 2))
    return jnp.concatenate(ps, 0).T.astype(weights.dtype), jnp.concatenate(qs, 1)


def paper_forward(
    p: Pyramid, x: Array, A, B, kernels: Sequence[Array], weights: Array, dense_max_k: int = PAPER_DENSE_MAX_K
) -> Array:
    """The paper expansion's adapter output ``sum_g (Z_g (x) Keff_g) x``, never materialising ``dW``.

    Kernel sizes ``k <= dense_max_k``: one low-rank product over all of them (:func:`paper_dense_factors`; ``k``
    times the arithmetic of a thin product, activations read once in their layout). Larger ``k``, group by
    group: ``y = B_g @ ((A_g @ X) @ Keff^T)`` with ``X = x`` viewed as ``(m, k)``, i.e. ``y[c*k + j] = sum_{i,l}
    (B_g A_g)[c, i] Keff[j, l] x[i*k + l]``; ``X`` is transposed to ``(k, m)`` so both products are thin
    matmuls over a minor axis (:func:`ept_jax.core.lowrank.thin_matmul`, whose backward never transposes the big
    operands) and the ``k x k`` mix is a per-example batched product on the small ``(k, r)`` tensor.

    Args:
      x: ``(B, ..., d_in)``; weights: ``(B, n_experts)`` per-example mixing weights (scales folded in).
      dense_max_k: the largest kernel size computed in the dense form (0: none).
    Returns:
      ``(B, ..., d_out)``.
    """
    bt = x.shape[0]
    x3 = x.reshape(bt, -1, p.d_in)
    dense = [(k, members) for k, members in p.groups if k <= dense_max_k]
    transposed = [(k, members) for k, members in p.groups if k > dense_max_k]
    if dense:
        pd, qd = paper_dense_factors(p, A, B, kernels, weights, dense)
        y = lowrank_per_example(x3, pd.astype(x.dtype), qd.astype(x.dtype))
    else:
        y = jnp.zeros(x3.shape[:-1] + (p.d_out,), x.dtype)
    for k, members in transposed:
        a_g, b_g = group_seed(p, A, B, members)
        m = p.d_in // k
        keff = effective_kernel(kernels, members, weights).astype(x.dtype)
        xt = jnp.swapaxes(x3.reshape(bt, -1, m, k), -1, -2)  # (B, S, k, m)
        u = thin_matmul(xt, a_g.T.astype(x.dtype))  # (B, S, k, r)
        v = jnp.einsum("bjl,bslq->bsjq", keff, u)
        yt = thin_matmul(v, b_g.T.astype(x.dtype))  # (B, S, k, h)
        y = y + jnp.swapaxes(yt, -1, -2).reshape(bt, -1, p.d_out)
    return y.reshape(x.shape[:-1] + (p.d_out,))


# ----------------------------------------------------------------------------------------------------------
# Entry point.
# ----------------------------------------------------------------------------------------------------------


def forward_fast(
    p: Pyramid,
    x: Array,
    A,
    B,
    kernels: Sequence[Array],
    weights: Array,
    experts: Array | None = None,
    paper_dense_max_k: int = PAPER_DENSE_MAX_K,
) -> Array:
    """The adapter output without ever materialising ``dW``.

    Reference: two thin matmuls on the activations. With ``experts`` (top-k routing) and fewer routed experts
    than kernel-size groups, :func:`reference_routed_factors` (width ``top_k * r``, per-example first factor);
    otherwise :func:`reference_fused_factors` — one projection ``u = x[..., :M] @ A_cat.T`` of width
    ``n_groups * r`` (the nested ALP slices of all groups at once) and one per-example product ``u @ W[b]``.
    Cost per token ``width * (d_in / k_min + d_out)`` multiply-adds (the factors are built once per example,
    not per token), a few percent of the frozen Linear's ``d_in * d_out``.

    Paper: :func:`paper_forward`; kernel sizes ``k <= paper_dense_max_k`` in one dense product, ``r * k *
    (d_in + d_out)`` per token and group; larger ones ``r * (d_in + d_out) + r * k^2`` per token plus one
    transposed copy of ``x`` and of ``y``.

    Args:
      x: ``(B, ..., d_in)``, batch first.
      weights: ``(B, n_experts)`` per-example mixing weights (scales folded in; zeros for unrouted experts).
      experts: optional ``(B, top_k)`` the routed experts of each example (``weights`` must be zero off them).
      paper_dense_max_k: paper expansion: the largest kernel size computed in the dense Kronecker form.
    Returns:
      ``(B, ..., d_out)``.
    """
    if p.expansion == "reference":
        if experts is not None and experts.shape[-1] < len(p.groups):
            pt, w = reference_routed_factors(p, A, B, kernels, weights, experts)
            return lowrank_both_per_example(x[..., : pt.shape[2]], pt.astype(x.dtype), w.astype(x.dtype))
        a_cat, w = reference_fused_factors(p, A, B, kernels, weights)
        return lowrank_per_example(x[..., : a_cat.shape[1]], a_cat.T.astype(x.dtype), w.astype(x.dtype))
    return paper_forward(p, x, A, B, kernels, weights, paper_dense_max_k)

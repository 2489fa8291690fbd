"""ept_jax.adapters.pyramid_fast (float64): the fast paths' gradients equal the definitions'.

Values of every path against the ``lax.conv_transpose`` definition: tests/unit/test_pyramid.py.
"""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import pytest
from pyramid_cases import TOL, normal, pyramid_params, x64  # noqa: F401 (x64: autouse fixture)

from ept_jax.adapters import pyramid as P
from ept_jax.adapters import pyramid_fast as F


def _loss_parts(p, top_k, n=5):
    A, B, kernels = pyramid_params(p, 3)
    gate_w, gate_b, emb = normal(20, (p.n_experts, 8)), normal(21, (p.n_experts,)), normal(22, (5, 8))
    task_ids = jnp.array([0, 4, 2, 4, 1][:n])
    x, cot = normal(23, (n, 3, p.d_in)), normal(24, (n, 3, p.d_out))
    return (A, B, kernels, gate_w, gate_b, emb), task_ids, x, cot


@pytest.mark.parametrize(
    "d_in,d_out,ks,alp", [(64, 64, (2, 2, 4, 4, 6, 6, 8, 8), True), (64, 40, (2, 2, 4, 4, 6, 6, 8, 8), False)]
)
@pytest.mark.parametrize("top_k", [1, 2, 3])
def test_routed_fast_path_gradients_are_the_mixture_gradients(d_in, d_out, ks, alp, top_k):
    """Computing only the routed experts changes no gradient of a parameter (routing included)."""
    p = P.Pyramid("reference", d_in, d_out, ks, alp=alp)
    params, task_ids, x, cot = _loss_parts(p, top_k)

    def loss(params, routed):
        A, B, kernels, gate_w, gate_b, emb = params
        rows, idx = P.route(gate_w, gate_b, emb, top_k)
        experts = idx[task_ids] if routed else None
        if routed:
            pt, w = F.reference_routed_factors(p, A, B, kernels, rows[task_ids], experts)
            chex.assert_shape((pt, w), [(5, top_k * 3, d_in // min(ks)), (5, top_k * 3, d_out)])
        return jnp.sum(F.forward_fast(p, x, A, B, kernels, rows[task_ids], experts) * cot)

    fused = jax.jit(jax.value_and_grad(lambda q: loss(q, False)))(params)
    routed = jax.jit(jax.value_and_grad(lambda q: loss(q, True)))(params)
    chex.assert_trees_all_close(routed, fused, **TOL)
    assert sum(float(jnp.abs(a).sum()) for a in jax.tree.leaves(routed[1][0])) > 0
    # the release's softmax over the top-k values is constant for k = 1: no gradient reaches the router then
    assert (float(jnp.abs(routed[1][5]).sum()) > 0) == (top_k > 1)


@pytest.mark.parametrize(
    "d_in,d_out,ks,alp",
    [
        (64, 32, (2, 2, 4, 4, 8, 8, 16, 16), True),
        (48, 24, (2, 4, 6, 3), False),
        (48, 24, (2, 2, 4, 4, 6, 6, 3, 3), True),
    ],
)
@pytest.mark.parametrize("dense_max_k", [0, 4, 16])
def test_paper_fast_path_gradients_are_the_materialised_gradients(d_in, d_out, ks, alp, dense_max_k):
    """The paper fast path (transposed groups, dense Kronecker groups, or both): value, input gradient and every
    parameter gradient equal the materialised delta's (``x @ dW[t].T`` with ``dW`` the Kronecker products)."""
    p = P.Pyramid("paper", d_in, d_out, ks, alp=alp)
    params, task_ids, x, cot = _loss_parts(p, 2)

    def loss(params, x, fast):
        A, B, kernels, gate_w, gate_b, emb = params
        rows, _ = P.route(gate_w, gate_b, emb, 2)
        if fast:
            y = F.forward_fast(p, x, A, B, kernels, rows[task_ids], paper_dense_max_k=dense_max_k)
        else:
            y = P.forward_materialized(p, x, A, B, kernels, rows, task_ids)
        return jnp.sum(y * cot)

    grad = jax.value_and_grad(loss, argnums=(0, 1))
    fast = jax.jit(lambda q, x: grad(q, x, True))(params, x)
    want = jax.jit(lambda q, x: grad(q, x, False))(params, x)
    chex.assert_trees_all_close(fast, want, **TOL)
    (d_a, d_b, d_kernels, d_gate, _, _), d_x = fast[1]
    for g in (d_a, d_b, d_kernels, d_gate, d_x):  # none trivially zero
        assert sum(float(jnp.abs(a).sum()) for a in jax.tree.leaves(g)) > 0

"""Exact-math tests of ept_jax.adapters.pyramid (float64): every path of both expansions against the definitions.

The fast paths' gradients: tests/unit/test_pyramid_fast.py."""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from pyramid_cases import TOL, normal, pyramid_params, routing, x64  # noqa: F401 (x64: autouse fixture)

from ept_jax.adapters import pyramid as P
from ept_jax.adapters import pyramid_fast as F


def _np_softmax(a):
    e = np.exp(a - a.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


# ------------------------------------------------------------------------------------------------ routing


@pytest.mark.parametrize("top_k", [1, 2, 3, None])
def test_route_matches_numpy(top_k):
    n_rows, d, n = 8, 16, 8
    gate_w, gate_b, emb = normal(1, (n, d)), normal(2, (n,)), normal(3, (n_rows, d))
    w, idx = P.route(gate_w, gate_b, emb, top_k)
    chex.assert_shape(w, (n_rows, n))
    probs = _np_softmax(np.asarray(emb) @ np.asarray(gate_w).T + np.asarray(gate_b))
    if top_k is None:
        chex.assert_shape(idx, (n_rows, n))
        np.testing.assert_allclose(w, probs, **TOL)
        return
    chex.assert_shape(idx, (n_rows, top_k))
    want = np.zeros((n_rows, n))
    for t in range(n_rows):
        order = np.argsort(-probs[t], kind="stable")[:top_k]
        np.testing.assert_array_equal(idx[t], order)
        want[t, order] = _np_softmax(probs[t, order])
    np.testing.assert_allclose(w, want, **TOL)
    np.testing.assert_allclose(np.asarray(w).sum(-1), 1.0, **TOL)
    assert int((np.asarray(w) > 0).sum(-1).max()) == top_k


def test_route_rejects_bad_top_k():
    with pytest.raises(ValueError, match="top_k=9"):
        P.route(normal(1, (8, 4)), None, normal(2, (3, 4)), 9)


# ------------------------------------------------------------------------------------------- one expert


def _reference_expert_all(a, b, kern, d_in, d_out):
    return (
        P.reference_expert_delta(a, b, kern, d_in, d_out),
        P.reference_expert_delta_conv(a, b, kern, d_in, d_out),
        P.reference_expert_factors(a, b, kern, d_in, d_out),
    )


@pytest.mark.parametrize("d_in,d_out,k", [(64, 64, 6), (40, 64, 6), (64, 48, 4)])
def test_reference_expert_paths_agree(d_in, d_out, k):
    r = 3
    m, h = P.alp_dims(k, d_in, d_out)
    a, b = P.alp_slice(normal(1, (r, d_in // 2)), normal(2, (d_out // 2, r)), k, d_in, d_out)
    kern = normal(3, (h, k))
    chex.assert_shape((a, b), [(r, m), (h, r)])
    eager = _reference_expert_all(a, b, kern, d_in, d_out)
    jitted = jax.jit(_reference_expert_all, static_argnums=(3, 4))(a, b, kern, d_in, d_out)
    # the formula, entry by entry
    z = np.asarray(b) @ np.asarray(a)
    want = np.zeros((d_out, d_in))
    for c in range(h):
        for j in range(k):
            want[c * k + j, :m] = np.asarray(kern)[c, j] * z[c]
    for explicit, conv, (f_b, f_a) in (eager, jitted):
        chex.assert_shape([explicit, conv], (d_out, d_in))
        chex.assert_shape((f_b, f_a), [(d_out, r), (r, d_in)])
        np.testing.assert_allclose(explicit, want, **TOL)
        np.testing.assert_allclose(conv, want, **TOL)
        np.testing.assert_allclose(f_b @ f_a, want, **TOL)
    # padding path: rows h*k.. and columns m.. are exactly zero
    explicit = np.asarray(eager[0])
    assert not np.any(explicit[h * k :]) and not np.any(explicit[:, m:])
    assert np.linalg.matrix_rank(explicit) == min(r, h, m)


@pytest.mark.parametrize("d_out,k", [(64, 6), (48, 4)])
def test_reference_expand_conv_matches_activation_formula(d_out, k):
    h = d_out // k
    z, kern = normal(1, (5, h)), normal(2, (h, k))
    y = P.reference_expand(z, kern, d_out)
    chex.assert_shape(y, (5, d_out))
    chex.assert_trees_all_close(P.reference_expand_conv(z, kern, d_out), y, **TOL)
    chex.assert_trees_all_close(jax.jit(P.reference_expand_conv, static_argnums=2)(z, kern, d_out), y, **TOL)
    want = np.zeros((5, d_out))
    want[:, : h * k] = (np.asarray(z)[:, :, None] * np.asarray(kern)[None]).reshape(5, h * k)
    np.testing.assert_allclose(y, want, **TOL)


def test_expansions_match_torch_conv_transpose2d():
    """Independent check of the conv_transpose semantics against PyTorch's ConvTranspose2d (release/paper)."""
    torch = pytest.importorskip("torch")
    F = torch.nn.functional
    r, d_in, d_out, k = 3, 64, 64, 6
    m, h = P.alp_dims(k, d_in, d_out)
    a, b = normal(1, (r, m)), normal(2, (h, r))
    z = np.asarray(b) @ np.asarray(a)
    # reference: depthwise over the h rows, kernel (k, 1), stride (k, 1), as the release's (1, h, k, 1) tensor.
    kern = normal(3, (h, k))
    t_out = F.conv_transpose2d(
        torch.tensor(z).view(1, h, 1, m), torch.tensor(np.asarray(kern)).view(h, 1, k, 1), stride=(k, 1), groups=h
    )  # (1, h, k, m)
    want = np.zeros((d_out, d_in))
    want[: h * k, :m] = t_out.numpy().reshape(h * k, m)
    np.testing.assert_allclose(P.reference_expert_delta_conv(a, b, kern, d_in, d_out), want, **TOL)
    # paper: one h x m image, kernel (k, k), stride k.
    kk = normal(4, (k, k))
    t_out = F.conv_transpose2d(
        torch.tensor(z).view(1, 1, h, m), torch.tensor(np.asarray(kk)).view(1, 1, k, k), stride=k
    )
    np.testing.assert_allclose(P.paper_expert_delta_conv(a, b, kk), t_out.numpy()[0, 0], **TOL)


def _paper_expert_all(a, b, kern):
    return P.paper_expert_delta(a, b, kern), P.paper_expert_delta_conv(a, b, kern), P.paper_expert_factors(a, b, kern)


@pytest.mark.parametrize("d_in,d_out,k", [(48, 24, 4), (36, 72, 3)])
def test_paper_expert_paths_agree(d_in, d_out, k):
    r = 2
    a, b = normal(1, (r, d_in // k)), normal(2, (d_out // k, r))
    kern = normal(3, (k, k))
    want = np.kron(np.asarray(b) @ np.asarray(a), np.asarray(kern))
    for kron, conv, (f_b, f_a) in (_paper_expert_all(a, b, kern), jax.jit(_paper_expert_all)(a, b, kern)):
        chex.assert_shape([kron, conv], (d_out, d_in))
        chex.assert_shape((f_b, f_a), [(d_out, r * k), (r * k, d_in)])
        np.testing.assert_allclose(kron, want, **TOL)
        np.testing.assert_allclose(conv, want, **TOL)
        np.testing.assert_allclose(f_b @ f_a, want, **TOL)
    assert np.linalg.matrix_rank(want) == r * k


# --------------------------------------------------------------------------------------- whole pyramid

CASES = [
    # expansion, d_in, d_out, kernel sizes, alp
    ("reference", 64, 64, (2, 2, 4, 4, 6, 6, 8, 8), True),  # 6 does not divide 64: padding path
    ("reference", 64, 40, (2, 2, 4, 4, 6, 6, 8, 8), False),
    ("reference", 48, 80, (4, 4, 4, 4), True),  # homogeneous (EPT-4)
    ("paper", 48, 24, (2, 2, 4, 4, 6, 6, 3, 3), True),
    ("paper", 48, 24, (2, 4, 6, 3), False),
    ("paper", 64, 32, (2, 2, 4, 4, 8, 8, 16, 16), True),  # one chain 2 | 4 | 8 | 16 (T5's benchmark sizes)
]


def _paths(p, x, A, B, kernels, rows, task_ids, idx=None):
    """(fast, materialized, conv, [fast over the routed experts]) outputs and the conv deltas of one pyramid;
    conv is the definition (lax.conv_transpose deltas)."""
    fast = F.forward_fast(p, x, A, B, kernels, rows[task_ids])
    mat = P.forward_materialized(p, x, A, B, kernels, rows, task_ids)
    conv = P.forward_conv(p, x, A, B, kernels, rows, task_ids)
    routed = [] if idx is None else [F.forward_fast(p, x, A, B, kernels, rows[task_ids], idx[task_ids])]
    return [fast, mat, conv, *routed], P.expert_deltas(p, A, B, kernels, method="conv")


def _check_paths(p, top_k, use_jit):
    r, n_rows = 3, 5
    A, B, kernels = pyramid_params(p, r)
    rows, idx = routing(n_rows, 8, p.n_experts, top_k)
    task_ids = jnp.array([0, 4, 2, 4])
    x = normal(11, (4, 3, p.d_in))
    fn = jax.jit(_paths, static_argnums=0) if use_jit else _paths
    outs, deltas = fn(p, x, A, B, kernels, rows, task_ids, idx if top_k is not None else None)
    assert len(outs) == (4 if top_k is not None else 3)
    chex.assert_shape(outs, (4, 3, p.d_out))
    chex.assert_shape(deltas, (p.n_experts, p.d_out, p.d_in))
    # the definition spelled out once more, in numpy: per-example mixture of the conv_transpose deltas
    want = np.einsum("bsi,be,eoi->bso", np.asarray(x), np.asarray(rows)[np.asarray(task_ids)], np.asarray(deltas))
    for y in outs:
        np.testing.assert_allclose(y, want, **TOL)


@pytest.mark.parametrize("expansion,d_in,d_out,ks,alp", CASES)
@pytest.mark.parametrize("top_k", [2, None])
def test_forward_paths_agree_under_jit(expansion, d_in, d_out, ks, alp, top_k):
    _check_paths(P.Pyramid(expansion, d_in, d_out, ks, alp=alp), top_k, use_jit=True)


@pytest.mark.parametrize(
    "p",
    # fewer experts than under jit: eager dispatch compiles every op for every new shape
    [P.Pyramid("reference", 64, 64, (6, 2)), P.Pyramid("paper", 48, 24, (2, 4))],
    ids=["reference-64-64-padded", "paper-48-24"],
)
def test_forward_paths_agree_eagerly(p):
    _check_paths(p, 2, use_jit=False)


@pytest.mark.parametrize("expansion,d_in,d_out,ks,alp", [CASES[0], CASES[1], CASES[3]])
def test_lora_factors_reproduce_mixture_with_stated_rank(expansion, d_in, d_out, ks, alp):
    p = P.Pyramid(expansion, d_in, d_out, ks, alp=alp)
    r = 3
    A, B, kernels = pyramid_params(p, r)
    rows, _ = routing(2, 8, p.n_experts, 2)
    merged = jax.jit(jax.vmap(lambda w: P.mixture_delta(p, A, B, kernels, w)))(rows)
    for t in range(2):
        sel = tuple(int(e) for e in np.nonzero(np.asarray(rows[t]))[0])
        f_b, f_a = jax.jit(lambda w, sel=sel: P.lora_factors(p, A, B, kernels, w, sel))(rows[t])
        rank = r * len(sel) if expansion == "reference" else sum(r * ks[e] for e in sel)
        chex.assert_shape((f_b, f_a), [(d_out, rank), (rank, d_in)])
        chex.assert_trees_all_close(f_b @ f_a, merged[t], **TOL)


def test_reference_lora_factors_under_jit_with_traced_experts():
    p = P.Pyramid("reference", 64, 64, (2, 2, 4, 4, 6, 6, 8, 8))
    A, B, kernels = pyramid_params(p, 4)
    rows, idx = routing(8, 8, 8, 2)

    def check(w, i):
        f_b, f_a = P.lora_factors(p, A, B, kernels, w, i)
        return f_b, f_a, P.mixture_delta(p, A, B, kernels, w)

    f_b, f_a, merged = jax.jit(jax.vmap(check))(rows, idx)  # every task row, experts traced
    chex.assert_shape((f_b, f_a), [(8, 64, 8), (8, 8, 64)])
    chex.assert_trees_all_close(f_b @ f_a, merged, **TOL)


def test_paper_lora_factors_need_concrete_experts():
    p = P.Pyramid("paper", 48, 24, (2, 4))
    A, B, kernels = pyramid_params(p, 2)
    w = jnp.array([0.3, 0.7])
    with pytest.raises(ValueError, match="concrete"):
        jax.jit(lambda i: P.lora_factors(p, A, B, kernels, w, i))(jnp.array([0, 1]))


def test_groups_and_scales():
    p = P.Pyramid("reference", 64, 64, (2, 2, 4, 4, 6, 6, 8, 8))
    assert p.groups == ((2, (0, 1)), (4, (2, 3)), (6, (4, 5)), (8, (6, 7)))
    assert P.Pyramid("reference", 64, 64, (2, 4), alp=False).groups == ((2, (0,)), (4, (1,)))
    assert P.expert_scales(P.Pyramid("paper", 48, 48, (2, 4, 6, 8))) == (1.0, 0.5, 1 / 3, 0.25)
    # reference: d_t = d_in // k over T = d_in // 2 (here 64 // 6 = 10 of 32)
    assert P.expert_scales(p)[4] == 10 / 32


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(expansion="conv"), "expansion='conv'"),
        (dict(kernel_sizes=()), "at least one expert"),
        (dict(kernel_sizes=(1, 2)), "kernel size 1"),
        (dict(kernel_sizes=(100,)), "kernel size 100"),
        (dict(expansion="paper", kernel_sizes=(6,)), "kernel size 6 does not divide"),
    ],
)
def test_pyramid_rejects_bad_geometry(kwargs, match):
    args = dict(expansion="reference", d_in=64, d_out=64, kernel_sizes=(2, 4))
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        P.Pyramid(**args)


def test_alp_slice_rejects_small_seed():
    with pytest.raises(ValueError, match="too small for kernel size 2"):
        P.alp_slice(normal(1, (2, 8)), normal(2, (8, 2)), 2, 64, 16)


def test_contrastive_loss_matches_numpy():
    x0, emb = normal(1, (4, 16)), normal(2, (8, 16))
    task_ids = jnp.array([0, 3, 3, 7])
    tau = 0.05
    loss = jax.jit(P.contrastive_loss, static_argnums=3)(x0, emb, task_ids, tau)
    chex.assert_shape(loss, ())
    xn = np.asarray(x0) / np.linalg.norm(np.asarray(x0), axis=-1, keepdims=True)
    en = np.asarray(emb) / np.linalg.norm(np.asarray(emb), axis=-1, keepdims=True)
    logits = xn @ en.T / tau
    logp = (
        logits
        - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True))
        - logits.max(-1, keepdims=True)
    )
    want = -np.mean(logp[np.arange(4), np.asarray(task_ids)])
    np.testing.assert_allclose(loss, want, **TOL)
    # a zero input does not produce NaNs (normalisation is clamped as in torch.nn.functional.normalize)
    assert np.isfinite(P.contrastive_loss(jnp.zeros((2, 16)), emb, task_ids[:2], tau))

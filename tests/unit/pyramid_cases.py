"""Shared helpers of the pyramid tests: float64 for every test of a module that imports ``x64``, numpy-drawn
parameters of a pyramid, and routing weights."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ept_jax.adapters import pyramid as P

TOL = dict(atol=1e-10, rtol=1e-10)


@pytest.fixture(autouse=True)
def x64():
    prev = jax.config.jax_enable_x64
    jax.config.update("jax_enable_x64", True)
    yield
    jax.config.update("jax_enable_x64", prev)


def normal(seed, shape):
    # numpy draws: jax.random would compile once per new shape, which dominates a test of small shapes.
    return jnp.asarray(np.random.default_rng(seed).standard_normal(shape), jnp.float64)


def pyramid_params(p: P.Pyramid, r: int, seed: int = 0):
    """Random A, B (shared seed or per-expert lists) and kernels for pyramid ``p``."""
    keys = iter(range(seed * 1000, seed * 1000 + 1000))
    if p.alp:
        seed_in, seed_out = p.seed_shape
        A, B = normal(next(keys), (r, seed_in)), normal(next(keys), (seed_out, r))
    else:
        A = [normal(next(keys), (r, p.d_in // k)) for k in p.kernel_sizes]
        B = [normal(next(keys), (p.d_out // k, r)) for k in p.kernel_sizes]
    kernels = [normal(next(keys), p.kernel_shape(e)) for e in range(p.n_experts)]
    return A, B, kernels


def routing(n_rows: int, d: int, n_experts: int, top_k, seed: int = 7):
    gate_w, gate_b = normal(seed, (n_experts, d)), normal(seed + 1, (n_experts,))
    emb = normal(seed + 2, (n_rows, d))
    return P.route(gate_w, gate_b, emb, top_k)

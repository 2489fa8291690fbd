"""ept_jax.core.lowrank: values and hand-written gradients against jax.grad of the plain expressions (float64)."""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ept_jax.core.lowrank import lowrank, lowrank_both_per_example, lowrank_per_example, thin_matmul

TOL = dict(atol=1e-11, rtol=1e-11)


@pytest.fixture(autouse=True)
def x64():
    prev = jax.config.jax_enable_x64
    jax.config.update("jax_enable_x64", True)
    yield
    jax.config.update("jax_enable_x64", prev)


def _normal(seed, shape):
    return jnp.asarray(np.random.default_rng(seed).standard_normal(shape), jnp.float64)


def _check_grads(fn, plain, args, cot_seed=9):
    out = fn(*args)
    chex.assert_trees_all_close(out, plain(*args), **TOL)
    cot = _normal(cot_seed, out.shape)
    # A weighted sum with a random cotangent: every output element's gradient enters.
    argnums = tuple(range(len(args)))
    got = jax.grad(lambda *a: jnp.sum(fn(*a) * cot), argnums=argnums)(*args)
    want = jax.grad(lambda *a: jnp.sum(plain(*a) * cot), argnums=argnums)(*args)
    chex.assert_trees_all_close(got, want, **TOL)
    chex.assert_trees_all_equal_shapes(got, args)


@pytest.mark.parametrize("lead", [(7,), (2, 5), (2, 3, 4)])
def test_lowrank_matches_plain_matmuls(lead):
    x, p, q = _normal(0, (*lead, 12)), _normal(1, (12, 3)), _normal(2, (3, 10))
    _check_grads(jax.jit(lowrank), lambda x, p, q: (x @ p) @ q, (x, p, q))


@pytest.mark.parametrize("lead", [(4, 6), (3, 2, 5)])
def test_lowrank_per_example_matches_plain_einsum(lead):
    b = lead[0]
    x, p, q = _normal(3, (*lead, 8)), _normal(4, (8, 5)), _normal(5, (b, 5, 9))

    def plain(x, p, q):
        return jnp.einsum("b...r,bro->b...o", x @ p, q)

    _check_grads(jax.jit(lowrank_per_example), plain, (x, p, q))


def test_lowrank_second_order_is_refused_not_wrong():
    # custom_vjp has no JVP rule: forward-mode must fail loudly rather than return an untested derivative.
    x, p, q = _normal(0, (4, 6)), _normal(1, (6, 2)), _normal(2, (2, 3))
    with pytest.raises(TypeError):
        jax.jvp(lowrank, (x, p, q), (x, p, q))


@pytest.mark.parametrize(
    "shapes, match",
    [
        (((4, 6), (5, 2), (2, 3)), r"x \(4, 6\) and P \(5, 2\)"),
        (((4, 6), (6, 2), (3, 3)), r"P \(6, 2\) and Q \(3, 3\)"),
        (((4, 6), (6, 2), (2, 2, 3)), r"expected Q \(r, d_out\)"),
    ],
)
def test_lowrank_refuses_shapes_that_do_not_chain(shapes, match):
    with pytest.raises(ValueError, match=match):
        lowrank(*(jnp.zeros(s) for s in shapes))


def test_lowrank_per_example_refuses_a_batch_mismatch():
    with pytest.raises(ValueError, match=r"per-example Q \(3, 2, 5\) does not match the batch of x \(4, 7, 6\)"):
        lowrank_per_example(jnp.zeros((4, 7, 6)), jnp.zeros((6, 2)), jnp.zeros((3, 2, 5)))


@pytest.mark.parametrize("lead", [(4, 6), (3, 2, 5)])
def test_lowrank_both_per_example_matches_plain_einsum(lead):
    b = lead[0]
    x, pt, q = _normal(6, (*lead, 8)), _normal(7, (b, 5, 8)), _normal(8, (b, 5, 9))

    def plain(x, pt, q):
        return jnp.einsum("b...r,bro->b...o", jnp.einsum("b...m,brm->b...r", x, pt), q)

    _check_grads(jax.jit(lowrank_both_per_example), plain, (x, pt, q))


@pytest.mark.parametrize(
    "shapes, match",
    [
        (((4, 7, 6), (4, 2, 5), (4, 2, 3)), r"do not chain"),
        (((4, 7, 6), (3, 2, 6), (4, 2, 3)), r"do not chain"),
        (((4, 7, 6), (4, 2, 6), (4, 3, 3)), r"do not chain"),
        (((4, 7, 6), (2, 6), (4, 2, 3)), r"expected x \(B, \.\.\., d_in\)"),
    ],
)
def test_lowrank_both_per_example_refuses_shapes_that_do_not_chain(shapes, match):
    with pytest.raises(ValueError, match=match):
        lowrank_both_per_example(*(jnp.zeros(s) for s in shapes))


@pytest.mark.parametrize("lead", [(7,), (2, 3, 4)])
@pytest.mark.parametrize("k,n", [(12, 3), (3, 10)], ids=["to-thin", "from-thin"])
def test_thin_matmul_matches_plain_matmul(lead, k, n):
    """Both backward branches: a projection to a thin width and an expansion from one."""
    a, b = _normal(10, (*lead, k)), _normal(11, (k, n))
    _check_grads(jax.jit(thin_matmul), lambda a, b: a @ b, (a, b))


def test_thin_matmul_refuses_shapes_that_do_not_chain():
    with pytest.raises(ValueError, match=r"a \(4, 6\) and b \(5, 2\)"):
        thin_matmul(jnp.zeros((4, 6)), jnp.zeros((5, 2)))

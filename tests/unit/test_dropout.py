"""ept_jax.core.dropout: the hash mask generator's statistics, determinism, sharding invariance and errors.

Thresholds are ~5-6 standard deviations of the statistic under a true Bernoulli / uniform source, so a correct
generator fails with probability < 1e-6 and a biased or correlated one (a mask that repeats along an axis,
ignores a key word, or keeps rows together) fails by orders of magnitude.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ept_jax.core.dropout import dropout, hash_bits, keep_mask
from ept_jax.core.params import AdapterContext

SHAPE = (8, 128, 512)  # one T5-small adapter input: 524,288 draws
N = int(np.prod(SHAPE))


def _mask(key, keep=0.9, shape=SHAPE, impl="hash"):
    return np.asarray(jax.jit(lambda k: keep_mask(k, shape, keep, impl))(key))


@pytest.mark.parametrize("keep", [0.9, 0.5, 0.1])
def test_keep_rate_is_the_requested_probability(keep):
    m = _mask(jax.random.PRNGKey(0), keep)
    sd = np.sqrt(keep * (1 - keep) / N)
    assert abs(m.mean() - keep) < 6 * sd, (m.mean(), keep)
    # per row of the last axis and per example: no slice is systematically dropped
    rows = m.reshape(-1, SHAPE[-1]).mean(axis=1)
    assert abs(rows.mean() - keep) < 6 * sd and rows.std() < 1.5 * np.sqrt(keep * (1 - keep) / SHAPE[-1])


def _corr(a, b):
    a, b = a.astype(np.float64).ravel(), b.astype(np.float64).ravel()
    return float(np.corrcoef(a, b)[0, 1])


def test_neighbouring_elements_and_rows_are_uncorrelated():
    m = _mask(jax.random.PRNGKey(1), 0.5)
    flat = m.ravel()
    lim = 6 / np.sqrt(N)
    for lag in (1, 2, 3, 4, 7, 8, 16, 32, 64):
        assert abs(_corr(flat[:-lag], flat[lag:])) < lim, lag
    assert abs(_corr(m[:, :-1], m[:, 1:])) < lim  # consecutive tokens
    assert abs(_corr(m[:-1], m[1:])) < lim  # consecutive examples
    assert abs(_corr(m[..., :256], m[..., 256:])) < lim  # the two halves of the feature axis


def test_masks_of_different_keys_are_unrelated():
    base = jax.random.PRNGKey(3)
    # the library derives each Linear's key by fold_in, each step's by fold_in of the step
    keys = [jax.random.fold_in(base, i) for i in range(6)] + [jax.random.PRNGKey(4), jax.random.PRNGKey(2**31)]
    masks = [_mask(k, 0.5) for k in keys]
    lim = 6 / np.sqrt(N)
    for i in range(len(masks)):
        for j in range(i + 1, len(masks)):
            assert abs(_corr(masks[i], masks[j])) < lim, (i, j)
    # keys differing in one word only (either word) also give unrelated masks
    for k in (jnp.asarray([0, 1], jnp.uint32), jnp.asarray([1, 0], jnp.uint32)):
        assert abs(_corr(_mask(jnp.asarray([0, 0], jnp.uint32), 0.5), _mask(k, 0.5))) < lim


def test_hash_bits_are_uniform_bytes_and_bits():
    bits = np.asarray(jax.jit(lambda k: hash_bits(k, SHAPE))(jax.random.PRNGKey(7)))
    # each of the 32 bit positions is set half of the time
    per_bit = np.array([((bits >> b) & 1).mean() for b in range(32)])
    assert np.all(np.abs(per_bit - 0.5) < 6 * np.sqrt(0.25 / N)), per_bit
    # chi-square of the top byte over 256 cells: mean 255, sd ~22.6
    counts = np.bincount((bits.ravel() >> 24).astype(np.int64), minlength=256)
    expected = N / 256
    chi2 = float(((counts - expected) ** 2 / expected).sum())
    assert chi2 < 255 + 6 * np.sqrt(2 * 255), chi2


def test_same_key_same_mask_and_typed_keys_accepted():
    k = jax.random.PRNGKey(11)
    np.testing.assert_array_equal(_mask(k), _mask(k))
    typed = jax.random.wrap_key_data(k)
    np.testing.assert_array_equal(np.asarray(keep_mask(typed, (4, 6), 0.5)), np.asarray(keep_mask(k, (4, 6), 0.5)))


def test_a_mask_is_the_same_slice_of_a_bigger_batch():
    # the mask is a function of the element's global index: a batch's first example gets the same mask whatever
    # the batch size's trailing examples (what makes it independent of how the batch is sharded)
    k = jax.random.PRNGKey(5)
    big, small = _mask(k, 0.5, (4, 16, 32)), _mask(k, 0.5, (2, 16, 32))
    np.testing.assert_array_equal(big[:2], small)


def test_dropout_scales_kept_entries_and_is_identity_when_off():
    x = jnp.ones((4, 8, 16))
    ctx = AdapterContext(task_ids=jnp.zeros(4, jnp.int32), dropout_rng=jax.random.PRNGKey(0), deterministic=False)
    y = np.asarray(dropout(x, 0.25, ctx))
    assert set(np.unique(y).tolist()) <= {0.0, float(np.float32(1 / 0.75))}
    np.testing.assert_array_equal(np.asarray(dropout(x, 0.25, ctx.replace(deterministic=True))), np.asarray(x))
    np.testing.assert_array_equal(np.asarray(dropout(x, 0.0, ctx)), np.asarray(x))
    # gradient: the mask times the scale
    g = jax.grad(lambda v: jnp.sum(dropout(v, 0.25, ctx)))(x)
    np.testing.assert_allclose(np.asarray(g), y)


def test_threefry_impl_is_jax_bernoulli():
    k = jax.random.PRNGKey(9)
    np.testing.assert_array_equal(_mask(k, 0.7, (6, 10), "threefry"),
                                  np.asarray(jax.random.bernoulli(k, 0.7, (6, 10))))


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda: keep_mask(jax.random.PRNGKey(0), (2, 2), 0.5, "philox"), r"dropout_impl='philox'"),
        (lambda: keep_mask(jax.random.PRNGKey(0), (2, 2), 0.0), r"keep probability 0.0"),
        (lambda: hash_bits(jax.random.PRNGKey(0), (2**16, 2**16)), r"2\*\*32"),
    ],
)
def test_bad_input_is_refused_with_the_value(call, match):
    with pytest.raises(ValueError, match=match):
        call()

"""ept_jax.core.losses: the one-pass cross-entropy equals log_softmax + take_along_axis, value and gradient."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ept_jax.core import losses
from train import steps


def _reference(logits, labels, mask):
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    nll = -jnp.take_along_axis(logp, labels[..., None], axis=-1)[..., 0]
    mask = mask.astype(jnp.float32)
    return jnp.sum(nll * mask) / jnp.maximum(jnp.sum(mask), 1.0)


def _batch(seed, shape=(3, 5), vocab=11, dtype=jnp.float32):
    rs = np.random.RandomState(seed)
    logits = jnp.asarray(4.0 * rs.randn(*shape, vocab), dtype)
    labels = jnp.asarray(rs.randint(0, vocab, shape), jnp.int32)
    mask = jnp.asarray(rs.rand(*shape) > 0.3, jnp.int32)
    return logits, labels, mask


def test_value_and_gradient_match_log_softmax():
    logits, labels, mask = _batch(0)
    ours, g_ours = jax.value_and_grad(losses.masked_mean_nll)(logits, labels, mask)
    ref, g_ref = jax.value_and_grad(_reference)(logits, labels, mask)
    np.testing.assert_allclose(ours, ref, rtol=1e-6)
    np.testing.assert_allclose(g_ours, g_ref, rtol=1e-5, atol=1e-7)
    assert g_ours.dtype == logits.dtype


def test_steps_cross_entropy_matches_reference_under_jit_with_cotangent_scale():
    logits, labels, mask = _batch(1, shape=(2, 4, 3), vocab=17)
    fn = jax.jit(jax.value_and_grad(lambda lg: 2.5 * steps.cross_entropy(lg, labels, mask)))
    ref = jax.value_and_grad(lambda lg: 2.5 * _reference(lg, labels, mask))(logits)
    ours = fn(logits)
    np.testing.assert_allclose(ours[0], ref[0], rtol=1e-6)
    np.testing.assert_allclose(ours[1], ref[1], rtol=1e-5, atol=1e-7)
    # masked-out tokens get no gradient
    assert not np.any(np.asarray(ours[1])[np.asarray(mask) == 0])


def test_bfloat16_logits_give_float32_loss_and_bfloat16_gradient():
    logits, labels, mask = _batch(2, dtype=jnp.bfloat16)
    value, grad = jax.value_and_grad(losses.masked_mean_nll)(logits, labels, mask)
    assert value.dtype == jnp.float32 and grad.dtype == jnp.bfloat16
    ref = _reference(logits.astype(jnp.float32), labels, mask)
    np.testing.assert_allclose(value, ref, rtol=1e-6)


def test_empty_mask_gives_zero_and_zero_gradient():
    logits, labels, mask = _batch(3)
    value, grad = jax.value_and_grad(losses.masked_mean_nll)(logits, labels, jnp.zeros_like(mask))
    assert float(value) == 0.0 and not np.any(np.asarray(grad))


def test_out_of_range_label_gives_nan_not_a_finite_loss():
    logits, labels, mask = _batch(4)
    bad = labels.at[0, 0].set(logits.shape[-1])
    assert np.isnan(float(losses.masked_mean_nll(logits, bad, jnp.ones_like(mask))))


@pytest.mark.parametrize("labels, match", [
    (jnp.zeros((3, 4), jnp.int32), r"labels of shape logits.shape\[:-1\] = \(3, 5\), got \(3, 4\)"),
    (jnp.zeros((3, 5), jnp.float32), "labels must be integers, got float32"),
])
def test_bad_labels_are_named(labels, match):
    logits, _, _ = _batch(5)
    with pytest.raises(ValueError, match=match):
        losses.token_nll(logits, labels)

"""Token cross-entropy with a one-pass backward.

``token_nll(logits, labels)`` is ``logsumexp(logits) - logits[label]`` per token, in float32 whatever the logits'
dtype, with a hand-written backward: ``d logits = (softmax(logits) - onehot(label)) * g``, one elementwise pass
over the ``(..., V)`` logits (the softmax recomputed from the saved ``logsumexp``, the one-hot an iota
comparison). Autodiff of ``log_softmax`` + ``take_along_axis`` instead materialises the log-probabilities, a
zero tensor of the logits' shape with the labels scattered into it and a sum of the two: extra passes over the
largest array of a language-model step (``B * L * V``, 200 MB for SmolLM2 at batch 8 x 128). With this backward
the frozen SmolLM2-135M forward + backward (the benchmarks' limit row) took 0.93 x the time on a 2-core CPU
(in-process A/B, 6 interleaved rounds; README, Benchmarks).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

Array = jax.Array


def _check(logits: Array, labels: Array) -> None:
    if logits.ndim < 1 or labels.shape != logits.shape[:-1]:
        raise ValueError(f"token_nll: logits {logits.shape} need labels of shape logits.shape[:-1] = "
                         f"{logits.shape[:-1]}, got {labels.shape}")
    if not jnp.issubdtype(labels.dtype, jnp.integer):
        raise ValueError(f"token_nll: labels must be integers, got {labels.dtype}")


@jax.custom_vjp
def _nll(logits: Array, labels: Array) -> Array:
    return _nll_fwd(logits, labels)[0]


def _acc(dtype):
    """float32, or float64 for float64 logits (exact tests)."""
    return jnp.promote_types(dtype, jnp.float32)


def _nll_fwd(logits, labels):
    x = logits.astype(_acc(logits.dtype))
    lse = jax.nn.logsumexp(x, axis=-1)
    # An out-of-range label gives NaN (take_along_axis' "fill" mode), as the log_softmax form did: never a
    # silently finite loss.
    picked = jnp.take_along_axis(x, labels[..., None], axis=-1, mode="fill", fill_value=jnp.nan)[..., 0]
    return lse - picked, (logits, labels, lse)


def _nll_bwd(res, g):
    logits, labels, lse = res
    x = logits.astype(_acc(logits.dtype))
    onehot = jax.lax.broadcasted_iota(jnp.int32, x.shape, x.ndim - 1) == labels[..., None]
    grad = (jnp.exp(x - lse[..., None]) - onehot.astype(x.dtype)) * g[..., None]
    return grad.astype(logits.dtype), None


_nll.defvjp(_nll_fwd, _nll_bwd)


def token_nll(logits: Array, labels: Array) -> Array:
    """Per-token negative log-likelihood ``(...,)`` of integer ``labels (...)`` under ``logits (..., V)``.

    float32, or float64 for float64 logits.

    Differentiable in ``logits`` only (the gradient has the logits' dtype). Out-of-range labels give NaN.

    Raises:
      ValueError: ``labels`` not integer or not of shape ``logits.shape[:-1]``.
    """
    _check(logits, labels)
    return _nll(logits, labels.astype(jnp.int32))


def masked_mean_nll(logits: Array, labels: Array, mask: Array) -> Array:
    """Mean of :func:`token_nll` over the tokens where ``mask`` is nonzero; 0 when the mask is empty."""
    nll = token_nll(logits, labels)
    mask = mask.astype(nll.dtype)
    return jnp.sum(nll * mask) / jnp.maximum(jnp.sum(mask), 1.0)

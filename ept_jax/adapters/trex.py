"""* ``"trex"``: **T-REX** (RoyZry98/T-REX-Pytorch, mode ``rank1_flex``). ``A (r1, d_in)`` kaiming-uniform (the
  vectors ``a_i``), ``B (d_out, r2)`` zero (the vectors ``b_j``), a router ``Linear(d_in, r1 r2, no bias)``
  zero-initialised and two scalars ``w_omg``, ``w_g`` zero. Per token::

      omega = sigmoid(100 w_omg),   R = softmax(router(x)) * omega * c_tok + s * (1 - omega) * c_sem,
      delta(x) = sigmoid(100 w_g) * B R^T (A x),      R reshaped to (r1, r2),

  all ``r1 * r2`` rank-one experts ``b_j a_i^T`` from ``r1 + r2`` vectors. ``variant="reference"`` (the
  release): ``c_tok = 32`` and ``c_sem = 4`` whatever ``r1, r2`` (:data:`TREX_RELEASE_ROUTER_SCALE`,
  :data:`TREX_RELEASE_SEMANTIC_SCALE`; ``peft/src/peft/tuners/lora.py``, ``Linear.forward``, ``rank1_flex``:
  ``token_coefficient = 32``, ``task_coefficient = 4``). ``variant="paper"``: ``c_tok = r1 r2``, ``c_sem = r1``,
  ept_jax's generalisation, a departure from the release (see :func:`trex_routing_scales`); the two agree
  only at the release's allocation ``r1 = 4, r2 = 8``. ``s`` ``(B, r1 r2)`` is the
  per-sample semantic vector ``centroids @ emb(sample)`` passed as ``AdapterContext.semantic`` (None: zeros).
  The routing depends on every token, so nothing merges: ``mergeable = False`` and ``merge``/``to_lora``
  raise; export refuses it with the same reason.

Dropout (``cfg.dropout``) is applied to the input of ``A`` as in PEFT's LoRA layer (T-REX's router reads the
undropped ``x``). All three register in :mod:`ept_jax.adapters`' registry on import.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from ept_jax.adapters.base import (
    Adapter,
    ab_init_spec,
    adapter_axes,
    draw_params,
    dtype_of,
)
from ept_jax.adapters.config import (
    VARIANTS,
    AdapterConfig,
)
from ept_jax.core.dropout import dropout
from ept_jax.core.params import AdapterContext, AdapterParam, param

Array = jax.Array


TREX_RELEASE_ROUTER_SCALE = 32.0  # the release's token_coefficient (rank1_flex), fixed whatever r1, r2


TREX_RELEASE_SEMANTIC_SCALE = 4.0  # the release's task_coefficient (rank1_flex), fixed whatever r1, r2


def trex_routing_scales(cfg: AdapterConfig) -> tuple[float, float]:
    """``(c_tok, c_sem)``: T-REX's coefficients of the router softmax and of the semantic vector.

    ``variant="reference"``: the release's constants ``(32, 4)`` whatever ``r1, r2``
    (``RoyZry98/T-REX-Pytorch``, ``peft/src/peft/tuners/lora.py``, ``Linear.forward``, ``rank1_flex``:
    ``token_coefficient = 32``, ``task_coefficient = 4``; the release trains ``r1 = 4, r2 = 8``).

    ``variant="paper"``: ``(r1 * r2, r1)``, a departure from the release (ept_jax's generalisation, not a formula
    of the released code; not checked against the paper's text). Reason: at the release's allocation 32 is the
    number of experts ``r1 r2`` (so the router term ``softmax * r1 r2`` has mean 1 per expert, as it does there)
    and 4 is ``r1``; scaling both with the allocation keeps that balance when ``r1, r2`` change, where the
    release's fixed constants would not. At ``r1 = 4, r2 = 8`` both variants compute the same thing.
    """
    if cfg.variant == "reference":
        return TREX_RELEASE_ROUTER_SCALE, TREX_RELEASE_SEMANTIC_SCALE
    return float(cfg.trex_r1 * cfg.trex_r2), float(cfg.trex_r1)


def validate_trex(cfg: AdapterConfig, d_in: int, d_out: int) -> None:
    if cfg.variant not in VARIANTS:
        raise ValueError(
            f"variant={cfg.variant!r}: accepted values are {VARIANTS} (T-REX: 'reference' = the release, routing "
            f"coefficients {TREX_RELEASE_ROUTER_SCALE:g} and {TREX_RELEASE_SEMANTIC_SCALE:g}; 'paper' = r1 * r2 "
            "and r1)"
        )
    for name in ("trex_r1", "trex_r2"):
        v = getattr(cfg, name)
        if not isinstance(v, int) or isinstance(v, bool) or v < 1:
            raise ValueError(f"{name}={v!r}: must be an integer >= 1 (the release uses trex_r1=4, trex_r2=8)")


TREX_NOT_MERGEABLE = (
    "T-REX routes every token (softmax(router(x)) mixes its rank-one experts per token), so no per-task weight "
    "delta exists to merge or factor; run it unmerged (the model itself, with eval.merge_adapters=False)"
)


class TREXAdapter(Adapter):
    """T-REX ``rank1_flex`` on one Linear (see the module docstring for the formula and the two variants).

    Parameters (:class:`~ept_jax.core.params.AdapterParam`): ``A (r1, d_in)`` kaiming-uniform, ``B (d_out, r2)`` zero,
    ``router_w (r1 * r2, d_in)`` zero, ``w_omg ()`` and ``w_g ()`` zero.
    """

    check = staticmethod(validate_trex)

    mergeable = False

    def __init__(self, cfg: AdapterConfig, d_in: int, d_out: int, *, rngs: nnx.Rngs, axes=None):
        self.validate_config(cfg, d_in, d_out)
        self.cfg, self.d_in, self.d_out = cfg, d_in, d_out
        r1, r2 = cfg.trex_r1, cfg.trex_r2
        dtype = dtype_of(cfg.param_dtype)
        in_ax, out_ax = adapter_axes(axes)
        v = draw_params(rngs, {"A": ((r1, d_in), *ab_init_spec(cfg.init or "default", (r1, d_in), r1))}, dtype)
        self.A = param(v["A"], ("lora_rank", in_ax), AdapterParam)
        self.B = param(jnp.zeros((d_out, r2), dtype), (out_ax, "lora_rank"), AdapterParam)
        self.router_w = param(jnp.zeros((r1 * r2, d_in), dtype), ("experts", in_ax), AdapterParam)
        self.w_omg = param(jnp.zeros((), dtype), (), AdapterParam)
        self.w_g = param(jnp.zeros((), dtype), (), AdapterParam)

    def routing(self, x: Array, semantic: Array | None) -> Array:
        """Per-token expert weights ``R (B, ..., r1, r2)`` for ``x (B, ..., d_in)`` and ``semantic (B, r1 r2)``.

        ``R = softmax(router(x)) * omega * c_tok + s * (1 - omega) * c_sem`` with ``omega = sigmoid(100 w_omg)``
        and ``(c_tok, c_sem)`` = :func:`trex_routing_scales` (reference: the release's 32 and 4; paper:
        ``r1 r2`` and ``r1``); ``semantic`` None means zeros.
        """
        r1, r2 = self.cfg.trex_r1, self.cfg.trex_r2
        n = r1 * r2
        if semantic is None:
            semantic = jnp.zeros((x.shape[0], n), x.dtype)
        if semantic.shape != (x.shape[0], n):
            raise ValueError(
                f"ctx.semantic of shape {semantic.shape}: T-REX expects (batch, r1 * r2) = ({x.shape[0]}, {n}), "
                "or None for zeros"
            )
        omega = jax.nn.sigmoid(100.0 * self.w_omg[...].astype(x.dtype))
        probs = jax.nn.softmax(x @ self.router_w[...].astype(x.dtype).T, axis=-1)  # (B, ..., n)
        s = semantic.astype(x.dtype).reshape(semantic.shape[:1] + (1,) * (x.ndim - 2) + (n,))
        c_tok, c_sem = trex_routing_scales(self.cfg)
        mix = probs * omega * c_tok + s * (1.0 - omega) * c_sem
        return mix.reshape(mix.shape[:-1] + (r1, r2))

    def __call__(self, x: Array, ctx: AdapterContext) -> Array:
        """``x (B, ..., d_in)`` -> ``(B, ..., d_out)`` = ``sigmoid(100 w_g) * B R^T (A dropout(x))`` per token."""
        if x.ndim < 2 or x.shape[-1] != self.d_in:
            raise ValueError(f"adapter input of shape {x.shape}: expected (batch, ..., {self.d_in})")
        rr = self.routing(x, ctx.semantic)
        u = dropout(x, self.cfg.dropout, ctx, self.cfg.dropout_impl) @ self.A[...].astype(x.dtype).T  # (B, ..., r1)
        v = jnp.einsum("...i,...ij->...j", u, rr)  # (B, ..., r2)
        g = jax.nn.sigmoid(100.0 * self.w_g[...].astype(x.dtype))
        return g * (v @ self.B[...].astype(x.dtype).T)

    def merge(self, task: int | Array) -> Array:
        """Always raises: T-REX has no per-task delta (see :data:`TREX_NOT_MERGEABLE`)."""
        raise ValueError(TREX_NOT_MERGEABLE)

    def to_lora(self, task: int | Array) -> tuple[Array, Array]:
        """Always raises: T-REX has no per-task delta (see :data:`TREX_NOT_MERGEABLE`)."""
        raise ValueError(TREX_NOT_MERGEABLE)

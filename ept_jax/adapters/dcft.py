"""DCFT (deconvolution in subspace): one expert, no routing, ``dW = ConvTranspose2d(B @ A, K, stride k)`` = the
paper variant's Kronecker expansion with a single kernel (size 2 unless configured)."""

from __future__ import annotations

import dataclasses

import jax
from flax import nnx

from ept_jax.adapters.config import (
    AdapterConfig,
)
from ept_jax.adapters.ept import EPTAdapter, validate_ept

Array = jax.Array


DCFT_DEFAULT_KERNEL = 2


def dcft_kernel_size(cfg: AdapterConfig) -> int:
    """DCFT's kernel: the single configured size, or DCFT's kernel 2 when ``expert_kernel_sizes`` lists several."""
    ks = cfg.expert_kernel_sizes
    return ks[0] if isinstance(ks, tuple) and len(ks) == 1 else DCFT_DEFAULT_KERNEL


def validate_dcft(cfg: AdapterConfig, d_in: int, d_out: int) -> None:
    k = dcft_kernel_size(cfg)
    validate_ept(dataclasses.replace(cfg, variant="paper", expert_kernel_sizes=(k,), top_k=None), d_in, d_out)
    if cfg.variant not in ("reference", "paper"):
        raise ValueError(f"variant={cfg.variant!r}: accepted values are ('reference', 'paper')")


class DCFTAdapter(EPTAdapter):
    """DCFT: ``dW = (alpha / r) * (B @ A) (x) K`` with ``A (r, d_in / k)``, ``B (d_out / k, r)``, ``K (k, k)``.

    One expert, no router, no task embedding (so no contrastive loss); the expansion is always the 2-D
    transposed convolution (Kronecker product). ``variant`` selects only the init, as for EPT: ``"reference"``
    gives PyTorch-default ``A``, ``B`` and kernel (the kernel as a ``ConvTranspose2d(1, 1, k)`` weight,
    ``fan_in = k * k``; non-zero at step 0), ``"paper"`` Gaussian ``A``/``B`` and a zero kernel.
    """

    check = staticmethod(validate_dcft)

    def __init__(self, cfg: AdapterConfig, d_in: int, d_out: int, *, rngs: nnx.Rngs, axes=None):
        self.validate_config(cfg, d_in, d_out)
        k = dcft_kernel_size(cfg)
        super().__init__(
            cfg,
            d_in,
            d_out,
            rngs=rngs,
            axes=axes,
            expansion="paper",
            kernel_sizes=(k,),
            routed=False,
        )

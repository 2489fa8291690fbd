"""Throughput and model FLOPs utilisation (MFU): what the training log and the benchmarks report the same way.

A training step's model FLOPs are counted as ``4 N`` per token for ``N`` frozen parameters (forward ``2 N``, the
backward to the activations ``2 N``; frozen weights get no weight gradient, and the adapters' own FLOPs are left
out), the convention of the benchmarks (``benchmarks.measure``).
"""

from __future__ import annotations

# Dense peak FLOP/s per chip by compute dtype (vendor spec sheets, no sparsity). float32 counts the TF32 tensor
# cores, which XLA uses for float32 matmuls on these chips by default. Matched by substring of the device kind,
# first match wins (so "H100 PCIe" before "H100").
PEAK_FLOPS: tuple[tuple[str, dict[str, float]], ...] = (
    ("H200", {"bfloat16": 989.4e12, "float32": 494.7e12}),
    ("H100 PCIe", {"bfloat16": 756.0e12, "float32": 378.0e12}),
    ("H100", {"bfloat16": 989.4e12, "float32": 494.7e12}),
    ("A100", {"bfloat16": 312.0e12, "float32": 156.0e12}),
)


def peak_flops(device_kind: str, dtype: str) -> float | None:
    """The device's dense peak FLOP/s for ``dtype`` (``"float32"``/``"bfloat16"``) from :data:`PEAK_FLOPS`, or
    None for a device (a CPU, an unlisted accelerator) or dtype the table does not know."""
    for key, peaks in PEAK_FLOPS:
        if key.lower() in device_kind.lower():
            return peaks.get(dtype)
    return None


def mfu(flops_per_call: float | None, median_s: float | None, peak: float | None) -> float | None:
    """Model FLOPs utilisation ``flops / (median_s * peak)``, or None when any input is unknown."""
    if not flops_per_call or not median_s or not peak:
        return None
    return flops_per_call / (median_s * peak)


def training_flops_per_token(n_frozen_params: int) -> float:
    """``4 N``: see the module docstring."""
    return 4.0 * n_frozen_params

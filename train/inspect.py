"""``python -m train.inspect --config CONFIG [--devices N] [--json]``: trainable parameters by kind, from abstract
shapes only; with ``--devices N``, the bytes one device of the config's mesh (``mesh.*``, ``-1`` filled from ``N``)
holds: the frozen weights' shard, the adapters, their gradients and AdamW's two moments (activations excluded).

No weights are read: the model is built with ``nnx.eval_shape`` from the architecture the config records
(``config.model.arch``, the default checkpoint's ``config.json`` fields), so this works offline. With a local
``model.name_or_path`` whose ``config.json`` is at hand, that file is used instead.
"""

from __future__ import annotations

import json
import sys

from absl import app, flags
from ml_collections import config_flags

from ept_jax.adapters.inspection import parameter_summary
from train.errors import EXIT_USER_ERROR

_CONFIG = _JSON = _VERBOSE = _DEVICES = None  # absl flag holders, defined by _define_flags() when run as a program


def _define_flags() -> None:
    """Defines the command-line flags. Only when run as a program: importing this module (for
    :func:`summarize`) next to ``train.main``, which defines ``--config`` too, must not clash."""
    global _CONFIG, _JSON, _VERBOSE, _DEVICES
    _CONFIG = config_flags.DEFINE_config_file("config", None, "ml_collections config file", lock_config=True)
    _JSON = flags.DEFINE_bool("json", False, "print one JSON object")
    _VERBOSE = flags.DEFINE_bool("verbose", False, "full tracebacks on errors")
    _DEVICES = flags.DEFINE_integer("devices", None, "plan for N devices: per-device bytes on the config's mesh")


def summarize(config, devices: int | None = None) -> dict:
    """The parameter summary (see :func:`ept_jax.adapters.inspection.parameter_summary`) of ``config``'s model;
    with ``devices``, ``memory_per_device`` (bytes one device holds on the config's mesh over that many devices)."""
    from flax import nnx

    from ept_jax.core import sharding
    from ept_jax.core.params import TRAINABLE
    from train.builder import build_abstract_model

    model, n_tasks = build_abstract_model(config)
    out = parameter_summary(model, n_tasks)
    out["model"] = str(config.model.name_or_path)
    out["adapter"] = str(config.adapter.kind)
    if devices is not None:
        m = config.mesh
        data, fsdp, tensor = sharding.mesh_shape(int(m.data), int(m.fsdp), int(m.tensor), int(devices))
        sizes = {"data": data, "fsdp": fsdp, "tensor": tensor}
        _, trainable, frozen = nnx.split(model, TRAINABLE, ...)
        tb, fb = sharding.device_bytes(trainable, sizes), sharding.device_bytes(frozen, sizes)
        out["memory_per_device"] = {
            "devices": int(devices), "mesh": sizes, "frozen_weights": fb, "adapters": tb,
            "adapter_gradients_and_adam_moments": 3 * tb, "total_without_activations": fb + 4 * tb,
        }
    return out


def _human(n: float) -> str:
    for unit, div in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= div:
            return f"{n / div:.2f}{unit}"
    return f"{n:.0f}"


def format_summary(s: dict) -> str:
    lines = [
        f"model: {s['model']}  adapter: {s['adapter']}  tasks: {s['n_tasks']}  adapted Linears: {s['adapted_linears']}",
        f"base (frozen) parameters: {s['base']:,} ({_human(s['base'])})",
        f"trainable parameters:     {s['trainable']:,} ({_human(s['trainable'])}, "
        f"{s['trainable_percent']:.3f}% of base)",
    ]
    for kind, n in s["by_kind"].items():
        if n:
            lines.append(f"  {kind:<16} {n:>14,}")
    lines.append(
        f"trainable per task (A + B + kernels) / tasks: {s['trainable_per_task']:,.0f} "
        f"({_human(s['trainable_per_task'])}, the paper's params/task)"
    )
    mem = s.get("memory_per_device")
    if mem:
        mesh = " x ".join(f"{k} {v}" for k, v in mem["mesh"].items())
        gib = 2 ** 30
        lines.append(
            f"per device of {mem['devices']} (mesh {mesh}), activations excluded: frozen weights "
            f"{mem['frozen_weights'] / gib:.2f} GiB + adapters {mem['adapters'] / gib:.3f} GiB + their gradients "
            f"and AdamW moments {mem['adapter_gradients_and_adam_moments'] / gib:.3f} GiB = "
            f"{mem['total_without_activations'] / gib:.2f} GiB")
    return "\n".join(lines)


def main(argv):
    del argv
    try:
        s = summarize(_CONFIG.value, _DEVICES.value)
    except Exception as e:  # user errors print as one line
        if _VERBOSE.value:
            raise
        print(f"error: {e}", file=sys.stderr)
        sys.exit(EXIT_USER_ERROR)
    print(json.dumps(s) if _JSON.value else format_summary(s))


if __name__ == "__main__":
    _define_flags()
    app.run(main)

"""``python -m train.inspect --config CONFIG [--json]``: trainable parameters by kind, from abstract shapes only.

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

_CONFIG = _JSON = _VERBOSE = None  # absl flag holders, defined by _define_flags() when run as a program


def _define_flags() -> None:
    """Defines the command-line flags. Only when run as a program: importing this module (for
    :func:`summarize`) next to ``train.main``, which defines ``--config`` too, must not clash."""
    global _CONFIG, _JSON, _VERBOSE
    _CONFIG = config_flags.DEFINE_config_file("config", None, "ml_collections config file", lock_config=True)
    _JSON = flags.DEFINE_bool("json", False, "print one JSON object")
    _VERBOSE = flags.DEFINE_bool("verbose", False, "full tracebacks on errors")


def summarize(config) -> dict:
    """The parameter summary (see :func:`ept_jax.adapters.inspection.parameter_summary`) of ``config``'s model."""
    from train.builder import build_abstract_model

    model, n_tasks = build_abstract_model(config)
    out = parameter_summary(model, n_tasks)
    out["model"] = str(config.model.name_or_path)
    out["adapter"] = str(config.adapter.kind)
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
    return "\n".join(lines)


def main(argv):
    del argv
    try:
        s = summarize(_CONFIG.value)
    except Exception as e:  # user errors print as one line
        if _VERBOSE.value:
            raise
        print(f"error: {e}", file=sys.stderr)
        sys.exit(EXIT_USER_ERROR)
    print(json.dumps(s) if _JSON.value else format_summary(s))


if __name__ == "__main__":
    _define_flags()
    app.run(main)

"""The XLA flags of the tests' subprocess runs: the session's (``scripts/test.sh``) kept, a simulated device count
dropped or set.

``scripts/test.sh`` exports compile-time XLA flags for every test process (measured there); a child that must not
inherit a ``--xla_force_host_platform_device_count`` (the number of CPU devices is the test's to choose) keeps the
rest, instead of dropping ``XLA_FLAGS`` altogether.
"""

from __future__ import annotations

import os

DEVICE_COUNT_FLAG = "--xla_force_host_platform_device_count"


def xla_flags(devices: int | None = None, base: str | None = None) -> str:
    """``base`` (default: this process's ``XLA_FLAGS``) without any device count, plus ``devices`` simulated CPU
    devices when given."""
    text = os.environ.get("XLA_FLAGS", "") if base is None else base
    kept = [f for f in text.split() if not f.startswith(DEVICE_COUNT_FLAG)]
    if devices is not None:
        kept.append(f"{DEVICE_COUNT_FLAG}={devices}")
    return " ".join(kept)


def set_xla_flags(env: dict[str, str], devices: int | None = None) -> dict[str, str]:
    """Sets ``env["XLA_FLAGS"]`` to :func:`xla_flags` of ``env``'s own (removing the key when nothing is left);
    returns ``env``."""
    flags = xla_flags(devices, env.get("XLA_FLAGS", ""))
    if flags:
        env["XLA_FLAGS"] = flags
    else:
        env.pop("XLA_FLAGS", None)
    return env

"""The XLA flags of the tests' subprocess runs: the session's (``scripts/test.sh``) kept, a simulated device count
dropped or set.

``scripts/test.sh`` exports compile-time XLA flags for every test process (measured there); a child that must not
inherit a ``--xla_force_host_platform_device_count`` (the number of CPU devices is the test's to choose) keeps the
rest, instead of dropping ``XLA_FLAGS`` altogether.
"""

from __future__ import annotations

from train.launch import DEVICE_COUNT_FLAG, without_device_count


def set_xla_flags(env: dict[str, str], devices: int | None = None) -> dict[str, str]:
    """Sets ``env["XLA_FLAGS"]`` to ``env``'s own without a device count (:func:`train.launch.without_device_count`),
    plus ``devices`` simulated CPU devices when given; removes the key when nothing is left. Returns ``env``."""
    flags = without_device_count(env.get("XLA_FLAGS", ""))
    if devices is not None:
        flags = f"{flags} {DEVICE_COUNT_FLAG}={devices}".strip()
    if flags:
        env["XLA_FLAGS"] = flags
    else:
        env.pop("XLA_FLAGS", None)
    return env

"""JAX's persistent compilation cache, on by default for the training programs.

A second run of the same config (a resume, the next grid point, the LoRA run of ``train.compare``) loads its
compiled step instead of compiling it again (minutes for a deep model on a CPU). The cache directory is, first
found: ``JAX_COMPILATION_CACHE_DIR`` (JAX's own variable, also honoured by JAX itself), ``EPT_COMPILATION_CACHE``,
``$XDG_CACHE_HOME/ept_jax/jax`` (``~/.cache/ept_jax/jax``). ``EPT_COMPILATION_CACHE=off`` turns it off. Programs
that compile in under ``EPT_COMPILATION_CACHE_MIN_SECS`` (default 1 s) are not cached.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

logger = logging.getLogger(__name__)


def cache_dir(env: dict | None = None) -> Path | None:
    """The directory the cache would use under ``env`` (default ``os.environ``), or None when it is off."""
    env = os.environ if env is None else env
    if env.get("JAX_COMPILATION_CACHE_DIR"):
        return Path(env["JAX_COMPILATION_CACHE_DIR"])
    own = env.get("EPT_COMPILATION_CACHE", "")
    if own.lower() in ("off", "0", "false", "none"):
        return None
    if own:
        return Path(own)
    base = Path(env.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "ept_jax" / "jax"


def enable(env: dict | None = None) -> Path | None:
    """Points JAX's persistent compilation cache at :func:`cache_dir` (unless JAX's config already names one);
    returns the directory in use, or None."""
    import jax

    env = os.environ if env is None else env
    current = jax.config.jax_compilation_cache_dir
    if current:
        return Path(current)
    path = cache_dir(env)
    if path is None:
        return None
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:  # a read-only home: run without the cache rather than fail
        logger.warning("compilation cache %s cannot be created (%s); compiling without it", path, e)
        return None
    jax.config.update("jax_compilation_cache_dir", str(path))
    jax.config.update("jax_persistent_cache_min_compile_time_secs",
                      float(env.get("EPT_COMPILATION_CACHE_MIN_SECS", "1")))
    return path

"""train.compile_cache: where the persistent compilation cache goes, and that JAX's own setting wins."""

from __future__ import annotations

from pathlib import Path

import jax

from train import compile_cache


def test_cache_dir_resolution():
    assert compile_cache.cache_dir({"JAX_COMPILATION_CACHE_DIR": "/a"}) == Path("/a")
    assert compile_cache.cache_dir({"EPT_COMPILATION_CACHE": "/b"}) == Path("/b")
    assert compile_cache.cache_dir({"EPT_COMPILATION_CACHE": "off"}) is None
    assert compile_cache.cache_dir({"XDG_CACHE_HOME": "/c"}) == Path("/c/ept_jax/jax")


def test_enable_sets_jax_config_unless_already_set(tmp_path):
    saved = (jax.config.jax_compilation_cache_dir, jax.config.jax_persistent_cache_min_compile_time_secs)
    try:
        jax.config.update("jax_compilation_cache_dir", None)
        env = {"EPT_COMPILATION_CACHE": str(tmp_path / "cc"), "EPT_COMPILATION_CACHE_MIN_SECS": "0"}
        got = compile_cache.enable(env)
        assert got == tmp_path / "cc" and got.is_dir()
        assert jax.config.jax_compilation_cache_dir == str(tmp_path / "cc")
        assert jax.config.jax_persistent_cache_min_compile_time_secs == 0.0
        # an existing setting (JAX's env variable, or the caller's) is kept
        assert compile_cache.enable({"EPT_COMPILATION_CACHE": str(tmp_path / "other")}) == tmp_path / "cc"
        jax.config.update("jax_compilation_cache_dir", None)
        assert compile_cache.enable({"EPT_COMPILATION_CACHE": "off"}) is None
        assert not jax.config.jax_compilation_cache_dir
    finally:
        jax.config.update("jax_compilation_cache_dir", saved[0])
        jax.config.update("jax_persistent_cache_min_compile_time_secs", saved[1])

"""Timing, memory, machine description and MFU: what every benchmark row records the same way.

A row's time is the median of ``reps`` timed calls after ``warmup`` untimed ones; every call ends with
``jax.block_until_ready`` (JAX) or a device synchronisation (PyTorch), so the time is the work, not its
dispatch. Compilation is timed on its own (``jit(...).lower(...).compile()``) and never enters the medians.

Memory, each figure named for what it is:
  ``xla_*_bytes``: ``compiled.memory_analysis()`` of the row's XLA program (argument, output, alias, temp;
    ``xla_peak_bytes`` = XLA's own peak estimate, or argument + output - alias + temp when it gives none);
  ``rss_peak_delta_bytes``: host only: the process's resident set size sampled every ~1 ms during the warm-up
    calls (not the timed ones), peak minus the value just before them (the memory the step allocates beyond what is
    already resident; a lower bound when an allocator reuses pages freed by earlier rows);
  ``device_peak_bytes_in_use``: GPU/TPU only: ``device.memory_stats()['peak_bytes_in_use']`` after the row
    (the process's high-water mark so far: it never goes down, rows run in the recorded order);
  ``torch_cuda_max_allocated_bytes``: the PyTorch peer on CUDA, reset before the row.
"""

from __future__ import annotations

import collections
import hashlib
import os
import platform
import re
import statistics
import threading
import time
from collections.abc import Callable
from typing import Any

import jax

from train import throughput

# The peak table and MFU live with the training log's throughput; re-exported for the benchmark rows.
PEAK_FLOPS, peak_flops, mfu = throughput.PEAK_FLOPS, throughput.peak_flops, throughput.mfu


def block(tree) -> Any:
    """Waits for every JAX array in ``tree`` (other leaves pass through) and returns it."""
    return jax.block_until_ready(tree)


def time_calls(fn: Callable[[], Any], *, reps: int, warmup: int = 1, sync: Callable[[Any], Any] = block,
               sampler: RssSampler | None = None) -> dict[str, Any]:
    """Times ``fn()``: ``warmup`` untimed calls, then ``reps`` timed ones, each followed by ``sync(result)``.

    A ``sampler`` watches the warm-up calls only (the first call allocates what the step needs; its thread would
    perturb the timed ones). Returns ``{"median_s", "times_s" (reps,), "warmup"}`` plus ``"rss_peak_delta_bytes"``
    when a sampler watched at least one call.
    Raises:
      ValueError: ``reps < 1`` or ``warmup < 0``.
    """
    if reps < 1 or warmup < 0:
        raise ValueError(f"reps={reps}, warmup={warmup}: need reps >= 1 and warmup >= 0")
    sampled = sampler is not None and warmup > 0
    if sampled:
        sampler.start()
    try:
        for _ in range(warmup):
            sync(fn())
    finally:
        delta = sampler.stop() if sampled else None
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        sync(fn())
        times.append(time.perf_counter() - t0)
    out: dict[str, Any] = {"median_s": statistics.median(times), "times_s": times, "warmup": warmup}
    if sampled:
        out["rss_peak_delta_bytes"] = delta
    return out


def use_compilation_cache(path: str | None) -> str | None:
    """Turns JAX's persistent compilation cache on at ``path`` for every program, however fast it compiles (None:
    off, the default), through :func:`train.compile_cache.enable`; returns the directory in use. A row's
    ``compile_s`` then records a load from the cache where the cache holds its program: the same command run twice
    gives the second run's compile times; the results JSON names the cache. Call before the first compilation."""
    if not path:
        return None
    from train import compile_cache

    used = compile_cache.enable({"EPT_COMPILATION_CACHE": str(path), "EPT_COMPILATION_CACHE_MIN_SECS": "0"})
    return None if used is None else str(used)


def settle_after_imports() -> None:
    """Imports what building a row's models needs (torch and transformers, for ``setups.hf_model``, where
    installed), then moves every object alive out of the garbage collector's view (:func:`train.gc_policy.settle`):
    each row's ``gc.collect`` (which frees the row before's device buffers) then costs milliseconds, not ~0.5 s,
    and tracing no longer pays full collections over the imported libraries."""
    try:
        import torch  # noqa: F401
        import transformers  # noqa: F401
    except ImportError:
        pass
    from train import gc_policy

    gc_policy.settle()


def compile_jit(fn: Callable, *args) -> tuple[Any, float]:
    """``(compiled, seconds)``: ``fn`` (a ``jax.jit`` object) lowered and compiled for ``args``."""
    t0 = time.perf_counter()
    compiled = fn.lower(*args).compile()
    return compiled, time.perf_counter() - t0


_INSTRUCTION = re.compile(r"\s*(?:ROOT )?%\S+ = (.+?) ([a-z][\w-]*)\(")


def program_fingerprint(compiled) -> str:
    """A digest of the compiled XLA program's instructions, as a multiset of (result shape, opcode) over every
    computation: names, metadata and source locations left out, so two programs that do the same operations on
    the same shapes (the base model and the EPT-merged one) get the same digest."""
    ops = collections.Counter(m.groups() for m in map(_INSTRUCTION.match, compiled.as_text().splitlines()) if m)
    return hashlib.sha1(repr(sorted(ops.items())).encode()).hexdigest()[:16]


def xla_memory(compiled) -> dict[str, int] | None:
    """The ``xla_*_bytes`` figures of a compiled program (see the module docstring), or None when the backend
    reports none."""
    try:
        m = compiled.memory_analysis()
    except Exception:  # noqa: BLE001 - some backends do not implement it
        return None
    if m is None:
        return None
    arg, out, alias, temp = (int(getattr(m, f"{k}_size_in_bytes", 0) or 0)
                             for k in ("argument", "output", "alias", "temp"))
    peak = int(getattr(m, "peak_memory_in_bytes", 0) or 0) or arg + out - alias + temp
    return {"xla_argument_bytes": arg, "xla_output_bytes": out, "xla_alias_bytes": alias, "xla_temp_bytes": temp,
            "xla_peak_bytes": peak}


def device_peak_bytes() -> int | None:
    """``peak_bytes_in_use`` of the first JAX device (None on CPU, whose devices report no memory stats)."""
    stats = jax.devices()[0].memory_stats()
    if not stats or "peak_bytes_in_use" not in stats:
        return None
    return int(stats["peak_bytes_in_use"])


def rss_bytes() -> int | None:
    """The process's current resident set size in bytes (Linux ``/proc/self/statm``), or None elsewhere."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None


class RssSampler:
    """Samples :func:`rss_bytes` on a background thread between :meth:`start` and :meth:`stop`."""

    def __init__(self, interval_s: float = 0.001):
        self.interval_s = interval_s
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.base: int | None = None
        self.peak: int | None = None

    def _loop(self) -> None:
        while not self._stop.is_set():
            v = rss_bytes()
            if v is not None and (self.peak is None or v > self.peak):
                self.peak = v
            self._stop.wait(self.interval_s)

    def start(self) -> None:
        """Records the baseline and starts sampling."""
        self.base = self.peak = rss_bytes()
        self._stop.clear()
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()

    def stop(self) -> int | None:
        """Stops sampling; returns peak minus baseline in bytes (None when RSS cannot be read)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        last = rss_bytes()
        if self.base is None or self.peak is None:
            return None
        return max(self.peak, last or 0) - self.base


def cpu_model() -> str:
    """The CPU's model name (``/proc/cpuinfo``; ``platform.processor()`` elsewhere)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def package_version(mod: str) -> str | None:
    try:
        from importlib.metadata import version

        return version(mod)
    except Exception:  # noqa: BLE001 - not installed
        return None


def machine() -> dict[str, Any]:
    """What the numbers were measured on: CPU model and cores, JAX backend / device kind / count, versions."""
    dev = jax.devices()[0]
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:
        usable = os.cpu_count()
    return {
        "cpu_model": cpu_model(),
        "cpu_count": os.cpu_count(),
        "cpu_usable": usable,
        "platform": platform.platform(),
        "python": platform.python_version(),
        "jax_backend": jax.default_backend(),
        "jax_device_kind": dev.device_kind,
        "jax_device_count": jax.device_count(),
        "versions": {m: package_version(m) for m in ("jax", "jaxlib", "flax", "optax", "torch", "transformers", "peft",
                                                    "qwix")},
    }


def machine_slug(info: dict[str, Any]) -> str:
    """A file-name-safe name of the machine: the accelerator kind, or the CPU model and usable core count."""
    if info["jax_backend"] != "cpu":
        name = f"{info['jax_backend']}_{info['jax_device_kind']}"
    else:
        name = f"cpu_{info['cpu_model']}_{info['cpu_usable']}cores"
    return re.sub(r"[^a-z0-9]+", "_", name.lower()).strip("_")

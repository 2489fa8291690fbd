"""The C heap allocator a benchmark runs under (``python -m benchmarks.run --allocator tcmalloc``).

XLA's CPU runtime takes each execution's temporary buffer from the C heap and gives it back when the call
ends. glibc's malloc serves a buffer that large with a fresh ``mmap`` and returns it with ``munmap``, so every
training step page-faults its whole working set in again (the kernel zeroes each page: ``clear_page_erms`` is
about a tenth of the CPU time of a T5-small step on a 2-core VM). tcmalloc keeps freed spans mapped and
reuses them. :func:`ensure` re-executes the process with the library in ``LD_PRELOAD`` (the allocator must be
in place before the first allocation, so it cannot be switched in a running interpreter); :func:`loaded`
reads ``/proc/self/maps`` to say which allocator the process really has, which the results JSON records.

``python -m benchmarks.allocator NAME`` re-executes itself under NAME and prints the allocator it then has and
the library's path (exit 2, one line, when NAME is unknown or its library missing).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

# name -> (shared objects to look for, in order; the Debian/Ubuntu package that ships the first)
LIBRARIES: dict[str, tuple[tuple[str, ...], str]] = {
    "tcmalloc": (("libtcmalloc_minimal.so.4", "libtcmalloc.so.4"), "libtcmalloc-minimal4"),
    "jemalloc": (("libjemalloc.so.2",), "libjemalloc2"),
}
CHOICES = ("default", *LIBRARIES)
SEARCH_DIRS = ("/usr/lib/x86_64-linux-gnu", "/usr/lib/aarch64-linux-gnu", "/usr/lib64", "/usr/lib",
               "/usr/local/lib", "/lib/x86_64-linux-gnu")
# set in the re-executed process: a second failure to load the library is an error, not another exec
_REEXEC_ENV = "EPT_BENCH_ALLOCATOR_REEXEC"


def find(name: str, dirs: tuple[str, ...] | None = None) -> str:
    """The path of allocator ``name``'s shared object; ValueError naming the value when it is unknown or absent."""
    if name not in LIBRARIES:
        raise ValueError(f"--allocator={name!r}: accepted {', '.join(CHOICES)}")
    libs, package = LIBRARIES[name]
    dirs = SEARCH_DIRS if dirs is None else dirs
    for lib in libs:
        for d in dirs:
            p = Path(d) / lib
            if p.is_file():
                return str(p)
    raise ValueError(f"--allocator={name}: none of {', '.join(libs)} under {', '.join(dirs)} "
                     f"(on Debian/Ubuntu: apt-get install {package})")


def loaded(maps: str | None = None) -> str:
    """Which allocator this process runs: ``'tcmalloc'``, ``'jemalloc'`` (its library is mapped) or ``'glibc'``;
    ``'unknown'`` without ``/proc/self/maps``. ``maps``: that file's text (for tests)."""
    if maps is None:
        try:
            maps = Path("/proc/self/maps").read_text()
        except OSError:
            return "unknown"
    for name, (libs, _) in LIBRARIES.items():
        if any(lib.split(".so")[0] + ".so" in maps for lib in libs):
            return name
    return "glibc"


def preload_env(path: str, env: dict[str, str]) -> dict[str, str]:
    """``env`` with ``path`` first in ``LD_PRELOAD`` (the others kept) and the re-exec marker set."""
    rest = [p for p in env.get("LD_PRELOAD", "").replace(":", " ").split() if p and p != path]
    return {**env, "LD_PRELOAD": " ".join([path, *rest]), _REEXEC_ENV: "1"}


def ensure(name: str, module: str, argv: list[str]) -> None:
    """Make this process run under allocator ``name``: returns at once for ``'default'`` or when it is already
    loaded, else replaces the process by ``python -m module *argv`` with the library preloaded (does not return).
    ValueError naming the value when the library is missing or a re-executed process still lacks it."""
    if name == "default":
        return
    path = find(name)
    if loaded() == name:
        return
    if os.environ.get(_REEXEC_ENV):
        raise ValueError(f"--allocator={name}: {path} is in LD_PRELOAD={os.environ.get('LD_PRELOAD', '')!r} "
                         "but not loaded (the dynamic loader refused it)")
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, [sys.executable, "-m", module, *argv], preload_env(path, dict(os.environ)))


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if len(argv) != 1:
        print(f"usage: python -m benchmarks.allocator {{{','.join(CHOICES)}}}", file=sys.stderr)
        return 2
    try:
        ensure(argv[0], "benchmarks.allocator", argv)
        print(loaded(), find(argv[0]) if argv[0] != "default" else "")
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env bash
# The test suite, as the README gives it: tests/unit (in-process) and tests/e2e (runs of the programs: in-process, or
# subprocesses where a process must die, several run or the command line itself is tested).
# Offline: nothing is fetched from the Hugging Face hub.
set -euo pipefail
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1
export JAX_PLATFORMS="${JAX_PLATFORMS:-cpu}"
# XLA's backend optimisations off (LLVM -O0, no expensive passes): the tests' programs are tiny, so compiling them
# dominates and running them unoptimised costs nothing; the same values to rounding (every tolerance unchanged).
# Subprocesses inherit it.
export JAX_DISABLE_MOST_OPTIMIZATIONS="${JAX_DISABLE_MOST_OPTIMIZATIONS:-1}"
# XLA:CPU's older loop emitters instead of its MLIR fusion emitters, which compiled every fusion through MLIR pattern
# rewriting on extra threads: a smoke run's first (uncached) start took 24-27 s of CPU, 14-21 s with this (3 runs each);
# tests/unit/test_layer_scan.py + test_reference_training.py 215 -> 167 s. Every tolerance unchanged. Subprocesses
# inherit it: the tests that set a simulated device count keep the other flags (tests/child_env.py).
export XLA_FLAGS="${XLA_FLAGS:+$XLA_FLAGS }--xla_cpu_use_fusion_emitters=false"
# One persistent compilation cache for the session (train.compile_cache), every program in it however fast it
# compiled: the tests' subprocess runs of one config compile once. Fresh per session, so a local run is timed as CI's
# clean machine is; EPT_COMPILATION_CACHE set by the caller wins.
if [ -z "${EPT_COMPILATION_CACHE:-}" ]; then
  EPT_COMPILATION_CACHE="$(mktemp -d "${TMPDIR:-/tmp}/ept-test-cache.XXXXXX")"
  export EPT_COMPILATION_CACHE
  trap 'rm -rf "$EPT_COMPILATION_CACHE"' EXIT
fi
export EPT_COMPILATION_CACHE_MIN_SECS="${EPT_COMPILATION_CACHE_MIN_SECS:-0}"
# Two workers on CI's 2 cores: three were not faster in a clean clone (14 min 41 s of tests, 1652 s of CPU; two:
# 13-15.5 min, 1410-1683 s on this noisy VM), XLA's thread pools oversubscribing the cores. --dist loadscope (a
# module's tests on one worker, so none waits on a module's shared run) was not faster either: 10:53 of tests against
# 10:35, the two cores already ~95% busy.
python -m pytest -q -n "${PYTEST_WORKERS:-2}" --durations=15 "$@"

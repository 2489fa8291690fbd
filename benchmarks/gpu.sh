#!/usr/bin/env bash
# The GPU suite (docs/gpu_suite.md): T5-base and a LLaMA-1B-shaped model, random bfloat16 weights, the rows limit /
# ept_reference / ept_paper / lora (+ qwix_lora when qwix is there), one results JSON, within 8 minutes.
#
#   bash benchmarks/gpu.sh [--dry-run] [--out FILE] [other python -m benchmarks.gpu_suite options]
#
# No internet needed: the wheels the image lacks (ml_collections; qwix, optional) are installed from
# $EPT_WHEELS (default benchmarks/wheels) with pip --no-index, only when the module is missing. --dry-run runs the
# same code on tiny models on the CPU (JAX_PLATFORMS=cpu unless set) in seconds.
# Environment: PYTHON (default python3), EPT_WHEELS, EPT_GPU_TIMEOUT_S (hard stop, default 470 s; the suite itself
# starts no row after --budget-s, default 420 s).
set -euo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO"
PY="${PYTHON:-python3}"
command -v "$PY" >/dev/null 2>&1 || PY=python
WHEELS="${EPT_WHEELS:-$REPO/benchmarks/wheels}"

dry=0
for a in "$@"; do [ "$a" = "--dry-run" ] && dry=1; done

# Carried wheels: ml_collections (configs.common imports it) and, optional, qwix. Installed only when missing, from
# the folder alone; when site-packages is read-only, into benchmarks/.gpu_site on PYTHONPATH.
install_missing() {  # module, pip name
  "$PY" -c "import $1" >/dev/null 2>&1 && return 0
  if ! ls "$WHEELS"/"$2"-*.whl >/dev/null 2>&1; then
    echo "gpu.sh: $1 not importable and no $2 wheel in $WHEELS" >&2
    return 0
  fi
  echo "gpu.sh: installing $2 from $WHEELS" >&2
  if ! "$PY" -m pip install -q --no-index --find-links "$WHEELS" --no-deps "$2" >&2; then
    "$PY" -m pip install -q --no-index --find-links "$WHEELS" --no-deps --target "$REPO/benchmarks/.gpu_site" "$2" >&2
    export PYTHONPATH="$REPO/benchmarks/.gpu_site${PYTHONPATH:+:$PYTHONPATH}"
  fi
}
install_missing ml_collections ml_collections
install_missing qwix qwix
if [ -d "$REPO/benchmarks/.gpu_site" ] && [[ ":${PYTHONPATH:-}:" != *":$REPO/benchmarks/.gpu_site:"* ]]; then
  export PYTHONPATH="$REPO/benchmarks/.gpu_site${PYTHONPATH:+:$PYTHONPATH}"
fi

export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
if [ "$dry" = 1 ]; then
  # tiny programs whose timings mean nothing: compile them fast (as scripts/test.sh does)
  export JAX_PLATFORMS="${JAX_PLATFORMS:-cpu}" JAX_DISABLE_MOST_OPTIMIZATIONS="${JAX_DISABLE_MOST_OPTIMIZATIONS:-1}"
  exec "$PY" -m benchmarks.gpu_suite "$@"
fi
# A hard stop below 8 minutes; the JSON holds every row finished before it ("complete": false).
rc=0
timeout --signal=TERM --kill-after=10 "${EPT_GPU_TIMEOUT_S:-470}" "$PY" -m benchmarks.gpu_suite "$@" || rc=$?
if [ "$rc" = 124 ] || [ "$rc" = 137 ]; then
  echo "gpu.sh: stopped after ${EPT_GPU_TIMEOUT_S:-470}s; the results JSON keeps the finished rows" >&2
fi
exit "$rc"

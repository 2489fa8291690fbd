#!/usr/bin/env bash
# The test suite, as the README gives it. Offline: nothing is fetched from the Hugging Face hub.
set -euo pipefail
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1
export JAX_PLATFORMS="${JAX_PLATFORMS:-cpu}"
exec python -m pytest -q -n "${PYTEST_WORKERS:-2}" --durations=15 "$@"

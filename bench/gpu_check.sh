#!/usr/bin/env bash
# The GPU check with the machine's own python3 (see bench/gpu_check.py); results in $OUT, else ./gpu-results.
exec "${PYTHON:-python3}" "$(dirname "$0")/gpu_check.py" "$@"

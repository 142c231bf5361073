#!/usr/bin/env bash
# Set up (idempotent) and run the whole test suite on CPU with gloo.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
. launch/setup.sh
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
exec python -m pytest -q tests "$@"

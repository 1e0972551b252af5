#!/usr/bin/env bash
# Set up (.venv, torch, fdp with its test extras, the CUDA extension where nvcc
# exists) and run the test suite. Triton kernels run on the CPU through the
# Triton interpreter. Extra arguments go to pytest.
set -euo pipefail
FDP_EXTRAS=test
. "$(dirname "$0")/setup.sh"
python -m pytest -q -p no:cacheprovider "$@"

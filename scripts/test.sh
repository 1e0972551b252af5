#!/usr/bin/env bash
# Set up (.venv, torch, fdp with its test extras, the CUDA extension where nvcc
# exists) and run the test suite. Triton kernels run on the CPU through the
# Triton interpreter. Extra arguments go to pytest.
set -euo pipefail
FDP_EXTRAS=test
FDP_EXTENSION=build
. "$(dirname "$0")/setup.sh"
say "running the tests (python -m pytest -q $*)"
python -m pytest -q -p no:cacheprovider "$@"

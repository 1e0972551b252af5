#!/usr/bin/env bash
# Set up (.venv, torch, fdp with its test extras, the CUDA extension where nvcc
# exists, LeRobot and the fdp policy type) and run the test suite. Triton
# kernels run on the CPU through the Triton interpreter. Extra arguments go
# to pytest.
set -euo pipefail
FDP_EXTRAS=test
FDP_EXTENSION=build
# LeRobot too (tests/test_lerobot_plugin.py); FDP_LEROBOT=0 leaves it out, and those tests skip.
FDP_LEROBOT="${FDP_LEROBOT:-1}"
. "$(dirname "$0")/setup.sh"
# Where LeRobot was installed, its tests must run: a broken install fails them instead of skipping.
export FDP_REQUIRE_LEROBOT="$FDP_LEROBOT"
# Likewise the test extra it installed (pyflakes for tests/test_static_checks.py).
export FDP_REQUIRE_TEST_EXTRAS=1
say "running the tests (python -m pytest -q $*)"
python -m pytest -q -p no:cacheprovider "$@"

#!/usr/bin/env bash
# Set up (.venv, torch, fdp with its demo extras; no CUDA compile: the demo
# samples on the CPU) and run `fdp demo`. Extra arguments go to `fdp demo`
# (see `fdp demo --help`; --quick is a smoke run in seconds).
set -euo pipefail
FDP_EXTRAS=demo
FDP_EXTENSION=keep
. "$(dirname "$0")/setup.sh"
fdp demo "$@"

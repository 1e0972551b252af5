#!/usr/bin/env bash
# Set up (.venv, torch, fdp with its demo extras) and run `fdp demo`.
# Extra arguments go to `fdp demo` (see `fdp demo --help`).
set -euo pipefail
FDP_EXTRAS=demo
. "$(dirname "$0")/setup.sh"
fdp demo "$@"

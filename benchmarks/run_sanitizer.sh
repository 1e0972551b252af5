#!/usr/bin/env bash
# compute-sanitizer over the GPU tests of the CUDA kernels (backend "cuda" and
# "cuda-persistent"): memcheck (out-of-bounds and misaligned accesses, including
# distributed shared memory) and racecheck (shared-memory hazards), with PyTorch's
# caching allocator off so every tensor is its own allocation and overruns are seen.
#
#   bash benchmarks/run_sanitizer.sh                 # memcheck + racecheck on the GPU tests
#   TOOLS="memcheck synccheck" bash benchmarks/run_sanitizer.sh -k reference
#
# Extra arguments go to pytest; PYTHON names the interpreter (default python). Needs a CUDA GPU and
# compute-sanitizer on PATH (CUDA toolkit).
set -euo pipefail
cd "$(dirname "$0")/.."
if ! command -v compute-sanitizer >/dev/null 2>&1; then
  echo "compute-sanitizer not found (it ships with the CUDA toolkit: \$CUDA_HOME/bin)" >&2
  exit 2
fi
export PYTORCH_NO_CUDA_MEMORY_CACHING=1
TOOLS="${TOOLS:-memcheck racecheck}"
# The graph test replays captured launches; sanitizers instrument those too, but it is slow
# under racecheck, so racecheck runs the kernel-level tests only by default.
status=0
for tool in $TOOLS; do
  echo "== compute-sanitizer --tool $tool"
  filter=()
  if [ "$tool" = "racecheck" ] && [ "$#" -eq 0 ]; then
    filter=(-k "reference or decompositions or skips or in_place")
  fi
  extra=()
  case "$tool" in
    memcheck) extra=(--leak-check no --padding 32) ;;
    racecheck) extra=(--racecheck-report analysis) ;;
  esac
  if ! compute-sanitizer --tool "$tool" "${extra[@]}" --error-exitcode 99 --target-processes all \
      "${PYTHON:-python}" -m pytest -q -p no:cacheprovider -m gpu tests/test_fused_mlp.py \
      --deselect tests/test_fused_mlp.py::test_native_kernels_on_gpu "${filter[@]}" "$@"; then
    echo "== $tool reported errors" >&2
    status=1
  fi
done
exit $status

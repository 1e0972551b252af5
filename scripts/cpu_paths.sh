#!/usr/bin/env bash
# The cross-implementation tests (those whose bounds are derived from the computation, docs/testing.md)
# under CPU kernel paths other than the CI machine's: 1 and 2 threads, oneDNN off, ATen's AVX2 kernels (a
# CPU without AVX-512) and its scalar ones, MKL limited to AVX2, MKL's reproducible mode, oneDNN limited
# to AVX2. A bound that holds on one machine only fails here.
#
#   bash scripts/cpu_paths.sh                 # every configuration, pytest -x -q
#   PYTHON=/path/to/venv/bin/python bash scripts/cpu_paths.sh -k lerobot    # extra pytest arguments
#   CONFIGS="threads-1 aten-default" bash scripts/cpu_paths.sh               # some configurations only
#   SCOPE=core bash scripts/cpu_paths.sh      # only the cross-implementation comparisons (much faster)
#
# The LeRobot tests need LeRobot importable (else they skip): run with a venv that has it.
# Each configuration first prints the kernel path it got (ATen's CPU capability, oneDNN, threads), so a
# variable this torch build ignores shows as such. Exit status: the number of configurations that failed.
set -u
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python}
export PYTHONPATH="$PWD/python:$PWD:$PWD/integrations/lerobot_policy_fdp${PYTHONPATH:+:$PYTHONPATH}"

ALL=(
  tests/test_integrations_lerobot.py tests/test_sampler.py tests/test_single.py tests/test_export.py
  tests/test_schedulers.py tests/test_precision.py tests/test_call_path.py tests/test_unet.py
  tests/test_packing.py tests/test_integrations_diffusion_policy.py
)
# SCOPE=core: only the comparisons across implementations of those files (about 1/10 of the time of all
# of them, most of which check arguments and messages, the same on every CPU).
CORE=(
  tests/test_integrations_lerobot.py::test_load_pretrained_returns_lerobots_actions
  tests/test_integrations_lerobot.py::test_accelerate_real_lerobot
  tests/test_integrations_lerobot.py::test_accelerate_draws_noise_as_lerobot
  tests/test_sampler.py::test_same_seed_same_actions_as_diffusers
  tests/test_single.py::test_for_unet_matches_a_diffusers_loop
  tests/test_export.py::test_onnx_round_trip
  tests/test_call_path.py::test_compile_fullgraph_matches_eager
  tests/test_unet.py::test_per_sample_timesteps_match_single_sample_calls
  tests/test_unet.py::test_float64_model_matches_float32
  tests/test_packing.py
  tests/test_integrations_diffusion_policy.py::test_accelerate_matches_the_original_loop
  tests/test_integrations_diffusion_policy.py::test_inpainting_is_served_with_the_originals_rule
)
case "${SCOPE:-all}" in
  all) FILES=("${ALL[@]}") ;;
  core) FILES=("${CORE[@]}") ;;
  *) echo "SCOPE must be all or core, got ${SCOPE}" >&2; exit 2 ;;
esac

# name -> environment. FDP_TEST_THREADS / FDP_TEST_MKLDNN are read by tests/conftest.py (which otherwise
# pins 1 thread); the others by ATen, MKL and oneDNN at start-up.
declare -A ENVS=(
  [threads-1]="FDP_TEST_THREADS=1 OMP_NUM_THREADS=1"
  [threads-2]="FDP_TEST_THREADS=2 OMP_NUM_THREADS=2"
  [onednn-off]="FDP_TEST_MKLDNN=0"
  [aten-avx2]="ATEN_CPU_CAPABILITY=avx2"
  [aten-default]="ATEN_CPU_CAPABILITY=default"
  [mkl-avx2]="MKL_ENABLE_INSTRUCTIONS=AVX2"
  [mkl-cbwr]="MKL_CBWR=COMPATIBLE"
  [onednn-avx2]="ONEDNN_MAX_CPU_ISA=AVX2"
)
ORDER=(threads-1 threads-2 onednn-off aten-avx2 aten-default mkl-avx2 mkl-cbwr onednn-avx2)
read -r -a SELECTED <<< "${CONFIGS:-${ORDER[*]}}"

PROBE='
import os, torch
if os.environ.get("FDP_TEST_MKLDNN", "1") == "0":
    torch.backends.mkldnn.enabled = False
torch.set_num_threads(int(os.environ.get("FDP_TEST_THREADS", "1")))
print(f"  ATen capability {torch.backends.cpu.get_cpu_capability()}, oneDNN {torch.backends.mkldnn.enabled}, "
      f"threads {torch.get_num_threads()}")'

failed=0
declare -A RESULT
for name in "${SELECTED[@]}"; do
  [[ -n "${ENVS[$name]+x}" ]] || { echo "unknown configuration $name (known: ${ORDER[*]})" >&2; exit 2; }
  echo "== $name: ${ENVS[$name]}"
  env ${ENVS[$name]} "$PYTHON" -c "$PROBE"
  # A fresh Inductor cache per configuration: Inductor reuses kernels compiled under another
  # ATEN_CPU_CAPABILITY from its shared cache, and those give garbage (1e23..1e28 here).
  inductor_cache=$(mktemp -d -t fdp-cpu-paths-inductor-XXXXXX)
  start=$SECONDS
  if env ${ENVS[$name]} TORCHINDUCTOR_CACHE_DIR="$inductor_cache" \
      "$PYTHON" -m pytest -x -q -p no:cacheprovider "${FILES[@]}" "$@"; then
    RESULT[$name]="pass ($((SECONDS - start)) s)"
  else
    RESULT[$name]="FAIL ($((SECONDS - start)) s)"
    failed=$((failed + 1))
  fi
  rm -rf "$inductor_cache"
done
echo
echo "== $(date -u +%F) $(uname -m), $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ //')"
for name in "${SELECTED[@]}"; do
  printf '%-13s %-45s %s\n' "$name" "${ENVS[$name]}" "${RESULT[$name]}"
done
exit "$failed"

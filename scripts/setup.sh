# Sourced by scripts/test.sh and scripts/demo.sh: a virtual environment in
# .venv with torch and fdp installed from this checkout (with the extras in
# $FDP_EXTRAS), and LeRobot with the fdp policy type where FDP_LEROBOT=1.
# Keeps an existing torch: users bring the build that matches their CUDA;
# FDP_TORCH says which to install when there is none.
#
# The CUDA extension fdp._C: with FDP_EXTENSION=build (test.sh) it is built
# wherever nvcc is on PATH; with FDP_EXTENSION=keep (demo.sh, which samples on
# the CPU) it is built only when an earlier build exists in build/ (then only
# changed sources recompile), so that the demo never starts a first compile. FDP_BUILD_EXTENSION=ON or OFF overrides
# both. Compiles are incremental: build/ keeps the objects between installs.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
_fdp_t0=$SECONDS
say() { printf '[setup %3ds] %s\n' "$((SECONDS - _fdp_t0))" "$*"; }
# pip's own exit status survives the filter (pipefail); the filter only drops
# this machine's noise about missing local package mirrors. --no-compile:
# byte-compiling all of torch at install cost 3x the CPU time of installing
# it (measured); Python compiles the modules it imports on first use.
pipq() { python -m pip "$@" --no-compile --disable-pip-version-check 2>&1 | { grep -v '^WARNING: Location' || true; }; }
# pip -q prints nothing while it works: `ticking WHAT cmd...` runs cmd with a line every 20 s saying what
# runs and for how long, and, once the CUDA extension compiles, how many of its objects are done.
_fdp_objects=$(ls csrc/*.cu csrc/*.cpp 2>/dev/null | wc -l)
ticking() {
  local what=$1 stamp tick rc=0 start=$SECONDS
  shift
  stamp=$(mktemp)
  (
    while sleep 20; do
      n=$(find build -path '*/fdp_ext/CMakeFiles/_C.dir/*' -name '*.o' -newer "$stamp" 2>/dev/null | wc -l)
      if [ -d build ] && [ -n "$(find build -path '*/fdp_ext/*' -newer "$stamp" 2>/dev/null | head -n 1)" ]; then
        say "... $what: $((SECONDS - start)) s so far; CUDA extension: $n of $_fdp_objects objects compiled"
      else
        say "... $what: $((SECONDS - start)) s so far"
      fi
    done
  ) &
  tick=$!
  "$@" || rc=$?
  kill "$tick" 2>/dev/null || true
  wait "$tick" 2>/dev/null || true
  rm -f "$stamp"
  return "$rc"
}

if [ ! -x .venv/bin/python ]; then
  say "creating .venv with ${PYTHON:-python3}"
  "${PYTHON:-python3}" -m venv .venv
  # shellcheck disable=SC1091
  . .venv/bin/activate
  # An old pip would build fdp in a temporary copy of the checkout and so
  # could never reuse build/.
  pipq install -q --upgrade pip
else
  # shellcheck disable=SC1091
  . .venv/bin/activate
fi

_fdp_torch=$(python -c "import torch; print(torch.__version__)" 2>/dev/null || true)
if [ -n "$_fdp_torch" ]; then
  say "torch $_fdp_torch is already in .venv: keeping it"
else
  say "installing ${FDP_TORCH:-torch==2.13.0} (set FDP_TORCH to pick another build)"
  ticking "installing torch" pipq install -q "${FDP_TORCH:-torch==2.13.0}"
fi

# With a GPU, build for the GPUs present (auto, see cmake/cuda_archs.cmake); without one, test.sh builds
# one architecture, enough to prove the CUDA sources compile (the portable list takes 5x as long).
if nvidia-smi --query-gpu=compute_cap --format=csv,noheader >/dev/null 2>&1; then
  export FDP_CUDA_ARCHS="${FDP_CUDA_ARCHS:-auto}"
else
  export FDP_CUDA_ARCHS="${FDP_CUDA_ARCHS:-90}"
fi
_fdp_prior_build=$(ls build/*/fdp_ext/_C*.so 2>/dev/null | head -n 1 || true)
_fdp_ext="${FDP_BUILD_EXTENSION:-}"
if [ -z "$_fdp_ext" ]; then
  if [ "${FDP_EXTENSION:-build}" = keep ] && [ -z "$_fdp_prior_build" ]; then
    _fdp_ext=OFF
    say "not compiling the CUDA extension: the demo samples on the CPU and does not use it" \
        "(bash scripts/test.sh builds it where nvcc exists; FDP_BUILD_EXTENSION=ON forces it)"
  else
    _fdp_ext=ON
  fi
fi
if [ "$_fdp_ext" = ON ]; then
  if ! command -v nvcc >/dev/null; then
    say "no nvcc on PATH: installing without the CUDA extension (\`fdp info\` says why)"
  elif [ -n "$_fdp_prior_build" ]; then
    say "CUDA extension: reusing the build in $(dirname "$_fdp_prior_build") (only changed csrc/ files recompile)"
  else
    say "compiling the CUDA extension for GPU architecture(s) $FDP_CUDA_ARCHS: a first build takes about" \
        "2 minutes on 2 cores for one architecture, 5 for all five (later runs reuse build/; FDP_BUILD_EXTENSION=OFF skips it)"
  fi
fi
say "installing fdp from this checkout with the extras [${FDP_EXTRAS}]"
FDP_BUILD_EXTENSION=$_fdp_ext ticking "installing fdp" pipq install -q ".[${FDP_EXTRAS}]"
# LeRobot and the fdp policy type for it (integrations/lerobot_policy_fdp), with FDP_LEROBOT=1
# (scripts/test.sh sets it: tests/test_lerobot_plugin.py trains with LeRobot's own trainer).
# LeRobot 0.4.4 pins torch<2.11, so it and the packages its trainer imports whose pins would move
# torch or the hub client go in with --no-deps; the rest resolve normally. PyPI's torchvision is a
# CUDA build whose extension cannot load beside a CPU torch: the tests declare the two operators its
# import needs (tests/torchvision_cpu.py). Not installed (not needed to train): wandb, opencv,
# torchcodec, rerun, pynput.
if [ "${FDP_LEROBOT:-0}" = 1 ]; then
  say "installing LeRobot 0.4.4 (--no-deps beside torch $(python -c 'import torch; print(torch.__version__)')), the packages its trainer imports, and the fdp policy type"
  ticking "installing LeRobot" pipq install -q --no-warn-conflicts --no-deps lerobot==0.4.4 accelerate==1.16.0 av==18.1.0 imageio==2.38.2 \
      pyserial==3.5 deepdiff==8.6.2 orderly-set==5.5.0 cachebox==6.2.10 "${FDP_TORCHVISION:-torchvision==0.28.0}"
  ticking "installing what LeRobot's trainer imports" pipq install -q --no-warn-conflicts draccus==0.10.0 einops==0.8.2 datasets==5.2.0 termcolor==3.3.0 gymnasium==1.4.0
  pipq install -q --no-warn-conflicts --no-deps ./integrations/lerobot_policy_fdp
  say "LeRobot installed: lerobot-train --policy.type=fdp is available"
fi
# Fails here, clearly, if the install did not work.
_fdp_state=$(python -c 'import fdp; print("fdp", fdp.__version__, "with the CUDA extension"
                        if fdp.extension_status()["available"] else "without the CUDA extension")')
say "ready: $_fdp_state"

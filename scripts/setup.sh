# Sourced by scripts/test.sh and scripts/demo.sh: a virtual environment in
# .venv with torch and fdp installed from this checkout (with the extras in
# $FDP_EXTRAS). Keeps an existing torch: users bring the build that matches
# their CUDA; FDP_TORCH says which to install when there is none.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
if [ ! -x .venv/bin/python ]; then
  "${PYTHON:-python3}" -m venv .venv
fi
# shellcheck disable=SC1091
. .venv/bin/activate
# pip's own exit status survives the filter (pipefail); the filter only drops
# this machine's noise about missing local package mirrors.
pipq() { python -m pip "$@" --disable-pip-version-check 2>&1 | { grep -v '^WARNING: Location' || true; }; }
pipq install -q --upgrade pip
if ! python -c "import torch" 2>/dev/null; then
  pipq install -q "${FDP_TORCH:-torch==2.13.0}"
fi
# One GPU architecture is enough to prove the CUDA sources compile; users
# installing for real get the full list from pyproject.toml.
export FDP_CUDA_ARCHS="${FDP_CUDA_ARCHS:-90}"
pipq install -q ".[${FDP_EXTRAS}]"
python -c "import fdp" # fail here, clearly, if the install did not work

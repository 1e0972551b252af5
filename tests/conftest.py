import os
import tempfile

import pytest
import torch

# backend="auto" caches its decisions on disk: never in the user's cache from tests (removed at exit).
_CACHE_DIR = tempfile.TemporaryDirectory(prefix="fdp-test-cache-")
os.environ.setdefault("FDP_CACHE_DIR", _CACHE_DIR.name)

from helpers import make_mlp_policy  # noqa: E402
from torchvision_cpu import install as _torchvision_importable  # noqa: E402

# scripts/test.sh installs LeRobot beside the CPU torch build; its torchvision needs this before any import.
_torchvision_importable()


def pytest_configure(config):
    # In-process Triton tests run the kernels in the Triton interpreter, on CPU tensors, on every
    # machine; native GPU runs happen in subprocesses without this variable (see test_fused_mlp.py,
    # test_call_path.py, test_unet_fused.py). The switch is read when Triton and the kernels are first
    # imported, so it is set before any test module (or diffusers, which may import Triton) loads; here,
    # in pytest's own start-up, which those subprocesses never run (they import tests/helpers.py).
    os.environ.setdefault("TRITON_INTERPRET", "1")
    if os.environ["TRITON_INTERPRET"] == "1":
        _check_the_interpreter_runs_scalar_loops()


def _check_the_interpreter_runs_scalar_loops():
    """Stop at once, saying why, where this Triton's interpreter cannot run fdp's kernels: Triton 3.6's turns an
    int argument used as a loop bound into a Python int with ``int()`` of a 1-element array, which NumPy 2.4 made
    an error (newer Triton squeezes it first). Without this every interpreted kernel test fails inside Triton."""
    try:
        import triton
        import triton.language as tl
    except ImportError:
        return  # the Triton tests skip themselves

    @triton.jit
    def count(out_ptr, n):
        acc = 0
        for _ in range(0, n, 1):
            acc += 1
        tl.store(out_ptr, acc)

    out = torch.zeros(1, dtype=torch.int32)
    try:
        count[(1,)](out, 3)
        ok = int(out) == 3
    except Exception as exc:  # noqa: BLE001 -- what failed is named in the message
        ok, why = False, f"{type(exc).__name__}: {exc}"
    else:
        why = f"a loop over range(0, 3) ran {int(out)} times"
    if not ok:
        import numpy

        raise pytest.UsageError(
            f"Triton {triton.__version__}'s interpreter (TRITON_INTERPRET=1) cannot run fdp's kernels with NumPy "
            f"{numpy.__version__} ({why}). Triton 3.6's interpreter needs numpy<2.4: pip install 'numpy<2.4', or a "
            "newer Triton.")


# The suite's tensors are tiny: torch's intra-op threads only spin-wait for
# each other there (badly so on a loaded 2-core CI machine). FDP_TEST_THREADS and
# FDP_TEST_MKLDNN=0 (oneDNN off) select other CPU kernel paths: scripts/cpu_paths.sh.
torch.set_num_threads(int(os.environ.get("FDP_TEST_THREADS", "1")))
if os.environ.get("FDP_TEST_MKLDNN", "1") == "0":
    torch.backends.mkldnn.enabled = False


@pytest.fixture
def mlp_policy():
    return make_mlp_policy()

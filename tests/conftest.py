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


# The suite's tensors are tiny: torch's intra-op threads only spin-wait for
# each other there (badly so on a loaded 2-core CI machine). FDP_TEST_THREADS and
# FDP_TEST_MKLDNN=0 (oneDNN off) select other CPU kernel paths: scripts/cpu_paths.sh.
torch.set_num_threads(int(os.environ.get("FDP_TEST_THREADS", "1")))
if os.environ.get("FDP_TEST_MKLDNN", "1") == "0":
    torch.backends.mkldnn.enabled = False


@pytest.fixture
def mlp_policy():
    return make_mlp_policy()

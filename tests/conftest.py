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
        _INTERPRETER_PROBLEM.append(_interpreter_problem())
        if _INTERPRETER_PROBLEM[0]:
            config.issue_config_time_warning(pytest.PytestConfigWarning(_INTERPRETER_PROBLEM[0]), stacklevel=2)


_INTERPRETER_PROBLEM: list = []


def pytest_terminal_summary(terminalreporter):
    # Said again at the end, where the failures it explains are listed.
    if _INTERPRETER_PROBLEM and _INTERPRETER_PROBLEM[0]:
        terminalreporter.write_sep("=", "Triton's interpreter", yellow=True)
        terminalreporter.write_line(_INTERPRETER_PROBLEM[0])


def _interpreter_problem() -> str | None:
    """Why this Triton's interpreter cannot run fdp's kernels, or None; said as a warning, not an error, so that
    runs needing no interpreted kernel (``-m gpu``: native kernels in fresh processes) go on. Triton 3.6's
    interpreter turns an int argument used as a loop bound into a Python int with ``int()`` of a 1-element
    array, which NumPy 2.4 made an error (newer Triton squeezes it first); without the reason every interpreted
    kernel test fails deep inside Triton."""
    try:
        import triton
        import triton.language as tl
    except ImportError:
        return None  # no Triton: the Triton tests skip themselves
    except Exception as exc:  # noqa: BLE001 -- named in the message
        return f"Triton failed to import ({type(exc).__name__}: {exc})."
    out = torch.zeros(1, dtype=torch.int32)
    try:
        @triton.jit
        def count(out_ptr, n):
            acc = 0
            for _ in range(0, n, 1):
                acc += 1
            tl.store(out_ptr, acc)

        count[(1,)](out, 3)
    except Exception as exc:  # noqa: BLE001 -- named in the message
        import numpy

        text = f"{type(exc).__name__}: {exc}"
        if "only 0-dimensional arrays can be converted to Python scalars" in text:
            return (f"Triton {triton.__version__}'s interpreter cannot run fdp's kernels with NumPy "
                    f"{numpy.__version__} ({text}): every interpreted kernel test will fail. Triton 3.6's "
                    "interpreter needs numpy<2.4 (or use a newer Triton); native GPU tests are unaffected.")
        return f"Triton {triton.__version__}'s interpreter failed a one-loop probe kernel ({text})."
    if int(out) != 3:
        return f"Triton {triton.__version__}'s interpreter ran a loop over range(0, 3) {int(out)} times."
    return None


# The suite's tensors are tiny: torch's intra-op threads only spin-wait for
# each other there (badly so on a loaded 2-core CI machine). FDP_TEST_THREADS and
# FDP_TEST_MKLDNN=0 (oneDNN off) select other CPU kernel paths: scripts/cpu_paths.sh.
torch.set_num_threads(int(os.environ.get("FDP_TEST_THREADS", "1")))
if os.environ.get("FDP_TEST_MKLDNN", "1") == "0":
    torch.backends.mkldnn.enabled = False


@pytest.fixture
def mlp_policy():
    return make_mlp_policy()

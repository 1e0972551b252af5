"""The CUDA extension: built wherever nvcc is, reported clearly where it is not."""

import shutil
import subprocess
from pathlib import Path

import pytest

import fdp


def test_status_is_reported():
    st = fdp.extension_status()
    assert isinstance(st["available"], bool)
    if not st["available"]:
        assert "fdp._C" in st["reason"]


def test_extension_builds_where_nvcc_exists():
    # CI has nvcc: a compile error in csrc/ must fail the suite, not silently
    # fall back to the pure-Python package.
    if shutil.which("nvcc") is None:
        pytest.skip("no nvcc on PATH: the extension is not expected to build")
    st = fdp.extension_status()
    assert st["available"], st["reason"]
    assert st["runtime_version"] >= 11000
    assert st["device_count"] >= 0


ARCHS_SCRIPT = Path(__file__).resolve().parents[1] / "cmake" / "cuda_archs.cmake"


def _resolve_archs(tmp_path, archs, nvidia_smi_output=None):
    """Run cmake/cuda_archs.cmake as the build does; return what it printed."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(parents=True)
    if nvidia_smi_output is not None:  # a stand-in nvidia-smi that lists these GPUs
        smi = bin_dir / "nvidia-smi"
        smi.write_text(f"#!/bin/sh\nprintf '{nvidia_smi_output}'\n")
        smi.chmod(0o755)
    env = {"PATH": str(bin_dir)}  # no real nvidia-smi either way
    r = subprocess.run([shutil.which("cmake"), f"-DFDP_CUDA_ARCHS={archs}", "-DFDP_PORTABLE_CUDA_ARCHS=80;86;90",
                        "-P", str(ARCHS_SCRIPT)], capture_output=True, text=True, env=env, timeout=60)
    assert r.returncode == 0, r.stderr
    return r.stdout + r.stderr


@pytest.mark.skipif(shutil.which("cmake") is None, reason="needs cmake")
def test_auto_archs_are_the_gpus_present_else_none_and_portable_on_request(tmp_path):
    assert "the GPUs present are 86;90" in _resolve_archs(tmp_path / "a", "auto", "8.6\\n9.0\\n8.6\\n")
    none = "no GPU visible (nvidia-smi), so no CUDA extension is built; set FDP_CUDA_ARCHS to build it"
    assert none in _resolve_archs(tmp_path / "b", "auto")
    assert none in _resolve_archs(tmp_path / "c", "auto", "")  # nvidia-smi without a GPU
    assert "FDP_CUDA_ARCHS=portable: building 80;86;90" in _resolve_archs(tmp_path / "e", "portable")
    assert "fdp:" not in _resolve_archs(tmp_path / "d", "87")  # an explicit list is used as given

"""The CUDA extension: built wherever nvcc is, reported clearly where it is not."""

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

import fdp
from fdp._extension import arch_unsupported_reason, built_archs, describe_archs


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
    # The binary records what the build was asked for (scripts/test.sh: FDP_CUDA_ARCHS, 90 where no GPU is
    # visible): SASS for each listed architecture, PTX for the lowest of the newest major version (what the
    # gencode embeds). "auto" depends on the GPUs present; "90a" and the like go to CMake unchanged, unrecorded.
    sass, ptx = built_archs(st)
    asked = os.environ.get("FDP_CUDA_ARCHS", "auto")
    asked = "80;86;87;89;90" if asked == "portable" else asked
    if re.fullmatch(r"\d+([;,]\d+)*", asked):
        want = sorted({int(a) for a in re.split("[;,]", asked)})
        newest = max(a // 10 for a in want)
        assert (sass, ptx) == (want, [min(a for a in want if a // 10 == newest)]), (st["sass_archs"], st["ptx_archs"])
    elif asked == "auto":
        assert sass and ptx, (st["sass_archs"], st["ptx_archs"])


_PORTABLE = {"available": True, "sass_archs": "80,86,87,89,90", "ptx_archs": "90"}


@pytest.mark.parametrize("status,capability,runs", [
    (_PORTABLE, (8, 6), True), (_PORTABLE, (8, 7), True), (_PORTABLE, (9, 0), True),
    (_PORTABLE, (12, 0), True),  # a newer GPU: the driver compiles the compute_90 PTX
    (_PORTABLE, (7, 5), False),
    ({"sass_archs": "86", "ptx_archs": "86"}, (8, 9), True),  # machine code runs on higher minor versions
    ({"sass_archs": "86", "ptx_archs": "86"}, (8, 0), False),  # not on lower ones, nor PTX of a newer one
    ({"sass_archs": "90", "ptx_archs": "90"}, (8, 6), False),  # an H100 build on an RTX 3090
    ({"sass_archs": "90", "ptx_archs": "90"}, (8, 7), False),  # ... or on a Jetson Orin
    ({"sass_archs": "80,90", "ptx_archs": "90"}, (8, 9), True),
    ({"sass_archs": "", "ptx_archs": ""}, (8, 6), True),  # not recorded (e.g. built from "90a"): not judged
    ({"available": True}, (8, 6), True),  # an extension built before the architectures were recorded
])
def test_a_gpu_the_extension_was_not_built_for_is_named_with_the_fix(status, capability, runs):
    why = arch_unsupported_reason(capability, status)
    if runs:
        assert why is None, why
    else:
        cc = 10 * capability[0] + capability[1]
        assert why.startswith(f"fdp._C was built for {describe_archs(status)}, which a GPU of compute capability "
                              f"{capability[0]}.{capability[1]} cannot run: reinstall fdp with FDP_CUDA_ARCHS={cc}"), why


def test_the_cuda_backends_are_unavailable_on_a_gpu_the_extension_was_not_built_for(monkeypatch):
    """Before any launch, with the reason (not CUDA's "no kernel image is available" at the first call)."""
    import torch

    from fdp.backends import cuda_backend

    monkeypatch.setattr(cuda_backend, "extension_status", lambda: {**_PORTABLE, "sass_archs": "90"})
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 6))
    for name in ("cuda", "cuda-persistent"):
        why = fdp.backends.get_backend(name).unavailable_reason("cuda")
        assert why is not None and "FDP_CUDA_ARCHS=86" in why, (name, why)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    assert fdp.backends.get_backend("cuda").unavailable_reason("cuda") is None


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

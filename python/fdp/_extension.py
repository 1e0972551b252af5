"""Lazy access to the optional CUDA extension ``fdp._C``.

``import fdp`` must work on machines without CUDA, so the extension is only
imported on first use, and when it is missing the reason is kept (the build
log installed beside the package, or the import error) so that errors can say
what happened and how to fix it.
"""

from __future__ import annotations

import functools
import importlib
from pathlib import Path

_BUILD_ERROR_FILE = Path(__file__).with_name("_C_build_error.txt")
_HOW_TO_FIX = (
    "Reinstall fdp from a checkout on a machine with the CUDA toolkit (nvcc) on PATH, "
    "e.g. `bash scripts/test.sh` or `pip install --no-deps .` (FDP_BUILD_EXTENSION unset or ON); "
    "FDP_CUDA_ARCHS (e.g. '90') picks the GPU architectures."
)


@functools.lru_cache(maxsize=None)
def _load():
    try:
        return importlib.import_module("fdp._C"), None
    except ImportError as exc:
        if _BUILD_ERROR_FILE.exists():
            log = _BUILD_ERROR_FILE.read_text(errors="replace").strip()
            # The first line is the reason; the rest can be a long compiler log.
            head = log.splitlines()[0] if log else "unknown reason"
            return None, f"fdp._C was not built: {head} (details: {_BUILD_ERROR_FILE})"
        return None, f"fdp._C could not be imported: {exc}"


def extension():
    """Return the ``fdp._C`` module, or raise ImportError saying why it is missing."""
    mod, reason = _load()
    if mod is None:
        raise ImportError(f"{reason}. {_HOW_TO_FIX}")
    return mod


def extension_status() -> dict:
    """Whether ``fdp._C`` was built and imports: ``{"available": bool, "reason": str, ...}``.

    ``available`` says the extension is installed and imports; it says nothing
    about a GPU. When available, the extension's own view of the machine is
    included: ``runtime_version``, ``driver_version`` (0 without an NVIDIA
    driver), ``device_count`` and ``error`` (the CUDA runtime's message when
    it finds no usable device, else empty). ``fdp info`` prints all of it.
    """
    mod, reason = _load()
    if mod is None:
        return {"available": False, "reason": reason}
    info = dict(mod.runtime_info())
    return {"available": True, "reason": "", **info}


def built_archs(status: dict | None = None) -> tuple[list[int], list[int]]:
    """``(sass, ptx)``: the architectures ``fdp._C`` holds machine code for (``[80, 86, 90]``) and PTX for
    (``[90]``); both empty when not known (an extension built before they were recorded, or built from a
    list such as ``90a``)."""
    status = extension_status() if status is None else status
    return tuple([int(a) for a in status.get(key, "").split(",") if a.strip().isdigit()]
                 for key in ("sass_archs", "ptx_archs"))


def describe_archs(status: dict | None = None) -> str:
    """``"sm_80, sm_90 + PTX compute_90"``, or ``""`` when not known."""
    sass, ptx = built_archs(status)
    return ", ".join(f"sm_{a}" for a in sass) + "".join(f" + PTX compute_{a}" for a in ptx)


def arch_unsupported_reason(capability: tuple[int, int], status: dict | None = None) -> str | None:
    """Why ``fdp._C`` cannot run on a GPU of compute capability ``capability`` (``(8, 6)``), or None.

    A GPU runs machine code of its own major version and a minor version at most its own, or PTX of an
    architecture at most its own, which the driver compiles on first use. Without this check the first
    launch fails with CUDA's "no kernel image is available for execution on the device". None also when
    the build's architectures are not known."""
    sass, ptx = built_archs(status)
    if not (sass or ptx):
        return None
    major, minor = capability
    cc = 10 * major + minor
    if any(a // 10 == major and a % 10 <= minor for a in sass) or any(a <= cc for a in ptx):
        return None
    return (f"fdp._C was built for {describe_archs(status)}, which a GPU of compute capability {major}.{minor} "
            f"cannot run: reinstall fdp with FDP_CUDA_ARCHS={cc} ('portable' builds 80,86,87,89,90)")

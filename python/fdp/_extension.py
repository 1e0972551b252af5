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

"""NVTX ranges for Nsight Systems traces, free when nobody is looking.

``with nvtx_range("fdp.step", i):`` pushes the range ``fdp.step[i]`` on the
CUDA NVTX stack and pops it on exit, so an ``nsys`` trace of a sampling call
reads as ``fdp.sample > fdp.router, fdp.step[0], fdp.step[1], ...``. Ranges
are off unless enabled, with the environment variable ``FDP_NVTX=1`` or
:func:`enable_nvtx` (``True``), and they are always off without CUDA. Off,
``nvtx_range`` returns a shared do-nothing context manager: one global read
and one call, no string formatting, no allocation. While ``torch.compile``
traces, it returns ``contextlib.nullcontext()``, which dynamo can enter (it
cannot enter a custom context manager without a graph break), and emits
nothing: a range pushed while tracing would mark the trace, not the run.

Names used by the library (fused backends use the same ones):

- ``fdp.pack``     packing a policy for a backend (``Sampler.__init__``);
- ``fdp.sample``   one whole sampling call (``Sampler.__call__``);
- ``fdp.router``   the router and the other per-call terms;
- ``fdp.step[i]``  denoising step ``i`` (a persistent kernel, which runs all
  steps in one launch, marks ``fdp.steps`` instead).
"""

from __future__ import annotations

import contextlib
import os

import torch

__all__ = ["nvtx_range", "enable_nvtx", "nvtx_enabled"]

_requested = os.environ.get("FDP_NVTX", "").strip().lower() not in ("", "0", "false", "no", "off")
_active: bool | None = None  # _requested and CUDA available; resolved on first use


class _NullRange:
    """The context manager returned while ranges are off."""

    __slots__ = ()

    def __enter__(self):
        return None

    def __exit__(self, exc_type, exc, tb):
        return False


_NULL = _NullRange()


class _Range:
    __slots__ = ("name",)

    def __init__(self, name: str):
        self.name = name

    def __enter__(self):
        torch.cuda.nvtx.range_push(self.name)
        return None

    def __exit__(self, exc_type, exc, tb):
        torch.cuda.nvtx.range_pop()
        return False


def _resolve() -> bool:
    global _active
    _active = bool(_requested) and torch.cuda.is_available()
    return _active


def enable_nvtx(enabled: bool = True) -> bool:
    """Turn NVTX ranges on or off (overrides ``FDP_NVTX``); returns whether they are now active.

    They stay inactive without CUDA whatever is asked.
    """
    global _requested
    _requested = bool(enabled)
    return _resolve()


def nvtx_enabled() -> bool:
    """Whether :func:`nvtx_range` currently emits ranges."""
    return _active if _active is not None else _resolve()


def nvtx_range(name: str, index: int | None = None):
    """Context manager for the NVTX range ``name`` (``name[index]`` with an index); a no-op when off."""
    if torch.compiler.is_compiling():
        return contextlib.nullcontext()
    active = _active
    if active is None:
        active = _resolve()
    if not active:
        return _NULL
    return _Range(name if index is None else f"{name}[{index}]")

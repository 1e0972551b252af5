"""The backend registry: the one place that knows which samplers exist.

A backend computes the whole sampling loop for a policy: router once, then T
steps of composition and scheduler update, given the same inputs as every
other backend (the coefficient table, ``x_T`` and per-step noise) and
returning the same ``x_0`` within its dtype's tolerance. Backends register
here with a priority. ``backend="auto"`` considers every one that is available
on the device and can serve the policy, checks each against ``torch`` before
trusting it, and takes the fastest on CUDA and on the CPU (timed), the
highest-priority one elsewhere (:mod:`fdp.backends.selection`).
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Callable

import torch

from .._validation import check_device
from .base import Backend, Prepared

__all__ = ["Backend", "Prepared", "BackendInfo", "register_backend", "get_backend", "backend_names",
           "available_backends", "resolve_backend", "Selection", "VerificationError"]

# name -> module that defines it; imported lazily so that a backend needing
# Triton or the CUDA extension costs nothing until it is asked for.
_MODULES: dict[str, str] = {
    "torch": "fdp.backends.torch_backend",
    "graph": "fdp.backends.graph_backend",
    "triton": "fdp.backends.triton_backend",
    "triton-persistent": "fdp.backends.triton_persistent_backend",
    "cuda": "fdp.backends.cuda_backend",
    "cuda-persistent": "fdp.backends.cuda_persistent_backend",
    "onnxruntime": "fdp.backends.onnxruntime_backend",
    "torch-batched": "fdp.backends.batched_backend",
}
_LOADED: dict[str, Backend] = {}


def register_backend(name: str, module: str) -> None:
    """Make ``name`` resolvable; ``module`` must define ``BACKEND`` (a :class:`Backend`)."""
    _MODULES[name] = module
    _LOADED.pop(name, None)


def backend_names() -> list[str]:
    return list(_MODULES)


def get_backend(name: str) -> Backend:
    if name not in _MODULES:
        raise ValueError(f"`backend` must be 'auto' or one of {backend_names()}, got {name!r}")
    if name not in _LOADED:
        _LOADED[name] = importlib.import_module(_MODULES[name]).BACKEND
    return _LOADED[name]


@dataclass(frozen=True)
class BackendInfo:
    name: str
    available: bool
    reason: str  # why not, when not available


def available_backends(device=None) -> dict[str, BackendInfo]:
    """What can run on ``device`` (default: CUDA if present, else CPU), and why not the rest."""
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    device = check_device("device", device)
    out = {}
    for name in _MODULES:
        try:
            reason = get_backend(name).unavailable_reason(device)
        except ImportError as exc:
            reason = str(exc)
        out[name] = BackendInfo(name, reason is None, reason or "")
    return out


def resolve_backend(name: str, policy, table, device, dtype, *, batch_size: int = 1, verify: bool = False) -> Backend:
    """The backend to use: ``name`` checked, or the one ``"auto"`` selects.

    A backend asked for by name that cannot serve raises ValueError with its
    reason (with ``verify=True``, VerificationError when it disagrees with
    ``torch``). The full record goes to ``resolve_backend.last_selection``;
    ``resolve_backend.last_reasons`` maps every backend not picked to why.
    """
    be, _, sel = select(name, policy, table, device, dtype, batch_size=batch_size, verify=verify)
    resolve_backend.last_selection = sel
    resolve_backend.last_reasons = sel.skipped()
    return be


resolve_backend.last_selection = None
resolve_backend.last_reasons = {}

from .selection import Selection, VerificationError, select, weight_dtype  # noqa: E402 - needs the registry above

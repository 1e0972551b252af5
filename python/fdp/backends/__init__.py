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
import logging
import os
from dataclasses import dataclass
from typing import Callable

import torch

from .._validation import InvalidArgument, check_device
from .base import Backend, Prepared

__all__ = ["Backend", "Prepared", "BackendInfo", "register_backend", "get_backend", "backend_names",
           "available_backends", "disabled_backends", "DISABLE_ENV", "resolve_backend", "Selection",
           "VerificationError"]

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

#: The kill switch: a comma-separated list of backend names or families (a family is a name's part before
#: "-": "cuda" is cuda and cuda-persistent; "torch" is only the reference, which cannot be disabled) that no
#: code path may use, for a backend found broken on a
#: machine. Read at every selection, so it covers Sampler, the integrations and the CLI alike.
DISABLE_ENV = "FDP_DISABLE"
#: Never disabled: every other backend is checked against it.
_REFERENCE = "torch"
_warned: set[tuple[str, str]] = set()  # (entry, value) pairs already warned about
log = logging.getLogger("fdp")


def disabled_backends() -> dict[str, str]:
    """``{name: why}`` for the registered backends ``$FDP_DISABLE`` removes (a warning names an unknown entry)."""
    value = os.environ.get(DISABLE_ENV, "")
    out = {}
    for item in dict.fromkeys(x.strip() for x in value.split(",") if x.strip()):
        names = [n for n in _MODULES if item in (n, n.split("-")[0])]
        if item == _REFERENCE:
            # The reference's name is not a family: "torch" never takes "torch-batched" along (name it in full).
            names = []
            if (item, value) not in _warned:
                _warned.add((item, value))
                log.warning("fdp: %s=%s names %r, the reference every backend is checked against, which cannot "
                            "be disabled", DISABLE_ENV, value, item)
        elif not names and (item, value) not in _warned:
            _warned.add((item, value))
            log.warning("fdp: %s=%s names %r, which is neither a backend nor a family of backends (%s); it is "
                        "ignored", DISABLE_ENV, value, item, ", ".join(_MODULES))
        for n in names:
            out[n] = f"disabled by {DISABLE_ENV}={value}"
    return out


def register_backend(name: str, module: str) -> None:
    """Make ``name`` resolvable; ``module`` must define ``BACKEND`` (a :class:`Backend`)."""
    _MODULES[name] = module
    _LOADED.pop(name, None)


def backend_names() -> list[str]:
    return list(_MODULES)


def get_backend(name: str) -> Backend:
    if not isinstance(name, str) or name not in _MODULES:
        raise InvalidArgument(f"`backend` must be 'auto' or one of {backend_names()}, got {name!r}")
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
    disabled = disabled_backends()
    for name in _MODULES:
        try:
            reason = disabled.get(name) or get_backend(name).unavailable_reason(device)
        except ImportError as exc:
            reason = str(exc)
        out[name] = BackendInfo(name, reason is None, reason or "")
    return out


def resolve_backend(name: str, policy, table, device, dtype, *, batch_size: int = 1, verify: bool = False,
                    isolate: bool | None = None) -> Backend:
    """The backend to use: ``name`` checked, or the one ``"auto"`` selects.

    A backend asked for by name that cannot serve raises ValueError with its
    reason (with ``verify=True``, VerificationError when it disagrees with
    ``torch``). The full record goes to ``resolve_backend.last_selection``;
    ``resolve_backend.last_reasons`` maps every backend not picked to why.
    """
    be, _, sel = select(name, policy, table, device, dtype, batch_size=batch_size, verify=verify, isolate=isolate)
    resolve_backend.last_selection = sel
    resolve_backend.last_reasons = sel.skipped()
    return be


resolve_backend.last_selection = None
resolve_backend.last_reasons = {}

from .selection import Selection, VerificationError, select, weight_dtype  # noqa: E402 - needs the registry above

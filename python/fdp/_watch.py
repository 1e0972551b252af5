"""Noticing that a policy changed since a backend packed it, from host metadata only.

Fused backends copy the weights when they pack a policy, so a
:class:`fdp.Sampler` must pack again after an optimizer step, an in-place
edit, ``load_state_dict``, ``.to(dtype or device)`` or ``add_component``.
:meth:`PolicyWatch.changed` tells it, per call, without reading the device:

- the version counter of every parameter and buffer the modules hold now,
  which each in-place write through the tensor bumps (optimizer steps,
  ``copy_``, ``load_state_dict``);
- their data pointers, which change when ``.to()``, ``t.data = ...`` or a
  replaced tensor bring other storage (none of which bumps a version);
- a process-wide count of module, parameter and buffer registrations (new
  components, replaced layers): after one, the tensors are collected again;
- a process-wide count of steps of fused optimizers (``fused=True``), which
  write parameters without bumping their versions: after one, every watch
  reports a change (the watch cannot tell whose parameters were stepped);
- the router's strategy.

What it cannot see: in-place writes through ``.data`` (that tensor has a
version counter of its own) and writes to tensors created in inference mode
(which have none). Call :meth:`fdp.Sampler.repack` after those.

Importing this module registers the global hooks that keep the counts
(:func:`torch.nn.modules.module.register_module_parameter_registration_hook`
and friends, :func:`torch.optim.optimizer.register_optimizer_step_post_hook`);
each adds one integer increment to what it observes.
"""

from __future__ import annotations

import operator

import torch
from torch import nn
from torch.nn.modules import module as _module
from torch.optim import optimizer as _optimizer


class _Counts:
    registrations = 0
    fused_steps = 0


def _on_registration(module, name, value):
    _Counts.registrations += 1


def _on_optimizer_step(optimizer, args, kwargs):
    if any(group.get("fused") for group in optimizer.param_groups):
        _Counts.fused_steps += 1


_module.register_module_module_registration_hook(_on_registration)
_module.register_module_parameter_registration_hook(_on_registration)
_module.register_module_buffer_registration_hook(_on_registration)
_optimizer.register_optimizer_step_post_hook(_on_optimizer_step)


_version = operator.attrgetter("_version")


def _version_or_none(t):
    # Tensors made in inference mode have no version counter (their pointers are still watched).
    try:
        return t._version
    except RuntimeError:
        return None


class PolicyWatch:
    """A snapshot of a module's tensors; :meth:`changed` compares the module with it.

    ``weights=False`` is for a backend that reads the live parameters at every
    call (``torch``): then only what changes the call itself counts (the
    registration count, and the storage, dtype and device of the first
    parameter, which ``.to()`` replaces), and optimizer steps are no change.
    That costs the same for any model size; the full watch reads every tensor.
    """

    def __init__(self, module: nn.Module, weights: bool = True):
        self.module = module
        self.weights = weights
        self.reset()

    def reset(self) -> None:
        """Take a new snapshot (after the module was packed again)."""
        self._registrations = _Counts.registrations
        self._fused_steps = _Counts.fused_steps
        if self.weights:
            slots = [(d, name) for m in self.module.modules() for d in (m._parameters, m._buffers)
                     for name, t in d.items() if t is not None]
        else:  # the first parameter: the one the Sampler takes its dtype and device from
            slots = [(m._parameters, name) for m in self.module.modules()
                     for name, t in m._parameters.items() if t is not None][:1]
        self._dicts, self._names = [d for d, _ in slots], [name for _, name in slots]
        self._unversioned = None in map(_version_or_none, (d[name] for d, name in slots))
        self._state = self._read()

    def _read(self) -> tuple | None:
        # Read through the modules' dicts: a replaced tensor shows by its own storage and version.
        try:
            tensors = list(map(dict.__getitem__, self._dicts, self._names))
            if not self.weights:
                return [(t.data_ptr(), t.dtype, t.device) for t in tensors]
            versions = list(map(_version_or_none if self._unversioned else _version, tensors))
        except (KeyError, AttributeError, RuntimeError):  # a tensor deleted, set to None, or now unversioned
            return None
        router = getattr(self.module, "router", None)
        return (versions, list(map(torch.Tensor.data_ptr, tensors)), getattr(router, "strategy", None),
                getattr(router, "topk", None))

    def changed(self) -> bool:
        """True if the module may differ from the snapshot; the snapshot stays until :meth:`reset`."""
        if self.weights and self._fused_steps != _Counts.fused_steps:
            return True
        if self._registrations != _Counts.registrations:
            # Something registered a module or tensor somewhere: collect the tensors again.
            now = PolicyWatch(self.module, self.weights)
            same_slots = list(map(id, now._dicts)) == list(map(id, self._dicts)) and now._names == self._names
            if not same_slots or now._state != self._state:
                return True
            self._registrations = now._registrations
            return False
        state = self._read()
        return state is None or state != self._state

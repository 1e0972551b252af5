"""The backend contract: what a backend must provide and guarantee (docs/design.md, "The backend contract")."""

from __future__ import annotations

from typing import Protocol

import torch


class Prepared(Protocol):
    """A policy packed for one backend, scheduler table and dtype.

    ``run(global_cond [B, Dc], x_T [B, Ta, Da], step_noise [T, B, Ta, Da] or None)``
    returns ``x_0 [B, Ta, Da]``. Inputs arrive validated, on the right device,
    with ``B >= 1``. A call must read nothing back to the host (no ``.item()``,
    ``bool(tensor)``): the CUDA backends capture it into a graph
    (:mod:`fdp.backends.captured`) and give their prepared objects
    ``invalidate()``, which drops those graphs. A prepared object whose class
    sets ``noise_per_step = True`` reads ``step_noise[i]`` only while step ``i``
    runs, in step order, and may be given an indexable source that draws it
    then (None for a step that adds none) instead of a tensor.

    A backend whose class sets ``supports_inpainting = True`` also takes
    ``known`` and ``known_mask`` (both None, or both given): ``known_mask``
    is a bool ``[B, Ta, Da]``, ``known`` ``[B, Ta, Da]`` (the same after every
    step) or ``[T, B, Ta, Da]`` (``known[i]`` after step ``i``), in ``x_T``'s
    dtype; after every step's update the masked entries of x are replaced,
    ``x = where(known_mask, known[i], x)`` (:mod:`fdp.inpainting`). The
    sampler applies the replacement before the first step to ``x_T`` itself.
    """

    def run(self, global_cond: torch.Tensor, x_T: torch.Tensor, step_noise: torch.Tensor | None,
            known: torch.Tensor | None = None, known_mask: torch.Tensor | None = None) -> torch.Tensor: ...


class Backend:
    """Base class: subclasses set ``name`` and ``priority`` and implement the three methods."""

    name: str = ""
    #: True for a backend that reads the policy's parameters at every call instead of a packed copy: a
    #: Sampler then repacks only for changes of structure, dtype or device, not after every weight update.
    reads_live_weights: bool = False
    priority: int = 0  # auto tries the highest first (on CUDA it times them all)
    priority_note: str | None = None  # why the priority is what it is, when that depends on the environment
    #: True for a backend whose calls run compiled code on the device (kernels, captured graphs): ``auto`` and
    #: ``verify=True`` run it first in a separate process (:mod:`fdp.isolation`), where a hang or a device
    #: fault cannot take the caller's process down. The torch reference and interpreted code do not need it.
    runs_native_code: bool = False
    #: True for a backend whose prepared ``run`` takes ``known`` / ``known_mask`` (inpainting, see
    #: :class:`Prepared`); a Sampler runs inpainting calls for any other on the torch reference (with a warning).
    supports_inpainting: bool = False

    def default_weight_dtype(self, policy_dtype: torch.dtype) -> torch.dtype:
        """The weight dtype when this backend is named and the caller gives none: the policy's.

        ``backend="auto"`` never uses it: picking a backend must not change the numerics.
        """
        return policy_dtype

    def native_code_on(self, device: torch.device) -> bool:
        """Whether a call on ``device`` runs compiled device code (``runs_native_code``, refined per device)."""
        return self.runs_native_code

    def unavailable_reason(self, device: torch.device) -> str | None:
        """None if the backend can run on ``device``, else why not (and how to fix it)."""
        raise NotImplementedError

    def unsupported_reason(self, policy, table, dtype: torch.dtype) -> str | None:
        """None if the backend can serve ``policy`` with this scheduler table and weight dtype."""
        raise NotImplementedError

    def prepare(self, policy, table, dtype: torch.dtype | None = None) -> Prepared:
        """Pack the policy once; the result is called per sampling call."""
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"<fdp backend {self.name!r}>"

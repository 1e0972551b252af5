"""The backend contract: what a backend must provide and guarantee (docs/design.md, "The backend contract")."""

from __future__ import annotations

from typing import Protocol

import torch


class Prepared(Protocol):
    """A policy packed for one backend, scheduler table and dtype.

    ``run(global_cond [B, Dc], x_T [B, Ta, Da], step_noise [T, B, Ta, Da] or None)``
    returns ``x_0 [B, Ta, Da]``. Inputs arrive validated, on the right device.
    """

    def run(self, global_cond: torch.Tensor, x_T: torch.Tensor, step_noise: torch.Tensor | None) -> torch.Tensor: ...


class Backend:
    """Base class: subclasses set ``name`` and ``priority`` and implement the three methods."""

    name: str = ""
    priority: int = 0  # auto picks the highest available

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

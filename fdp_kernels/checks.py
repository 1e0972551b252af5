"""Argument checks of the kernels' launchers, shared with the ``fdp`` backends (``fdp._validation`` re-exports them).

A wrong type or dtype raises ``TypeError``; a wrong shape, device or layout ``ValueError``.
"""

from __future__ import annotations

import torch

__all__ = ["check_kernel_arg", "check_flat_sample"]


def check_kernel_arg(name: str, t, shape, dtype, device) -> None:
    """A tensor handed to a fused kernel: exact ``shape``, ``dtype`` (or a tuple of
    them), on ``device`` (None: anywhere) and contiguous — kernels read raw memory."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"`{name}` must be a torch.Tensor, got {type(t).__name__}")
    if isinstance(dtype, tuple):
        if t.dtype not in dtype:
            raise TypeError(f"`{name}` must have one of the dtypes {list(dtype)}, got {t.dtype}")
    elif t.dtype != dtype:
        raise TypeError(f"`{name}` must have dtype {dtype}, got {t.dtype}")
    if tuple(t.shape) != tuple(shape):
        raise ValueError(f"`{name}` must have shape {list(shape)}, got {list(t.shape)}")
    if device is not None and t.device != device:
        raise ValueError(f"`{name}` must be on {device} (where `x` is), got {t.device}")
    if not t.is_contiguous():
        raise ValueError(f"`{name}` must be contiguous (call .contiguous())")


def check_flat_sample(x) -> None:
    """The sample handed to a fused kernel: a float32 ``[B, D]`` tensor (``[B, horizon, action_dim]`` flattened)."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"`x` must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype != torch.float32:
        raise TypeError(f"`x` must have dtype torch.float32, got {x.dtype}")
    if x.ndim != 2:
        raise ValueError(f"`x` must be [B, D] (the flattened [B, horizon, action_dim] sample), got {list(x.shape)}")

"""How far a fused backend may be from the torch reference: one table for the tests and for ``auto``.

The error measure is ``max |out - ref| / max |ref|`` over the sampled ``x_0``
(:func:`rel_error`). Accumulation is float32 in every fused kernel whatever the
weight dtype, so the bounds depend on the dtype the backend packs its weights in.
"""

from __future__ import annotations

import torch

#: Bound against a reference that computes with the same weight values as the
#: backend (weights rounded to the pack dtype, arithmetic in float32 or wider):
#: what remains is accumulation order and the rounding of activations.
REL_TOL = {torch.float64: 1e-10, torch.float32: 1e-4, torch.bfloat16: 2e-2, torch.float16: 2e-2}

#: Bound against a reference with the policy's own weights when the backend
#: rounds them to a narrower pack dtype (e.g. a float32 policy packed in bfloat16).
ROUNDED_WEIGHTS_TOL = {torch.bfloat16: 5e-2, torch.float16: 5e-2}

_HALF = (torch.bfloat16, torch.float16)


def tolerance(pack_dtype: torch.dtype, policy_dtype: torch.dtype) -> float:
    """The bound for a backend packing weights in ``pack_dtype`` against torch on a ``policy_dtype`` policy."""
    if pack_dtype not in REL_TOL:
        raise ValueError(f"`dtype` must be one of {list(REL_TOL)} to compare with the reference, got {pack_dtype}")
    if pack_dtype in _HALF and policy_dtype != pack_dtype:
        return ROUNDED_WEIGHTS_TOL[pack_dtype]
    return REL_TOL[pack_dtype]


def reference_dtype(policy_dtype: torch.dtype) -> torch.dtype:
    """The dtype the torch reference computes in: half-precision policies are evaluated in float32."""
    return torch.float32 if policy_dtype in _HALF else policy_dtype


def rel_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    """``max |out - ref| / max |ref|`` in float64; inf when ``out`` holds a NaN or inf."""
    out, ref = out.double(), ref.double()
    if not bool(torch.isfinite(out).all()):
        return float("inf")
    return float((out - ref).abs().max() / ref.abs().max().clamp_min(1e-30))

"""The scheduler update of one step, shared by every Triton kernel that ends a denoising step.

It reads row ``step`` of the ``[T, NUM_COLS]`` float32 table through the
column indices of :mod:`fdp_kernels.abi` (compile-time constants here), and
is :func:`fdp.schedulers.apply_step`:

    x0 = a_x x + a_m eps;  x0 = clamp(x0, +-clip_range) if CLIP
    x' = c_x0 x0 + c_x x + c_m eps + [adds_noise[step]] sigma z

and the inpainting epilogue that may follow it (:func:`_inpaint`, fdp.inpainting):

    x' = where(mask, known[step], x')
"""

from __future__ import annotations

import triton
import triton.language as tl

from . import abi

# Triton kernels read module globals only when they are constexpr.
_COL_A_X = tl.constexpr(abi.COL_A_X)
_COL_A_M = tl.constexpr(abi.COL_A_M)
_COL_C_X0 = tl.constexpr(abi.COL_C_X0)
_COL_C_X = tl.constexpr(abi.COL_C_X)
_COL_C_M = tl.constexpr(abi.COL_C_M)
_COL_SIGMA = tl.constexpr(abi.COL_SIGMA)
_NUM_COLS = tl.constexpr(abi.NUM_COLS)


@triton.jit
def _scheduler_update(x, eps, z, coef_ptr, adds_ptr, step, clip_range, CLIP: tl.constexpr, NOISE: tl.constexpr):
    """x' from x, the composed eps and the noise z (read only when NOISE; a step whose adds_noise is 0 ignores z,
    NaN included)."""
    row = coef_ptr + step * _NUM_COLS
    a_x = tl.load(row + _COL_A_X)
    a_m = tl.load(row + _COL_A_M)
    c_x0 = tl.load(row + _COL_C_X0)
    c_x = tl.load(row + _COL_C_X)
    c_m = tl.load(row + _COL_C_M)
    x0 = a_x * x + a_m * eps
    if CLIP:
        x0 = tl.minimum(tl.maximum(x0, -clip_range), clip_range)
    prev = c_x0 * x0 + c_x * x + c_m * eps
    if NOISE:
        sigma = tl.load(row + _COL_SIGMA)
        adds = tl.load(adds_ptr + step)
        prev += tl.where(adds != 0, sigma * z, 0.0)
    return prev


@triton.jit
def _inpaint(x, known_ptr, mask_ptr, known_stride, step, xp, xm, INPAINT: tl.constexpr):
    """x with the entries where ``mask`` (uint8 ``[B, D]``) is set replaced by ``known[step]``: the ``[B, D]``
    float32 rows at ``known_ptr + step * known_stride`` (stride 0: the same values after every step). ``xp`` /
    ``xm`` are the tile's element offsets into ``[B, D]`` and their mask; unmasked entries of known are never
    read (a NaN there cannot leak)."""
    if INPAINT:
        keep = tl.load(mask_ptr + xp, mask=xm, other=0) != 0
        r = tl.load(known_ptr + tl.cast(step, tl.int64) * known_stride + xp, mask=xm & keep, other=0.0)
        x = tl.where(keep, r, x)
    return x

"""Composition and scheduler step in one launch, for K noise predictions from any denoisers.

For step ``i`` of the schedule, every batch row ``b`` and every element ``n`` of the sample::

    m     = sum_k w[b, k] * eps[k, b, n]                  the composed prediction
    x0    = a_x x + a_m m;   x0 = clamp(x0, -clip_range, clip_range) when clipping
    x_out = c_x0 x0 + c_x x + c_m m + sigma z              z = noise only where adds_noise[i]

with ``(a_x, a_m, c_x0, c_x, c_m, sigma)`` read from row ``i`` of the device-side
coefficient table, columns as :mod:`fdp_kernels.abi` defines them (read by
:mod:`fdp_kernels.schedule`, which every kernel's step ends with). This is
:func:`fdp.schedulers.apply_step` applied to the router-weighted sum.

Layout:

    eps         [K, B, *S]   float32 / bfloat16 / float16, any strides when ``S`` has
                             one or two dims (e.g. the ``[K, B, T, Da]`` view that
                             ``fdp.unet_fused.FusedUnets`` returns)
    weights     [B, K]       float32 / bfloat16 / float16, any strides
    x, out      [B, *S]      float32, contiguous; ``out`` may be ``x`` (each element is
                             read before it is written, by the same program)
    noise       [B, *S] or [T, B, *S] (row ``i`` is read), contiguous, float32 /
                bfloat16 / float16, or None
    known       [B, *S] or [T, B, *S] (row ``i`` is read) float32, contiguous, with
    known_mask  [B, *S] bool, contiguous: inpainting, x_out = where(known_mask, known, x_out)
                (both or neither)
    coef        [T, 6]       float32, contiguous (``StepTable.to(device).coef``)
    adds_noise  [T]          bool or int8

The step index is a plain runtime int (not specialized), so T launches share
one compiled kernel and a CUDA graph can capture them. Accumulation is float32.

Design: the ``B * prod(S)`` output elements are split in 1-D blocks of
``BLOCK``; each program sums the K predictions for its block (K is a
compile-time constant, so the loop is unrolled), then applies the update.
The kernel is memory bound (it reads K + 2 or K + 3 values per output); one
pass, no reductions across programs. Tested in the interpreter of Triton 3.9
and 3.6.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .abi import NUM_COLS
from .schedule import _inpaint, _scheduler_update

__all__ = ["compose_step", "compose_step_kernel"]


@triton.jit(do_not_specialize=["step", "noise_offset"])
def compose_step_kernel(eps_ptr, w_ptr, x_ptr, noise_ptr, out_ptr, coef_ptr, adds_ptr, known_ptr, mask_ptr,
                        step, noise_offset, clip_range, known_stride, total, R, C,
                        s_ek, s_eb, s_er, s_ec, s_wb, s_wk,
                        K: tl.constexpr, CLIP: tl.constexpr, HAS_NOISE: tl.constexpr, INPAINT: tl.constexpr,
                        BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    # int64 offsets: B * prod(S) * K can pass 2**31 at large batches.
    offs = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    N = R * C
    mask = offs < total
    b = offs // N
    n = offs - b * N
    r = n // C
    c = n - r * C

    ep = eps_ptr + b * s_eb + r * s_er + c * s_ec
    wp = w_ptr + b * s_wb
    m = tl.zeros([BLOCK], dtype=tl.float32)
    # K is a compile-time constant (one compilation per component count): the unrolled loop keeps
    # all K loads in flight at once.
    for _ in tl.static_range(K):
        w = tl.load(wp, mask=mask, other=0.0).to(tl.float32)
        e = tl.load(ep, mask=mask, other=0.0).to(tl.float32)
        m += tl.where(w != 0.0, w * e, 0.0)  # a zero weight leaves a component out, NaN output or not
        ep += s_ek
        wp += s_wk

    x = tl.load(x_ptr + offs, mask=mask, other=0.0)
    if HAS_NOISE:
        z = tl.load(noise_ptr + noise_offset + offs, mask=mask, other=0.0).to(tl.float32)
    else:
        z = 0.0
    prev = _scheduler_update(x, m, z, coef_ptr, adds_ptr, step, clip_range, CLIP, HAS_NOISE)
    prev = _inpaint(prev, known_ptr, mask_ptr, known_stride, step, offs, mask, INPAINT)
    tl.store(out_ptr + offs, prev, mask=mask)


_IN_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _tensor(name, t):
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"`{name}` must be a torch.Tensor, got {type(t).__name__}")
    return t


def _dtype(name, t, allowed):
    if t.dtype not in allowed:
        raise TypeError(f"`{name}` must have dtype {' or '.join(str(d) for d in allowed)}, got {t.dtype}")


def _contiguous(name, t):
    if not t.is_contiguous():
        raise ValueError(f"`{name}` must be contiguous (call .contiguous()), got strides {tuple(t.stride())}")


def _shape(name, t, want, known=""):
    if tuple(t.shape) != tuple(want):
        raise ValueError(f"`{name}` must have shape {list(want)}{known}, got {list(t.shape)}")


def _validate_known(known, known_mask, x, T):
    if (known is None) != (known_mask is None):
        raise ValueError("inpainting needs both `known` and `known_mask`, or neither")
    if known is None:
        return
    B, S = x.shape[0], tuple(x.shape[1:])
    for name, t in (("known", known), ("known_mask", known_mask)):
        _tensor(name, t)
        _contiguous(name, t)
        if t.device != x.device:
            raise ValueError(f"`{name}` must be on `x`'s device {x.device}, got {t.device}")
    _dtype("known", known, (torch.float32,))
    _dtype("known_mask", known_mask, (torch.bool, torch.uint8))
    if tuple(known.shape) not in ((B, *S), (T, B, *S)):
        raise ValueError(f"`known` must have shape {[B, *S]} (every step's) or {[T, B, *S]} (one per step), "
                         f"got {list(known.shape)}")
    _shape("known_mask", known_mask, x.shape)


def _validate(eps, weights, coef, adds_noise, step, x, noise, clip_range, out):
    for name, t in (("eps", eps), ("weights", weights), ("coef", coef), ("adds_noise", adds_noise), ("x", x)):
        _tensor(name, t)
    _dtype("x", x, (torch.float32,))
    _dtype("eps", eps, _IN_DTYPES)
    _dtype("weights", weights, _IN_DTYPES)
    _dtype("coef", coef, (torch.float32,))
    _dtype("adds_noise", adds_noise, (torch.bool, torch.int8))
    if x.ndim not in (2, 3):
        raise ValueError(f"`x` must be [B, N] or [B, Ta, Da], got {list(x.shape)}")
    B, S = x.shape[0], tuple(x.shape[1:])
    if B == 0 or 0 in S:
        raise ValueError(f"`x` must not be empty, got {list(x.shape)}")
    _contiguous("x", x)
    if eps.ndim != x.ndim + 1 or tuple(eps.shape[1:]) != tuple(x.shape):
        raise ValueError(f"`eps` must have shape [K, {', '.join(map(str, x.shape))}] (K predictions of `x`'s "
                         f"shape), got {list(eps.shape)}")
    K = eps.shape[0]
    if K == 0:
        raise ValueError("`eps` must hold at least one prediction (K >= 1), got K = 0")
    _shape("weights", weights, (B, K), f" (B={B}, K={K})")
    if coef.ndim != 2 or coef.shape[1] != NUM_COLS or coef.shape[0] == 0:
        raise ValueError(f"`coef` must have shape [T, {NUM_COLS}] (StepTable.to(device).coef), got {list(coef.shape)}")
    _contiguous("coef", coef)
    T = coef.shape[0]
    _shape("adds_noise", adds_noise, (T,), f" (T={T})")
    _contiguous("adds_noise", adds_noise)
    if isinstance(step, bool) or not isinstance(step, int):
        raise TypeError(f"`step` must be an int, got {step!r} ({type(step).__name__})")
    if not 0 <= step < T:
        raise ValueError(f"`step` must be in [0, {T}) (the table has T={T} rows), got {step}")
    if clip_range is not None:
        if isinstance(clip_range, bool) or not isinstance(clip_range, (int, float)):
            raise TypeError(f"`clip_range` must be None or a number, got {clip_range!r}")
        if not clip_range > 0 or clip_range == float("inf"):
            raise ValueError(f"`clip_range` must be a finite number > 0 (or None: no clipping), got {clip_range}")
    if noise is not None:
        _tensor("noise", noise)
        _dtype("noise", noise, _IN_DTYPES)
        if tuple(noise.shape) not in ((B, *S), (T, B, *S)):
            raise ValueError(f"`noise` must have shape {[B, *S]} (this step's) or {[T, B, *S]} (all steps'), "
                             f"got {list(noise.shape)}")
        _contiguous("noise", noise)
    if out is not None:
        _tensor("out", out)
        _dtype("out", out, (torch.float32,))
        _shape("out", out, x.shape)
        _contiguous("out", out)
    for name, t in (("eps", eps), ("weights", weights), ("coef", coef), ("adds_noise", adds_noise),
                    ("noise", noise), ("out", out)):
        if t is not None and t.device != x.device:
            raise ValueError(f"`{name}` must be on `x`'s device {x.device}, got {t.device}")


def compose_step(eps, weights, coef, adds_noise, step, x, noise=None, *, clip_range=None, out=None,
                 known=None, known_mask=None, block=1024, num_warps=4, validate=True):
    """Compose K predictions with the router weights and apply step ``step`` of the schedule; returns ``out``.

    Args:
        eps: ``[K, B, *S]`` predictions of the K denoisers at this step (any strides).
        weights: ``[B, K]`` router weights.
        coef, adds_noise: the device-side schedule (``table.to(device)``: ``.coef`` and ``.adds_noise``).
        step: the table row to apply (0-based, sampling order).
        x: ``[B, *S]`` float32 current sample x_t (``S`` = ``(Ta, Da)`` or ``(N,)``).
        noise: the noise this step adds, ``[B, *S]``, or all steps' ``[T, B, *S]`` (row ``step``
            is read); ignored where ``adds_noise[step]`` is False. None: add none.
        clip_range: clamp x0 to ``[-clip_range, clip_range]`` (None: no clipping;
            ``table.clip_range if table.clip_sample else None``).
        out: float32 result buffer like ``x`` (default: new); may be ``x`` itself.
        known, known_mask: inpainting (both or neither): the result's entries where ``known_mask`` is set are
            ``known``'s (float32 like ``x``, or ``[T, B, *S]``: row ``step``), fdp.inpainting's epilogue.
        block, num_warps: launch tuning (``block`` a power of 2).
        validate: check the arguments (a loop may check its first step only).

    Raises:
        TypeError: an argument has the wrong type or dtype.
        ValueError: wrong shape, device, step or clip range, or a non-contiguous ``x``/``noise``/``out``.
    """
    if validate:
        _validate(eps, weights, coef, adds_noise, step, x, noise, clip_range, out)
        _validate_known(known, known_mask, x, coef.shape[0])
        if not isinstance(block, int) or block < 16 or block & (block - 1):
            raise ValueError(f"`block` must be a power of 2 >= 16, got {block!r}")
    from .ops import compose_launch

    if out is None:
        out = torch.empty_like(x)
    if adds_noise.dtype == torch.bool:
        adds_noise = adds_noise.view(torch.int8)
    compose_launch(eps, weights, x, noise, out, coef, adds_noise, step, float(clip_range or 0.0),
                   clip_range is not None, block, num_warps, known,
                   None if known_mask is None else known_mask.view(torch.uint8))
    return out

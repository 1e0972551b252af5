"""One fused denoising step of a factorized MLP policy: all K components, their weighted sum, the scheduler update.

For step ``i`` and every batch row ``x`` (the flattened ``[horizon, action_dim]`` sample, ``D`` floats):

    eps   = sum_k weights[k] * eps_k(x)           eps_k: the MLPDenoiser chain of docs/mlp_denoiser.md
    x0    = a_x x + a_m eps;   x0 = clamp(x0, -clip_range, clip_range) when clipping
    x_out = c_x0 x0 + c_x x + c_m eps + sigma z   (z only where adds_noise[i])

Inputs (the layout of ``python/fdp/packing.py``; all contiguous, on one device):

    packed  PackedMLP: w_in [K, D, H], w_a/w_b [K, L, H, H], w_out [K, H, D] in float32/bfloat16/float16,
            b_b [K, L, H] and b_out [K, D] float32
    steps   StepTerms: t_in [T, K, H], t_shift [T, K, L, H] float32
    call    CallTerms: weights [B, K], c_in [B, K, H], scale/shift [B, K, L, H] float32
    coef    [T, 6] float32, columns (a_x, a_m, c_x0, c_x, c_m, sigma) (fdp_kernels.abi.COEF_COLUMNS)
    adds_noise [T] bool/int8
    x       [B, D] float32;  out [B, D] float32 (may be ``x`` itself: each program reads its rows first)
    noise   [T, B, D] (the step-noise tensor; row ``i`` is read) or None; or ``seed`` for in-kernel noise

The step index is a runtime int and the coefficients are read from the device
table, so a sampling loop launches the same compiled kernel T times without
host synchronisation or per-step host tensors.

Design: one program per tile of ``BLOCK_B`` rows (16 by default; ``tl.dot``
needs 16; rows past B are masked). The program keeps ``x`` and the composed
``eps`` (``[BLOCK_B, D_PAD]``) in registers and evaluates the components one
after the other, skipping any that the router gives weight 0 on every row of
the tile (hard / top-k routing). The hidden state stays in registers for
padded widths up to 32; wider models stage it in a per-program scratch
buffer (see :mod:`fdp_kernels.mlp_common` for the reasoning and the tiling).
Everything accumulates in float32 whatever the weight dtype.

Split (``SPLIT``, at small batch: :func:`fdp_kernels.mlp_common.block_config`
decides): the grid is ``[tiles, K]`` and program ``(tile, k)`` evaluates
component k alone, so the K components' weights stream through K SMs at once
instead of one. It writes ``weights[:, k] * eps_k`` into a ``[K, B, D]``
float32 region of ``scratch`` (nothing when it skips the component), then
increments the tile's arrival counter (an acq_rel atomic after a CTA barrier:
the release covers the whole program's stores). The program that arrives
last resets the counter to 0 for the next launch, sums the K partials in k
order (skipping the same components) and applies the scheduler update, so the
result is bit-equal to the unsplit kernel's whatever order the programs ran
in. No program waits for another: one launch per step, nothing spins. The
last arrival is also the only writer of its rows of ``out``, after every
program of its tile has read ``x``, so ``out`` may still be ``x``.

Output columns are not split across programs: a program holding some columns
of layer l needs every column of layer l - 1, so the programs of a component
would wait for each other at every layer. Triton does not promise that the
programs of a grid run at the same time (the interpreter runs them one after
another), so such a wait can hang; the CUDA kernels split columns only inside
a thread-block cluster, whose blocks the hardware schedules together.
"""

from __future__ import annotations

import triton
import triton.language as tl

from .mlp_common import (_compose, _partials, _step_noise, _sum_partials, _tile, _used, _weighted, check_known,
                         check_launch, launch_setup)
from .schedule import _inpaint, _scheduler_update

__all__ = ["mlp_step", "mlp_step_kernel"]


@triton.jit
def _finish(x, eps, out_ptr, xp, xm, noise_ptr, coef_ptr, adds_ptr, known_ptr, mask_ptr, known_stride, step, seed,
            clip_range, rows64, rmask, dcols, dmask, B, D,
            BLOCK_B: tl.constexpr, D_PAD: tl.constexpr, CLIP: tl.constexpr, NOISE_MODE: tl.constexpr,
            INPAINT: tl.constexpr):
    """The scheduler update of the tile's rows from the composed eps (and the inpainting epilogue), stored to
    ``out``."""
    z = _step_noise(noise_ptr, seed, step, rows64, rmask, dcols, dmask, B, D, BLOCK_B, D_PAD, NOISE_MODE)
    x = _scheduler_update(x, eps, z, coef_ptr, adds_ptr, step, clip_range, CLIP, NOISE_MODE != 0)
    x = _inpaint(x, known_ptr, mask_ptr, known_stride, step, xp, xm, INPAINT)
    tl.store(out_ptr + xp, x, mask=xm)


@triton.jit(do_not_specialize=["step", "seed"])
def mlp_step_kernel(x_ptr, out_ptr,
                    w_in_ptr, w_a_ptr, w_b_ptr, b_b_ptr, w_out_ptr, b_out_ptr,
                    t_in_ptr, t_shift_ptr, wts_ptr, c_in_ptr, scale_ptr, shift_ptr,
                    coef_ptr, adds_ptr, noise_ptr, scratch_ptr, count_ptr, known_ptr, mask_ptr,
                    step, seed, clip_range, known_stride, B, D, H, L, K,
                    BLOCK_B: tl.constexpr, D_PAD: tl.constexpr, H_PAD: tl.constexpr, H_STRIDE: tl.constexpr,
                    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_HD: tl.constexpr,
                    H_IN_REGS: tl.constexpr, SPLIT: tl.constexpr, SKIP_UNUSED: tl.constexpr,
                    PRECISION: tl.constexpr, CLIP: tl.constexpr, NOISE_MODE: tl.constexpr,
                    INPAINT: tl.constexpr):
    x, xp, xm, rows64, rmask, dcols, dmask, h_buf, y_buf = _tile(x_ptr, scratch_ptr, B, D, BLOCK_B, D_PAD, H_STRIDE)
    if SPLIT:
        k = tl.program_id(1)
        part_ptr = _partials(scratch_ptr, H_IN_REGS, BLOCK_B, H_STRIDE)
        wk = tl.load(wts_ptr + rows64 * K + k, mask=rmask, other=0.0)
        if _used(wk, SKIP_UNUSED):
            part = _weighted(x, k, wk, step, rows64, rmask, dcols, dmask, D, H, L, K,
                             w_in_ptr, w_a_ptr, w_b_ptr, b_b_ptr, w_out_ptr, b_out_ptr,
                             t_in_ptr, t_shift_ptr, c_in_ptr, scale_ptr, shift_ptr, h_buf, y_buf,
                             BLOCK_B, D_PAD, H_PAD, H_STRIDE, BLOCK_N, BLOCK_K, BLOCK_HD, H_IN_REGS, PRECISION)
            tl.store(part_ptr + tl.cast(k, tl.int64) * B * D + xp, part, mask=xm)
        # Every thread's stores before the one thread's release (the atomic on a scalar runs once per program).
        tl.debug_barrier()
        tile = tl.program_id(0)
        if tl.atomic_add(count_ptr + tile, 1, sem="acq_rel") == K - 1:
            tl.store(count_ptr + tile, 0)  # the next launch on the stream starts from 0
            eps = _sum_partials(part_ptr, wts_ptr, xp, xm, rows64, rmask, B, D, K, BLOCK_B, D_PAD, SKIP_UNUSED)
            _finish(x, eps, out_ptr, xp, xm, noise_ptr, coef_ptr, adds_ptr, known_ptr, mask_ptr, known_stride, step,
                    seed, clip_range, rows64, rmask, dcols, dmask, B, D, BLOCK_B, D_PAD, CLIP, NOISE_MODE, INPAINT)
    else:
        eps = _compose(x, step, rows64, rmask, dcols, dmask, D, H, L, K,
                       w_in_ptr, w_a_ptr, w_b_ptr, b_b_ptr, w_out_ptr, b_out_ptr,
                       t_in_ptr, t_shift_ptr, wts_ptr, c_in_ptr, scale_ptr, shift_ptr, h_buf, y_buf,
                       BLOCK_B, D_PAD, H_PAD, H_STRIDE, BLOCK_N, BLOCK_K, BLOCK_HD, H_IN_REGS, SKIP_UNUSED,
                       PRECISION)
        _finish(x, eps, out_ptr, xp, xm, noise_ptr, coef_ptr, adds_ptr, known_ptr, mask_ptr, known_stride, step,
                seed, clip_range, rows64, rmask, dcols, dmask, B, D, BLOCK_B, D_PAD, CLIP, NOISE_MODE, INPAINT)


def mlp_step(packed, steps, call, coef, adds_noise, step, x, noise=None, *, seed=None, clip_range=None,
             out=None, scratch=None, counters=None, known=None, known_mask=None, block_b=None, h_in_registers=None,
             precision=None, skip_unused=True, num_warps=None, split=None, validate=True):
    """Run denoising step ``step`` (0-based, sampling order) for every row of ``x``; returns ``out``.

    Args:
        packed, steps, call: :func:`fdp.packing.pack_policy`, ``step_terms``, ``call_terms``.
        coef, adds_noise: the scheduler table (``StepTable.to(device).coef`` / ``.adds_noise``).
        step: which row of the table (and of ``steps`` / ``noise``) this launch applies.
        x: ``[B, D]`` float32 sample x_t.
        noise: the step-noise tensor ``[T, B, D]`` (its row ``step`` is used where
            ``adds_noise[step]``), or None.
        seed: instead of ``noise``, draw z in the kernel (Philox; see :mod:`fdp_kernels.mlp_persistent`).
        clip_range: clamp x0 to ``[-clip_range, clip_range]`` (None: no clipping).
        out: ``[B, D]`` float32 result buffer (default: a new one); may be ``x``.
        scratch: float32 buffer of at least ``mlp_common.scratch_numel`` elements (wide models, the split
            kernel's partials; default: allocated here). Pass one to avoid the allocation.
        counters: the split kernel's int32 arrival counters, at least ``mlp_common.counters_numel`` of them,
            all 0 before the first launch (every launch leaves them 0; default: zeros allocated here).
            Launches that share them must be ordered (one stream).
        block_b, h_in_registers, precision (``mlp_common.PRECISIONS``), skip_unused, num_warps, split: tuning
            (defaults from :func:`fdp_kernels.mlp_common.block_config`, which decides the split).
        known, known_mask: inpainting (both or neither): after the update, ``out = where(known_mask, known_s, out)``
            with ``known_s`` = ``known`` (float32 ``[B, D]``) or its row ``step`` (``[T, B, D]``); ``known_mask``
            bool or uint8 ``[B, D]``.
        validate: check every argument (the sampler validates once and skips it on later steps).
    """
    if validate:
        dims = check_launch(packed, steps, call, coef, adds_noise, x, noise, out, clip_range, seed)
        check_known(known, known_mask, dims)
        if isinstance(step, bool) or not isinstance(step, int) or not 0 <= step < dims["T"]:
            raise ValueError(f"`step` must be an int in [0, {dims['T']}), got {step!r}")
    cfg, out, scratch, counters, mode = launch_setup(packed, x, noise, seed, out, scratch, counters, validate,
                                                     block_b, h_in_registers, precision, num_warps, split)
    from .ops import launch_mlp  # here: fdp_kernels.ops imports this module's kernel

    launch_mlp(False, x, out, packed, steps, call, coef, adds_noise, noise, scratch, counters, step, seed,
               clip_range, mode, skip_unused, cfg, known, known_mask)
    return out

"""The whole sampling loop of a factorized MLP policy in one launch.

For t = 0..T-1 (sampling order), for every batch row:

    eps = sum_k weights[k] * eps_k(x; t_in[t], t_shift[t])      (docs/mlp_denoiser.md)
    x0  = a_x[t] x + a_m[t] eps;  x0 = clamp(x0, +-clip_range) when clipping
    x   = c_x0[t] x0 + c_x[t] x + c_m[t] eps + sigma[t] z_t     (z_t only where adds_noise[t])

starting from ``x = x_T`` and writing the final ``x`` (x_0). Inputs are those
of :func:`fdp_kernels.mlp_step.mlp_step` (the layout of ``python/fdp/packing.py``),
with all T rows of the step terms, the table and the noise used in turn.

Design: one program per tile of ``BLOCK_B`` rows owns those rows for all T
steps: ``x`` stays in registers from x_T to x_0, only the result is written,
and the K components are evaluated with the same helpers as the per-step
kernel (:mod:`fdp_kernels.mlp_common`). The weights are re-read every step;
for the models this kernel serves (K * (2 D H + 2 L H^2) weights, 4.4 MB at
K = 4, H = 256, L = 2 in float32) they stay resident in L2 across steps, and
small ones stay in L1. Wide models stage the hidden state in a per-program
scratch buffer as in the per-step kernel.

No component split here (unlike the per-step kernel at small batch): every
step needs the combined ``x`` of the previous one, so programs that each
evaluated one component would have to wait for each other inside the launch,
T times. Triton has no grid-wide barrier, co-residency of the programs is not
guaranteed (a spin-wait could wait forever for a program that never gets an
SM), and the interpreter runs programs one after the other, so a spinning
program would deadlock there. At small batch the per-step kernel (split, one
launch per step) is the one that spreads the weights over several SMs.

Noise: ``noise`` is the step-noise tensor ``[T, B, D]`` (row t read at step t
where ``adds_noise[t]``); or, with ``seed=``, z is generated in the kernel
by a Box-Muller transform of Philox uniforms (``tl.randint4x``), counter
``(t * B + row) * D + column`` under ``seed``. That noise is standard normal
but **not** bit-equal to what ``torch.randn`` with any generator would draw;
the same seed (and batch size) gives the same result, and the per-step kernel
with the same seed draws the same numbers.
"""

from __future__ import annotations

import triton
import triton.language as tl

from .mlp_common import _compose, _step_noise, _tile, check_known, check_launch, launch_setup
from .schedule import _inpaint, _scheduler_update

__all__ = ["mlp_sample", "mlp_persistent_kernel"]


@triton.jit(do_not_specialize=["seed"])
def mlp_persistent_kernel(x_ptr, out_ptr,
                          w_in_ptr, w_a_ptr, w_b_ptr, b_b_ptr, w_out_ptr, b_out_ptr,
                          t_in_ptr, t_shift_ptr, wts_ptr, c_in_ptr, scale_ptr, shift_ptr,
                          coef_ptr, adds_ptr, noise_ptr, scratch_ptr, known_ptr, mask_ptr,
                          T, seed, clip_range, known_stride, B, D, H, L, K,
                          BLOCK_B: tl.constexpr, D_PAD: tl.constexpr, H_PAD: tl.constexpr,
                          H_STRIDE: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                          BLOCK_HD: tl.constexpr, H_IN_REGS: tl.constexpr, SKIP_UNUSED: tl.constexpr,
                          PRECISION: tl.constexpr, CLIP: tl.constexpr, NOISE_MODE: tl.constexpr,
                          INPAINT: tl.constexpr):
    x, xp, xm, rows64, rmask, dcols, dmask, h_buf, y_buf = _tile(x_ptr, scratch_ptr, B, D, BLOCK_B, D_PAD, H_STRIDE)
    for step in range(T):
        eps = _compose(x, step, rows64, rmask, dcols, dmask, D, H, L, K,
                       w_in_ptr, w_a_ptr, w_b_ptr, b_b_ptr, w_out_ptr, b_out_ptr,
                       t_in_ptr, t_shift_ptr, wts_ptr, c_in_ptr, scale_ptr, shift_ptr, h_buf, y_buf,
                       BLOCK_B, D_PAD, H_PAD, H_STRIDE, BLOCK_N, BLOCK_K, BLOCK_HD, H_IN_REGS, SKIP_UNUSED,
                       PRECISION)
        z = _step_noise(noise_ptr, seed, step, rows64, rmask, dcols, dmask, B, D, BLOCK_B, D_PAD, NOISE_MODE)
        x = _scheduler_update(x, eps, z, coef_ptr, adds_ptr, step, clip_range, CLIP, NOISE_MODE != 0)
        x = _inpaint(x, known_ptr, mask_ptr, known_stride, step, xp, xm, INPAINT)
        # Keep the padding rows of a partial tile at 0 (they never reach memory, but stay tame over T steps).
        x = tl.where(xm, x, 0.0)
    tl.store(out_ptr + xp, x, mask=xm)


def mlp_sample(packed, steps, call, coef, adds_noise, x_T, noise=None, *, seed=None, clip_range=None, out=None,
               scratch=None, known=None, known_mask=None, block_b=None, h_in_registers=None, precision=None,
               skip_unused=True, num_warps=None):
    """All T denoising steps from ``x_T [B, D]`` (float32) in one launch; returns x_0 in ``out``.

    Arguments as :func:`fdp_kernels.mlp_step.mlp_step` (without ``step``): ``noise``
    is the whole step-noise tensor ``[T, B, D]``, or None; ``seed`` generates the
    noise in the kernel instead (not bit-equal to torch's generator). ``out``
    may be ``x_T`` itself; ``known`` / ``known_mask`` inpaint after every step, as there.
    """
    check_known(known, known_mask, check_launch(packed, steps, call, coef, adds_noise, x_T, noise, out, clip_range,
                                                seed))
    cfg, out, scratch, _, mode = launch_setup(packed, x_T, noise, seed, out, scratch, None, True, block_b,
                                              h_in_registers, precision, num_warps, False)
    from .ops import launch_mlp  # here: fdp_kernels.ops imports this module's kernel

    launch_mlp(True, x_T, out, packed, steps, call, coef, adds_noise, noise, scratch, None, 0, seed, clip_range, mode,
               skip_unused, cfg, known, known_mask)
    return out

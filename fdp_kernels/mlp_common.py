"""Pieces shared by the fused MLP kernels (:mod:`fdp_kernels.mlp_step`, :mod:`fdp_kernels.mlp_persistent`).

The math is docs/mlp_denoiser.md, on the packed tensors of
``python/fdp/packing.py`` (weights input-major ``[in, out]``, stacked over K;
biases and every precomputed term float32). For one tile of ``BLOCK_B`` batch
rows and denoising step ``i``:

    for k in 0..K-1 (skipped when the router gives it weight exactly 0 on every row of the tile):
        h   = x @ w_in[k] + t_in[i, k] + c_in[:, k]
        for l in 0..L-1:
            y = (h @ w_a[k, l]) * scale[:, k, l] + shift[:, k, l] + t_shift[i, k, l]
            h = h + SiLU(y) @ w_b[k, l] + b_b[k, l]
        eps += weights[:, k] * (h @ w_out[k] + b_out[k])
    x0   = a_x x + a_m eps;  x0 = clamp(x0, +-clip_range) if CLIP
    x'   = c_x0 x0 + c_x x + c_m eps + [adds_noise[i]] sigma z

with the scheduler row ``coef[i] = (a_x, a_m, c_x0, c_x, c_m, sigma)`` (the
columns of :mod:`fdp_kernels.abi`, which also holds the limits below).

Everything accumulates in float32: weights (float32, bfloat16 or float16) are
read in the pack's dtype and every ``tl.dot`` accumulates in float32.
``PRECISION`` picks the products (:data:`PRECISIONS`): "ieee" (float32 FMA,
the default for float32 weights: matches the float32 reference to ~1e-6),
"tf32" (tensor cores, the default for bfloat16/float16 weights, which tf32
holds exactly; the float32 activations are rounded to 10 mantissa bits),
"tf32x3" (three tf32 products, about float32 accuracy on tensor cores) or
"native" (half weights only: activations rounded to the weight dtype, half
tensor cores).

One program owns a tile of ``BLOCK_B`` rows (>= 16, the smallest ``tl.dot``;
rows past B are masked and never stored). ``x`` and the composed ``eps``
(``[BLOCK_B, D_PAD]``, D padded to a power of two >= 16) always stay in
registers; the matmuls that touch them use ``BLOCK_HD`` hidden columns at a
time so that their ``[D_PAD, BLOCK_HD]`` weight tile stays small. Where the
hidden state lives (``H_IN_REGS``):

* ``H_IN_REGS=True`` (padded width ``H_PAD <= MAX_H_IN_REGS`` = 32 by default,
  up to 64 on request): the whole ``[BLOCK_B, H_PAD]`` hidden state stays in
  registers and each matmul is one ``tl.dot`` against the whole
  ``[H_PAD, H_PAD]`` weight tile.
* ``H_IN_REGS=False`` (any width up to 512): a ``[BLOCK_B, H]`` float32
  activation plus an ``[H, H]`` weight tile do not fit in registers (nor in
  shared memory at H = 512: 1 MiB of float32 weights), so the hidden state
  ``h`` and the block activation ``SiLU(y)`` are staged in a per-program
  global scratch buffer (``2 * BLOCK_B * H_STRIDE`` floats, 64 KiB at H = 512,
  BLOCK_B = 16: it stays in L1/L2) and every matmul is tiled, ``BLOCK_N``
  output columns at a time reducing over ``BLOCK_K`` input columns
  (``BLOCK_H`` = 32), with a CTA barrier (``tl.debug_barrier``) between a
  phase that writes the scratch and the next that reads it. The residual
  update ``h += ...`` runs chunk by chunk in place: chunk n of the new h reads
  only chunk n of the old one.

Block sizes and warps come from sm_90a compiles (Triton 3.9 and its ptxas,
specialized as the JIT specializes a launch: aligned pointers, divisibility
hints, batch 1 a constant; ``test_kernels_compile_for_sm90`` prints registers,
stack and spill instructions per variant) at K = 4, H = 256, D = 32, batch 1;
64-column tiles spilled (64 bytes) in the unsplit float32 kernel, 32 did not.
Those compiles had no register bound. Left to itself, ptxas aims at two or
more programs per multiprocessor (128 registers at 8 warps) and spills the
rest: float32 weights kept 8 to 152 bytes per thread in local memory, some
bfloat16 variants on sm_80/86 too. The launches therefore carry ``maxnreg``
(:func:`block_config`): the register file of one multiprocessor for one
program, as the CUDA kernels' ``__launch_bounds__(256, 1)``; with it every
variant that ``scripts/resource_report.py`` compiles is free of local memory
except the float32 persistent kernel at D = 512 (docs/resources.md). In-kernel
noise does not use ``tl.randn``: its libdevice cosine keeps a 28-byte array in
local memory (:func:`_cos_2pi`). Their speed is unmeasured.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from .abi import NUM_COLS, TRITON_MAX_D, TRITON_MAX_H, TRITON_MAX_K, TRITON_MIN_H, WEIGHT_DTYPES
from .checks import check_flat_sample, check_kernel_arg as _check
#: Padded widths up to this keep the hidden state in registers (at 64, float32 weights spilled on sm_90 unsplit,
#: compiled without the register bound).
MAX_H_IN_REGS = 32
#: Hidden columns per matmul tile in the scratch path (64 spilled in the unsplit float32 kernel on sm_90, compiled
#: without the register bound).
BLOCK_H = 32
#: 32-bit registers of one multiprocessor (sm_80 to sm_90), and the most one thread can address.
REGISTER_FILE = 65536
MAX_REGISTERS_PER_THREAD = 255

#: ``tl.dot`` precisions: float32 FMA ("ieee"), tensor cores on float32 ("tf32": activations rounded to 10
#: mantissa bits; "tf32x3": split in three tf32 products, about float32 accuracy), or tensor cores in the
#: weight dtype ("native", bfloat16/float16 weights only: activations rounded to that dtype).
PRECISIONS = ("ieee", "tf32", "tf32x3", "native")

#: ``NOISE_MODE`` values.
NOISE_NONE = 0     # no step adds noise
NOISE_TENSOR = 1   # z read from step_noise [T, B, D]
NOISE_SEED = 2     # z drawn in the kernel (Philox under ``seed``, Box-Muller)


# ------------------------------------------------------------------------------------------------------------
# jit helpers


@triton.jit
def _silu(y):
    return y / (1.0 + tl.exp(-y))


@triton.jit
def _cos_2pi(u):
    """cos(2 pi u) for u in [0, 1), to float32 rounding. Not tl.cos: libdevice's cosf carries a reduction for
    huge arguments that keeps a 28-byte array in local memory, in every kernel that calls it. Here 4u = q + f
    with q = round(4u) (exact in float32) and |f| <= 1/2: q quarter turns plus a = f pi / 2, |a| <= pi / 4, where
    the Taylor polynomials below are off by less than 3e-8 (float32 rounding: 6e-8)."""
    t = 4.0 * u
    q = tl.floor(t + 0.5)
    a = (t - q) * 1.5707963267948966
    a2 = a * a
    c = 1.0 + a2 * (-0.5 + a2 * (1.0 / 24.0 + a2 * (-1.0 / 720.0 + a2 * (1.0 / 40320.0))))
    s = a * (1.0 + a2 * (-1.0 / 6.0 + a2 * (1.0 / 120.0 + a2 * (-1.0 / 5040.0 + a2 * (1.0 / 362880.0)))))
    quarter = q.to(tl.int32) & 3  # cos(a + quarter pi / 2): cos a, -sin a, -cos a, sin a
    return tl.where(quarter == 0, c, tl.where(quarter == 1, -s, tl.where(quarter == 2, -c, s)))


@triton.jit
def _dot(a, w, PRECISION: tl.constexpr):
    """``a @ w`` accumulated in float32 (a: float32 activations, w: a weight tile in the pack's dtype)."""
    if PRECISION == "native":
        # bfloat16/float16 tensor cores: the activations are rounded to the weight dtype.
        return tl.dot(a.to(w.dtype), w, out_dtype=tl.float32)
    else:
        return tl.dot(a, w.to(tl.float32), input_precision=PRECISION)


@triton.jit
def _row_vec(ptr, rows64, rmask, row_stride, cols, cmask):
    """A per-row float32 term tile ``ptr[rows, cols]`` (masked entries 0)."""
    return tl.load(ptr + rows64[:, None] * row_stride + cols[None, :],
                   mask=rmask[:, None] & cmask[None, :], other=0.0)


@triton.jit
def _component_regs(x, k, step, rows64, rmask, dcols, dmask, D, H, L, K,
                    w_in_ptr, w_a_ptr, w_b_ptr, b_b_ptr, w_out_ptr, b_out_ptr,
                    t_in_ptr, t_shift_ptr, c_in_ptr, scale_ptr, shift_ptr,
                    H_PAD: tl.constexpr, PRECISION: tl.constexpr):
    """eps_k for the tile, hidden state ``[BLOCK_B, H_PAD]`` in registers (H_PAD small)."""
    hc = tl.arange(0, H_PAD)
    hm = hc < H
    # h = x @ w_in[k] + t_in[step, k] + c_in[:, k]
    w_i = tl.load(w_in_ptr + k * D * H + dcols[:, None] * H + hc[None, :],
                  mask=dmask[:, None] & hm[None, :], other=0.0)
    t_in = tl.load(t_in_ptr + (step * K + k) * H + hc, mask=hm, other=0.0)
    h = _dot(x, w_i, PRECISION) + t_in[None, :] + _row_vec(c_in_ptr + k * H, rows64, rmask, K * H, hc, hm)
    wmask = hm[:, None] & hm[None, :]
    for l in range(L):
        kl = k * L + l
        w_a = tl.load(w_a_ptr + kl * H * H + hc[:, None] * H + hc[None, :], mask=wmask, other=0.0)
        off = (k * L + l) * H
        t_sh = tl.load(t_shift_ptr + step * K * L * H + off + hc, mask=hm, other=0.0)
        y = (_dot(h, w_a, PRECISION) * _row_vec(scale_ptr + off, rows64, rmask, K * L * H, hc, hm)
             + _row_vec(shift_ptr + off, rows64, rmask, K * L * H, hc, hm) + t_sh[None, :])
        w_b = tl.load(w_b_ptr + kl * H * H + hc[:, None] * H + hc[None, :], mask=wmask, other=0.0)
        b_b = tl.load(b_b_ptr + kl * H + hc, mask=hm, other=0.0)
        h = h + _dot(_silu(y), w_b, PRECISION) + b_b[None, :]
    w_o = tl.load(w_out_ptr + k * H * D + hc[:, None] * D + dcols[None, :],
                  mask=hm[:, None] & dmask[None, :], other=0.0)
    b_o = tl.load(b_out_ptr + k * D + dcols, mask=dmask, other=0.0)
    return _dot(h, w_o, PRECISION) + b_o[None, :]


@triton.jit
def _scratch_matmul(a_ptr, w_ptr, n0, H, BLOCK_B: tl.constexpr, H_STRIDE: tl.constexpr,
                    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, PRECISION: tl.constexpr):
    """``a[:, :H] @ w[:H, n0:n0+BLOCK_N]``: a is a ``[BLOCK_B, H_STRIDE]`` fp32 scratch tile, w ``[H, H]``."""
    br = tl.arange(0, BLOCK_B)
    nc = n0 + tl.arange(0, BLOCK_N)
    nm = nc < H
    acc = tl.zeros((BLOCK_B, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, H, BLOCK_K):
        kc = k0 + tl.arange(0, BLOCK_K)
        km = kc < H
        a = tl.load(a_ptr + br[:, None] * H_STRIDE + kc[None, :], mask=km[None, :], other=0.0)
        w = tl.load(w_ptr + kc[:, None] * H + nc[None, :], mask=km[:, None] & nm[None, :], other=0.0)
        acc += _dot(a, w, PRECISION)
    return acc


@triton.jit
def _component_scratch(x, k, step, rows64, rmask, dcols, dmask, D, H, L, K,
                       w_in_ptr, w_a_ptr, w_b_ptr, b_b_ptr, w_out_ptr, b_out_ptr,
                       t_in_ptr, t_shift_ptr, c_in_ptr, scale_ptr, shift_ptr, h_buf, y_buf,
                       BLOCK_B: tl.constexpr, H_STRIDE: tl.constexpr, D_PAD: tl.constexpr,
                       BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_HD: tl.constexpr,
                       PRECISION: tl.constexpr):
    """eps_k for the tile, ``h`` and ``SiLU(y)`` staged in the program's scratch (any H <= 512)."""
    br = tl.arange(0, BLOCK_B)
    # h = x @ w_in[k] + t_in + c_in, BLOCK_HD columns at a time (x stays in registers).
    for n0 in range(0, H, BLOCK_HD):
        nc = n0 + tl.arange(0, BLOCK_HD)
        nm = nc < H
        w = tl.load(w_in_ptr + k * D * H + dcols[:, None] * H + nc[None, :],
                    mask=dmask[:, None] & nm[None, :], other=0.0)
        t_in = tl.load(t_in_ptr + (step * K + k) * H + nc, mask=nm, other=0.0)
        h = _dot(x, w, PRECISION) + t_in[None, :] + _row_vec(c_in_ptr + k * H, rows64, rmask, K * H, nc, nm)
        tl.store(h_buf + br[:, None] * H_STRIDE + nc[None, :], h)
    tl.debug_barrier()
    for l in range(L):
        kl = k * L + l
        off = (k * L + l) * H
        # SiLU(y) with y = (h @ w_a) * scale + shift + t_shift   -> y_buf
        for n0 in range(0, H, BLOCK_N):
            nc = n0 + tl.arange(0, BLOCK_N)
            nm = nc < H
            acc = _scratch_matmul(h_buf, w_a_ptr + kl * H * H, n0, H, BLOCK_B, H_STRIDE, BLOCK_N, BLOCK_K,
                                  PRECISION)
            t_sh = tl.load(t_shift_ptr + step * K * L * H + off + nc, mask=nm, other=0.0)
            y = (acc * _row_vec(scale_ptr + off, rows64, rmask, K * L * H, nc, nm)
                 + _row_vec(shift_ptr + off, rows64, rmask, K * L * H, nc, nm) + t_sh[None, :])
            tl.store(y_buf + br[:, None] * H_STRIDE + nc[None, :], _silu(y))
        tl.debug_barrier()
        # h += SiLU(y) @ w_b + b_b, in place chunk by chunk
        for n0 in range(0, H, BLOCK_N):
            nc = n0 + tl.arange(0, BLOCK_N)
            nm = nc < H
            acc = _scratch_matmul(y_buf, w_b_ptr + kl * H * H, n0, H, BLOCK_B, H_STRIDE, BLOCK_N, BLOCK_K,
                                  PRECISION)
            b = tl.load(b_b_ptr + kl * H + nc, mask=nm, other=0.0)
            hp = h_buf + br[:, None] * H_STRIDE + nc[None, :]
            tl.store(hp, tl.load(hp) + acc + b[None, :])
        tl.debug_barrier()
    # eps_k = h @ w_out[k] + b_out[k]   ([BLOCK_B, D_PAD], reduced BLOCK_HD hidden columns at a time)
    acc = tl.zeros((BLOCK_B, D_PAD), dtype=tl.float32)
    for k0 in range(0, H, BLOCK_HD):
        kc = k0 + tl.arange(0, BLOCK_HD)
        km = kc < H
        a = tl.load(h_buf + br[:, None] * H_STRIDE + kc[None, :], mask=km[None, :], other=0.0)
        w = tl.load(w_out_ptr + k * H * D + kc[:, None] * D + dcols[None, :],
                    mask=km[:, None] & dmask[None, :], other=0.0)
        acc += _dot(a, w, PRECISION)
    tl.debug_barrier()  # the next component overwrites h_buf
    b = tl.load(b_out_ptr + k * D + dcols, mask=dmask, other=0.0)
    return acc + b[None, :]


@triton.jit
def _scratch_offset(slot, BLOCK_B: tl.constexpr, H_STRIDE: tl.constexpr):
    """First float of program ``slot``'s two scratch buffers; 64-bit: in 32 bits it wraps past
    2**31 floats (65536 programs of 32 rows at H = 512, about 2M rows)."""
    return slot.to(tl.int64) * (2 * BLOCK_B * H_STRIDE)


@triton.jit
def _tile(x_ptr, scratch_ptr, B, D, BLOCK_B: tl.constexpr, D_PAD: tl.constexpr, H_STRIDE: tl.constexpr):
    """This program's rows (tile ``program_id(0)``): x [BLOCK_B, D_PAD] (masked), its offsets and masks, and its
    two scratch buffers (one pair per program of the grid, which the split kernel makes [tiles, K])."""
    tile = tl.program_id(0)
    rows = tile * BLOCK_B + tl.arange(0, BLOCK_B)
    rmask = rows < B
    rows64 = rows.to(tl.int64)
    dcols = tl.arange(0, D_PAD)
    dmask = dcols < D
    xp = rows64[:, None] * D + dcols[None, :]
    xm = rmask[:, None] & dmask[None, :]
    x = tl.load(x_ptr + xp, mask=xm, other=0.0)
    h_buf = scratch_ptr + _scratch_offset(tile * tl.num_programs(1) + tl.program_id(1), BLOCK_B, H_STRIDE)
    y_buf = h_buf + BLOCK_B * H_STRIDE
    return x, xp, xm, rows64, rmask, dcols, dmask, h_buf, y_buf


@triton.jit
def _used(wk, SKIP_UNUSED: tl.constexpr):
    """Whether to evaluate a component given its weights on the tile's rows. Hard / top-k routing: a component no
    row of the tile uses costs nothing. A NaN weight counts as used (NaN != 0), so it reaches the output as NaN;
    a max over |w| would drop it."""
    if SKIP_UNUSED:
        used = tl.max((wk != 0.0).to(tl.int32), axis=0) > 0
    else:
        used = tl.max((wk != 0.0).to(tl.int32), axis=0) >= 0  # always
    return used


@triton.jit
def _weighted(x, k, wk, step, rows64, rmask, dcols, dmask, D, H, L, K,
              w_in_ptr, w_a_ptr, w_b_ptr, b_b_ptr, w_out_ptr, b_out_ptr,
              t_in_ptr, t_shift_ptr, c_in_ptr, scale_ptr, shift_ptr, h_buf, y_buf,
              BLOCK_B: tl.constexpr, D_PAD: tl.constexpr, H_PAD: tl.constexpr, H_STRIDE: tl.constexpr,
              BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_HD: tl.constexpr,
              H_IN_REGS: tl.constexpr, PRECISION: tl.constexpr):
    """``weights[:, k] * eps_k(x)`` for the tile, ``[BLOCK_B, D_PAD]`` float32."""
    if H_IN_REGS:
        ek = _component_regs(x, k, step, rows64, rmask, dcols, dmask, D, H, L, K,
                             w_in_ptr, w_a_ptr, w_b_ptr, b_b_ptr, w_out_ptr, b_out_ptr,
                             t_in_ptr, t_shift_ptr, c_in_ptr, scale_ptr, shift_ptr, H_PAD, PRECISION)
    else:
        ek = _component_scratch(x, k, step, rows64, rmask, dcols, dmask, D, H, L, K,
                                w_in_ptr, w_a_ptr, w_b_ptr, b_b_ptr, w_out_ptr, b_out_ptr,
                                t_in_ptr, t_shift_ptr, c_in_ptr, scale_ptr, shift_ptr, h_buf, y_buf,
                                BLOCK_B, H_STRIDE, D_PAD, BLOCK_N, BLOCK_K, BLOCK_HD, PRECISION)
    # Per row, a zero weight leaves the component out even when its output is NaN
    # (fdp.FactorizedPolicy.compose): rows of one tile may be routed differently.
    return tl.where(wk[:, None] != 0.0, wk[:, None] * ek, 0.0)


@triton.jit
def _compose(x, step, rows64, rmask, dcols, dmask, D, H, L, K,
             w_in_ptr, w_a_ptr, w_b_ptr, b_b_ptr, w_out_ptr, b_out_ptr,
             t_in_ptr, t_shift_ptr, wts_ptr, c_in_ptr, scale_ptr, shift_ptr, h_buf, y_buf,
             BLOCK_B: tl.constexpr, D_PAD: tl.constexpr, H_PAD: tl.constexpr, H_STRIDE: tl.constexpr,
             BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_HD: tl.constexpr,
             H_IN_REGS: tl.constexpr, SKIP_UNUSED: tl.constexpr, PRECISION: tl.constexpr):
    """``sum_k weights[:, k] * eps_k(x)`` for the tile, ``[BLOCK_B, D_PAD]`` float32, k in order."""
    eps = tl.zeros((BLOCK_B, D_PAD), dtype=tl.float32)
    for k in range(K):
        wk = tl.load(wts_ptr + rows64 * K + k, mask=rmask, other=0.0)
        if _used(wk, SKIP_UNUSED):
            eps += _weighted(x, k, wk, step, rows64, rmask, dcols, dmask, D, H, L, K,
                             w_in_ptr, w_a_ptr, w_b_ptr, b_b_ptr, w_out_ptr, b_out_ptr,
                             t_in_ptr, t_shift_ptr, c_in_ptr, scale_ptr, shift_ptr, h_buf, y_buf,
                             BLOCK_B, D_PAD, H_PAD, H_STRIDE, BLOCK_N, BLOCK_K, BLOCK_HD, H_IN_REGS, PRECISION)
    return eps


@triton.jit
def _partials(scratch_ptr, H_IN_REGS: tl.constexpr, BLOCK_B: tl.constexpr, H_STRIDE: tl.constexpr):
    """Where the split kernel's ``[K, B, D]`` weighted outputs start: after the per-program scratch buffers
    (whose size keeps this 16-byte aligned), at the start of ``scratch`` when the hidden state stays in
    registers."""
    if H_IN_REGS:
        base = scratch_ptr
    else:
        base = scratch_ptr + _scratch_offset(tl.num_programs(0) * tl.num_programs(1), BLOCK_B, H_STRIDE)
    return base


@triton.jit
def _sum_partials(part_ptr, wts_ptr, xp, xm, rows64, rmask, B, D, K,
                  BLOCK_B: tl.constexpr, D_PAD: tl.constexpr, SKIP_UNUSED: tl.constexpr):
    """The split kernel's composition: the K weighted outputs of the tile summed in k order, skipping the
    components :func:`_used` skipped, so the sum is bit-equal to :func:`_compose`'s whatever order the
    programs ran in. ``.cg`` loads: the partials were written by other SMs in this launch; read them from L2."""
    eps = tl.zeros((BLOCK_B, D_PAD), dtype=tl.float32)
    for k in range(K):
        wk = tl.load(wts_ptr + rows64 * K + k, mask=rmask, other=0.0)
        if _used(wk, SKIP_UNUSED):
            eps += tl.load(part_ptr + tl.cast(k, tl.int64) * B * D + xp, mask=xm, other=0.0, cache_modifier=".cg")
    return eps


@triton.jit
def _step_noise(noise_ptr, seed, step, rows64, rmask, dcols, dmask, B, D,
                BLOCK_B: tl.constexpr, D_PAD: tl.constexpr, NOISE_MODE: tl.constexpr):
    """The noise z of ``step`` for the tile (float32; zeros when NOISE_MODE is NOISE_NONE)."""
    if NOISE_MODE == 1:
        z = tl.load(noise_ptr + (step * B + rows64[:, None]) * D + dcols[None, :],
                    mask=rmask[:, None] & dmask[None, :], other=0.0).to(tl.float32)
    elif NOISE_MODE == 2:
        # One Philox stream per (seed, step, row, column): counter (step*B + row)*D + col (< 2**31, checked
        # by the launcher). Not the numbers torch's generator would draw. tl.randn's Box-Muller from the same
        # two uniforms, with the cosine of _cos_2pi.
        offs = ((step * B + rows64[:, None]) * D + dcols[None, :]).to(tl.int32)
        i1, i2, _, _ = tl.randint4x(seed, offs)
        u1 = tl.maximum(1.0e-7, tl.uint_to_uniform_float(i1))
        z = tl.sqrt(-2.0 * tl.log(u1)) * _cos_2pi(tl.uint_to_uniform_float(i2))
    else:
        z = tl.zeros((BLOCK_B, D_PAD), dtype=tl.float32)
    return z


# ------------------------------------------------------------------------------------------------------------
# host side: validation and block sizes shared by the two launchers

def check_launch(packed, steps, call, coef, adds_noise, x, noise, out, clip_range, seed):
    """Validate a launch's tensors; returns ``dict(B, D, H, L, K, T)``.

    ``packed`` / ``steps`` / ``call`` are :class:`fdp.packing.PackedMLP` /
    ``StepTerms`` / ``CallTerms`` (or anything with the same tensor attributes).
    """
    check_flat_sample(x)
    dev = x.device
    B, D = x.shape
    if B < 1:
        raise ValueError("batch size must be >= 1, got a sample with 0 rows")
    for obj, name, kind, attrs in ((packed, "packed", "PackedMLP", ("w_in", "w_a", "w_b", "b_b", "w_out", "b_out")),
                                   (steps, "steps", "StepTerms", ("t_in", "t_shift")),
                                   (call, "call", "CallTerms", ("weights", "c_in", "scale", "shift"))):
        for attr in attrs:
            if not isinstance(getattr(obj, attr, None), torch.Tensor):
                raise TypeError(f"`{name}` must be an fdp.packing.{kind} (missing tensor `{attr}`), "
                                f"got {type(obj).__name__}")
    w_in = packed.w_in
    if w_in.ndim != 3:
        raise ValueError(f"`packed.w_in` must be [K, D, H], got {list(w_in.shape)}")
    K, Dw, H = w_in.shape
    if Dw != D:
        raise ValueError(f"`x` must have D = {Dw} columns (packed.w_in is [K, D, H] = {list(w_in.shape)}), got {D}")
    if packed.w_a.ndim != 4:
        raise ValueError(f"`packed.w_a` must be [K, L, H, H], got {list(packed.w_a.shape)}")
    L = packed.w_a.shape[1]
    if not 1 <= K <= TRITON_MAX_K:
        raise ValueError(f"fused MLP kernels serve 1..{TRITON_MAX_K} components, got K = {K}")
    if not TRITON_MIN_H <= H <= TRITON_MAX_H:
        raise ValueError(f"fused MLP kernels serve hidden widths {TRITON_MIN_H}..{TRITON_MAX_H}, got H = {H}")
    if D > TRITON_MAX_D:
        raise ValueError(f"fused MLP kernels serve D = horizon * action_dim <= {TRITON_MAX_D}, got D = {D}")
    wdt = w_in.dtype
    if wdt not in WEIGHT_DTYPES:
        raise TypeError(f"`packed.w_in` must have one of the dtypes {list(WEIGHT_DTYPES)}, got {wdt}")
    f32 = torch.float32
    _check("packed.w_in", w_in, (K, D, H), wdt, dev)
    _check("packed.w_a", packed.w_a, (K, L, H, H), wdt, dev)
    _check("packed.w_b", packed.w_b, (K, L, H, H), wdt, dev)
    _check("packed.b_b", packed.b_b, (K, L, H), f32, dev)
    _check("packed.w_out", packed.w_out, (K, H, D), wdt, dev)
    _check("packed.b_out", packed.b_out, (K, D), f32, dev)
    if steps.t_in.ndim != 3:
        raise ValueError(f"`steps.t_in` must be [T, K, H], got {list(steps.t_in.shape)}")
    T = steps.t_in.shape[0]
    _check("steps.t_in", steps.t_in, (T, K, H), f32, dev)
    _check("steps.t_shift", steps.t_shift, (T, K, L, H), f32, dev)
    _check("call.weights", call.weights, (B, K), f32, dev)
    _check("call.c_in", call.c_in, (B, K, H), f32, dev)
    _check("call.scale", call.scale, (B, K, L, H), f32, dev)
    _check("call.shift", call.shift, (B, K, L, H), f32, dev)
    _check("coef", coef, (T, NUM_COLS), f32, dev)
    _check("adds_noise", adds_noise, (T,), (torch.bool, torch.int8, torch.uint8, torch.int32), dev)
    if noise is not None:
        if seed is not None:
            raise ValueError("pass either `noise` or `seed`, not both")
        _check("noise", noise, (T, B, D), (torch.float32, torch.bfloat16, torch.float16), dev)
    if seed is not None:
        if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**31:
            raise ValueError(f"`seed` must be an int in [0, 2**31), got {seed!r}")
        if T * B * D >= 2**31:
            raise ValueError(f"in-kernel noise needs T * B * D < 2**31, got {T} * {B} * {D}")
    if out is not None:
        _check("out", out, (B, D), f32, dev)
    if clip_range is not None:
        if isinstance(clip_range, bool) or not isinstance(clip_range, (int, float)) or not clip_range >= 0:
            raise ValueError(f"`clip_range` must be None (no clipping) or a non-negative number, got {clip_range!r}")
    if K * L * H * H >= 2**31 or T * K * L * H >= 2**31:
        raise ValueError(f"fused MLP kernels index weights with 32-bit offsets: K * L * H * H = {K * L * H * H} "
                         f"and T * K * L * H = {T * K * L * H} must be < 2**31")
    return dict(B=B, D=D, H=H, L=L, K=K, T=T, device=dev)


def check_known(known, known_mask, dims) -> None:
    """Validate a launch's inpainting tensors against ``check_launch``'s ``dims``: both None, or float32
    ``known`` ``[B, D]`` / ``[T, B, D]`` and bool or uint8 ``known_mask`` ``[B, D]``, contiguous, on x's device."""
    if (known is None) != (known_mask is None):
        raise ValueError("inpainting needs both `known` and `known_mask`, or neither")
    if known is None:
        return
    B, D, T = dims["B"], dims["D"], dims["T"]
    dev = dims["device"]
    shape = tuple(known.shape) if isinstance(known, torch.Tensor) else None
    _check("known", known, shape if shape in ((B, D), (T, B, D)) else (B, D), torch.float32, dev)
    _check("known_mask", known_mask, (B, D), (torch.bool, torch.uint8), dev)


#: Multiprocessors the split rule assumes off CUDA (the interpreter runs programs one at a time): an H100's, so
#: that CPU tests take the path a GPU would.
HOST_MULTIPROCESSORS = 132


def _multiprocessors(device) -> int:
    # torch caches the device properties.
    if device is not None and torch.device(device).type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return HOST_MULTIPROCESSORS


def block_config(B, D, H, block_b=None, h_in_registers=None, precision=None, weight_dtype=None, num_warps=None,
                 *, K=1, split=None, device=None):
    """Block sizes, code path, warps, the launch's register bound (``maxnreg``; None: ptxas's own choice) and
    whether the per-step kernel splits the components (``SPLIT``).

    The defaults come from sm_90a compiles (the module docstring says which spill); their speed is
    unmeasured. ``split`` (None: the rule below) is for the per-step kernel only; ``device`` is where it
    runs (its multiprocessor count decides the split).
    """
    if block_b is None:
        block_b = 16 if B <= 1024 else 32
    if block_b not in (16, 32, 64, 128):
        raise ValueError(f"`block_b` must be one of 16, 32, 64, 128, got {block_b!r}")
    h_pad = max(16, triton.next_power_of_2(H))
    d_pad = max(16, triton.next_power_of_2(D))
    if h_in_registers is None:
        h_in_registers = h_pad <= MAX_H_IN_REGS
    if h_in_registers and h_pad > 64:
        raise ValueError(f"`h_in_registers=True` serves hidden widths up to 64, got H = {H}")
    half = weight_dtype not in (None, torch.float32)
    if precision is None:
        precision = "tf32" if half else "ieee"
    if precision not in PRECISIONS:
        raise ValueError(f"`precision` must be one of {PRECISIONS}, got {precision!r}")
    if precision == "native" and not half:
        raise ValueError("`precision`='native' needs bfloat16 or float16 weights (float32: use 'tf32')")
    if split is None:
        # The one place that decides. Unsplit, one program per tile evaluates all K components one after the
        # other, so with fewer tiles than multiprocessors most SMs idle while each busy one streams every
        # component's weights (at batch <= 16 one SM streams all of them). Split, K programs per tile share that
        # stream, for the price of a [K, B, D] round trip through L2 and one combine by the last program of
        # the tile; once the tiles alone fill the GPU that price buys nothing.
        split = K > 1 and triton.cdiv(B, block_b) < _multiprocessors(device)
    elif not isinstance(split, bool):
        raise ValueError(f"`split` must be None (automatic), True or False, got {split!r}")
    if num_warps is None:
        # From sm_90a compiles without the register bound (test_kernels_compile_for_sm90 prints them): with the
        # hidden state in scratch, bfloat16 weights at K = 4, H = 256 spilled at 4 warps and not at 8.
        num_warps = 8 if not h_in_registers or precision in ("ieee", "tf32x3") or d_pad >= 256 else 4
    if num_warps not in (1, 2, 4, 8, 16):
        raise ValueError(f"`num_warps` must be a power of two in 1..16, got {num_warps!r}")
    # Without a register bound in the PTX, ptxas picks a register target that fits two or more programs per
    # multiprocessor (128 at 8 warps, 80 on sm_80/86) and spills what does not fit. The grids these kernels get
    # rarely have more programs than multiprocessors, so bound the registers by the whole register file for one
    # program instead, as __launch_bounds__(threads, 1) does for the CUDA kernels. Not at D_PAD = 512: there
    # the [BLOCK_B, D_PAD] float32 tiles alone take 32 registers each at 8 warps, ptxas goes past 128 on its
    # own, and with the bound it spills where without it does not (the float32 per-step kernel, sm_90).
    # ROCm's Triton has no such option.
    bound = d_pad < 512 and torch.version.hip is None
    maxnreg = min(MAX_REGISTERS_PER_THREAD, REGISTER_FILE // (32 * num_warps)) if bound else None
    block_n = block_k = min(BLOCK_H, h_pad)
    # [D_PAD, BLOCK_HD] weight tiles of at most 4096 elements.
    block_hd = max(16, min(block_n, 4096 // d_pad))
    h_stride = triton.cdiv(H, BLOCK_H) * BLOCK_H  # every chunk the kernels write lies inside the row
    return dict(BLOCK_B=block_b, D_PAD=d_pad, H_PAD=h_pad, H_STRIDE=h_stride, BLOCK_N=block_n, BLOCK_K=block_k,
                BLOCK_HD=block_hd, H_IN_REGS=bool(h_in_registers), SPLIT=bool(split), PRECISION=precision,
                num_warps=num_warps, maxnreg=maxnreg)


def grid(B, K, block_b, split):
    """The launch grid: one program per tile of ``block_b`` rows, times K when the components are split."""
    tiles = triton.cdiv(B, block_b)
    return (tiles, K) if split else (tiles,)


def scratch_numel(B, D, K, cfg):
    """Floats of scratch a launch needs: two ``[BLOCK_B, H_STRIDE]`` buffers per program unless the hidden state
    stays in registers, then the split kernel's ``[K, B, D]`` weighted outputs."""
    programs = math.prod(grid(B, K, cfg["BLOCK_B"], cfg["SPLIT"]))
    hidden = 0 if cfg["H_IN_REGS"] else programs * 2 * cfg["BLOCK_B"] * cfg["H_STRIDE"]
    return hidden + (K * B * D if cfg["SPLIT"] else 0)


def counters_numel(B, cfg):
    """int32 arrival counters a launch needs (one per tile when split, else none); zero before the first
    launch, and every launch leaves them zero."""
    return triton.cdiv(B, cfg["BLOCK_B"]) if cfg["SPLIT"] else 0


def _workspace(name, buf, need, dtype, device, validate, zero):
    """``buf`` checked (with ``validate``), or a new one when None; None when nothing is needed."""
    if need == 0:
        return None
    if buf is None:
        return (torch.zeros if zero else torch.empty)(need, device=device, dtype=dtype)
    if validate and (not isinstance(buf, torch.Tensor) or buf.dtype != dtype or buf.device != device
                     or not buf.is_contiguous() or buf.numel() < need):
        raise ValueError(f"`{name}` must be a contiguous {dtype} tensor on {device} with at least {need} elements")
    return buf


def launch_setup(packed, x, noise, seed, out, scratch, counters, validate, block_b, h_in_registers, precision,
                 num_warps, split):
    """What both launchers derive before launching: block sizes, buffers, noise mode.

    Returns ``(cfg, out, scratch, counters, noise_mode)``; ``scratch`` and
    ``counters`` (None when the launch needs none) are allocated when not given
    and checked when given (with ``validate``).
    """
    B, D = x.shape
    K, _, H = packed.w_in.shape
    cfg = block_config(B, D, H, block_b, h_in_registers, precision, packed.w_in.dtype, num_warps, K=K, split=split,
                       device=x.device)
    scratch = _workspace("scratch", scratch, scratch_numel(B, D, K, cfg), torch.float32, x.device, validate, False)
    counters = _workspace("counters", counters, counters_numel(B, cfg), torch.int32, x.device, validate, True)
    if out is None:
        out = torch.empty_like(x)
    mode = NOISE_TENSOR if noise is not None else (NOISE_SEED if seed is not None else NOISE_NONE)
    return cfg, out, scratch, counters, mode

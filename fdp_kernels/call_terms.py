"""One sampling call's per-call terms in one launch: the router (its MLP and strategy) and every component's
conditioning terms, from the features ``c [B, Dc]`` and :class:`fdp.packing.PackedCond`.

Writes one float32 buffer laid out as :func:`fdp.packing.split_call_terms` reads it:

    weights [B, K]        strategy(logits),  logits = relu(c W1 + b1) W2 + b2    (``fixed``: the fixed weights)
    c_in    [B, K, H]     \\
    scale   [B, K, L, H]   }  p = c W + b, the columns of ``cond_w`` split into the three tensors
    shift   [B, K, L, H]  /

:func:`fdp.packing.reference_call_terms` is the same computation in torch (the test reference). The strategies
and the router's NaN rules: ``soft`` is a softmax; ``tanh`` the signed, unnormalised tanh; ``hard`` one-hot at
the largest logit and ``topk`` a softmax over the ``topk`` largest, ties to the lowest index; a row with a NaN or
+Inf logit is NaN (``tanh``: any non-finite logit); ``fixed`` skips the router's MLP. Unconditional components
(``cond_w`` with no rows) do not read ``c`` at all: their terms are the biases even for a NaN row of ``c``.

Design: grid ``[tiles of BLOCK_B rows, column tiles of N + 1]``. Program ``(tile, j < last)`` computes columns
``[j BLOCK_N, (j + 1) BLOCK_N)`` of ``p`` for its rows and stores each into the tensor its column belongs to;
program ``(tile, last)`` runs the router for its rows. No program reads another's output, so the launch needs
no ordering among its programs. Program ``(0, last)`` also zeroes the per-step kernel's arrival counters
(``fdp_kernels.mlp_step``, split), which the sampling loop then launches on the same stream: one launch where
there were a fill and this call's torch ops. Everything is float32 (``c`` is read in its own dtype and
converted); the matmuls are IEEE float32 (``tl.dot(input_precision="ieee")``), as the reference's.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .abi import ROUTER_STRATEGIES, STRATEGY_FIXED, STRATEGY_HARD, STRATEGY_SOFT, STRATEGY_TANH
from .checks import check_kernel_arg as _check

__all__ = ["call_terms", "call_terms_kernel", "CALL_BLOCK_B", "CALL_BLOCK_N"]

#: Rows per program (``tl.dot`` needs 16), columns of ``p`` per program, chunk of ``Dc`` / ``Hr`` per step.
CALL_BLOCK_B = 16
CALL_BLOCK_N = 64
CALL_BLOCK_D = 32
CALL_BLOCK_HR = 32
_SOFT = tl.constexpr(STRATEGY_SOFT)
_TANH = tl.constexpr(STRATEGY_TANH)
_HARD = tl.constexpr(STRATEGY_HARD)
_FIXED = tl.constexpr(STRATEGY_FIXED)
_INF = tl.constexpr(float("inf"))
_NAN = tl.constexpr(float("nan"))
#: Counters zeroed per step of program (0, last)'s loop.
_ZERO_BLOCK = 128


@triton.jit
def _tanh(x):
    """tanh to a few float32 ulps (libdevice has no interpreter twin): an odd Taylor polynomial below 0.3, where
    its first dropped term is under 1e-10 relative, and ``(1 - e) / (1 + e)``, ``e = exp(-2|x|)`` above, where
    ``1 - e > 0.45`` loses no digits. +-Inf gives +-1, NaN gives NaN."""
    a = tl.abs(x)
    x2 = x * x
    small = x * (1.0 + x2 * (-1.0 / 3.0 + x2 * (2.0 / 15.0 + x2 * (-17.0 / 315.0 + x2 * (
        62.0 / 2835.0 + x2 * (-1382.0 / 155925.0 + x2 * (21844.0 / 6081075.0)))))))
    e = tl.exp(-2.0 * a)
    large = (1.0 - e) / (1.0 + e)
    large = tl.where(x < 0, -large, large)
    return tl.where(a < 0.3, small, large)


@triton.jit
def _load_c(c_ptr, rows64, rmask, d0, Dk, stride_cb, stride_cd, BLOCK_D: tl.constexpr):
    d = d0 + tl.arange(0, BLOCK_D)
    m = rmask[:, None] & (d < Dk)[None, :]
    return tl.load(c_ptr + rows64[:, None] * stride_cb + d[None, :].to(tl.int64) * stride_cd, mask=m,
                   other=0.0).to(tl.float32)


@triton.jit
def _router_weights(c_ptr, w1_ptr, b1_ptr, w2_ptr, b2_ptr, fixed_ptr, rows64, rmask, Dc, Hr, K, topk,
                    stride_cb, stride_cd,
                    BLOCK_B: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_HR: tl.constexpr, K_PAD: tl.constexpr,
                    STRATEGY: tl.constexpr):
    cols = tl.arange(0, K_PAD)
    kmask = cols < K
    if STRATEGY == _FIXED:
        fixed = tl.load(fixed_ptr + cols, mask=kmask, other=0.0)
        w = tl.zeros((BLOCK_B, K_PAD), dtype=tl.float32) + fixed[None, :]
    else:
        logits = tl.zeros((BLOCK_B, K_PAD), dtype=tl.float32)
        for h0 in range(0, Hr, BLOCK_HR):
            hc = h0 + tl.arange(0, BLOCK_HR)
            hmask = hc < Hr
            hid = tl.zeros((BLOCK_B, BLOCK_HR), dtype=tl.float32)
            for d0 in range(0, Dc, BLOCK_D):
                c = _load_c(c_ptr, rows64, rmask, d0, Dc, stride_cb, stride_cd, BLOCK_D)
                d = d0 + tl.arange(0, BLOCK_D)
                w1 = tl.load(w1_ptr + d[:, None] * Hr + hc[None, :], mask=(d < Dc)[:, None] & hmask[None, :],
                             other=0.0)
                hid += tl.dot(c, w1, input_precision="ieee")
            hid += tl.load(b1_ptr + hc, mask=hmask, other=0.0)[None, :]
            hid = tl.where(hid < 0.0, 0.0, hid)  # ReLU that keeps NaN, as torch's (tl.maximum may drop it)
            w2 = tl.load(w2_ptr + hc[:, None] * K + cols[None, :], mask=hmask[:, None] & kmask[None, :], other=0.0)
            logits += tl.dot(hid, w2, input_precision="ieee")
        logits += tl.load(b2_ptr + cols, mask=kmask, other=0.0)[None, :]
        valid = kmask[None, :]
        if STRATEGY == _TANH:
            # tanh would turn an overflowed logit into a confident +-1: any non-finite logit makes the row NaN.
            bad = tl.sum((valid & ~(tl.abs(logits) < _INF)).to(tl.int32), axis=1) > 0
            w = _tanh(logits)
        else:
            # A NaN or +Inf logit (NaN < inf is False) makes the row NaN, as softmax does by itself.
            bad = tl.sum((valid & ~(logits < _INF)).to(tl.int32), axis=1) > 0
            if STRATEGY == _SOFT:
                keep = valid & (rows64 >= 0)[:, None]
            else:
                # rank_k = how many logits beat logit k: larger, or equal at a lower index. Kept: rank < n.
                rank = tl.zeros((BLOCK_B, K_PAD), dtype=tl.int32)
                for j in range(K):
                    lj = tl.sum(tl.where(cols[None, :] == j, logits, 0.0), axis=1)[:, None]
                    beats = (lj > logits) | ((lj == logits) & (j < cols[None, :]))
                    rank += beats.to(tl.int32)
                if STRATEGY == _HARD:
                    keep = valid & (rank < 1)
                else:
                    keep = valid & (rank < topk)
            if STRATEGY == _HARD:
                w = keep.to(tl.float32)
            else:
                masked = tl.where(keep, logits, -_INF)
                m = tl.max(masked, axis=1)
                e = tl.where(keep, tl.exp(masked - m[:, None]), 0.0)
                w = e / tl.sum(e, axis=1)[:, None]
        w = tl.where(bad[:, None], _NAN, w)
    return w


@triton.jit
def call_terms_kernel(c_ptr, out_ptr, w1_ptr, b1_ptr, w2_ptr, b2_ptr, fixed_ptr, cw_ptr, cb_ptr, count_ptr,
                      B, Dc, Dk, Hr, K, KH, KLH, N, topk, n_counters, stride_cb, stride_cd,
                      BLOCK_B: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                      BLOCK_HR: tl.constexpr, K_PAD: tl.constexpr, STRATEGY: tl.constexpr,
                      ZERO_BLOCK: tl.constexpr):
    tile = tl.program_id(0)
    j = tl.program_id(1)
    rows = tile * BLOCK_B + tl.arange(0, BLOCK_B)
    rmask = rows < B
    rows64 = rows.to(tl.int64)
    if j == tl.num_programs(1) - 1:
        w = _router_weights(c_ptr, w1_ptr, b1_ptr, w2_ptr, b2_ptr, fixed_ptr, rows64, rmask, Dc, Hr, K, topk,
                            stride_cb, stride_cd, BLOCK_B, BLOCK_D, BLOCK_HR, K_PAD, STRATEGY)
        cols = tl.arange(0, K_PAD)
        tl.store(out_ptr + rows64[:, None] * K + cols[None, :], w, mask=rmask[:, None] & (cols < K)[None, :])
        if tile == 0:
            for z0 in range(0, n_counters, ZERO_BLOCK):
                zi = z0 + tl.arange(0, ZERO_BLOCK)
                tl.store(count_ptr + zi, tl.zeros((ZERO_BLOCK,), dtype=tl.int32), mask=zi < n_counters)
    else:
        n = j * BLOCK_N + tl.arange(0, BLOCK_N)
        nmask = n < N
        acc = tl.zeros((BLOCK_B, BLOCK_N), dtype=tl.float32)
        for d0 in range(0, Dk, BLOCK_D):
            c = _load_c(c_ptr, rows64, rmask, d0, Dk, stride_cb, stride_cd, BLOCK_D)
            d = d0 + tl.arange(0, BLOCK_D)
            wt = tl.load(cw_ptr + d[:, None].to(tl.int64) * N + n[None, :], mask=(d < Dk)[:, None] & nmask[None, :],
                         other=0.0)
            acc += tl.dot(c, wt, input_precision="ieee")
        acc += tl.load(cb_ptr + n, mask=nmask, other=0.0)[None, :]
        # Column n of p -> its tensor (c_in [B, K H], scale / shift [B, K L H]) after the weights [B, K].
        n64 = n.to(tl.int64)
        BK = B * K
        off = tl.where(n64 < KH, BK + rows64[:, None] * KH + n64[None, :],
                       tl.where(n64 < KH + KLH, BK + B * KH + rows64[:, None] * KLH + (n64 - KH)[None, :],
                                BK + B * KH + B * KLH + rows64[:, None] * KLH + (n64 - KH - KLH)[None, :]))
        tl.store(out_ptr + off, acc, mask=rmask[:, None] & nmask[None, :])


def check_call(pc, global_cond, out, counters=None) -> tuple[int, int]:
    """Validate a launch's arguments; returns ``(B, Dc)``."""
    if not isinstance(global_cond, torch.Tensor):
        raise TypeError(f"`global_cond` must be a torch.Tensor, got {type(global_cond).__name__}")
    if global_cond.dtype not in (torch.float32, torch.float64, torch.bfloat16, torch.float16):
        raise TypeError(f"`global_cond` must be a floating tensor, got {global_cond.dtype}")
    Dc, K, L, H = pc.Dc, pc.K, pc.L, pc.H
    if global_cond.ndim != 2 or global_cond.shape[1] != Dc or global_cond.shape[0] < 1:
        raise ValueError(f"`global_cond` must be [B >= 1, {Dc}], got {list(global_cond.shape)}")
    B, dev, f32 = global_cond.shape[0], global_cond.device, torch.float32
    if not 0 <= pc.strategy < len(ROUTER_STRATEGIES):
        raise ValueError(f"`pc.strategy` must index fdp_kernels.abi.ROUTER_STRATEGIES, got {pc.strategy!r}")
    if not 1 <= pc.topk <= K and pc.strategy == ROUTER_STRATEGIES.index("topk"):
        raise ValueError(f"`pc.topk` must be in 1..{K}, got {pc.topk}")
    Hr, N = pc.router_w1.shape[1], K * (1 + 2 * L) * H
    _check("pc.router_w1", pc.router_w1, (Dc, Hr), f32, dev)
    _check("pc.router_b1", pc.router_b1, (Hr,), f32, dev)
    _check("pc.router_w2", pc.router_w2, (Hr, K), f32, dev)
    _check("pc.router_b2", pc.router_b2, (K,), f32, dev)
    _check("pc.fixed", pc.fixed, (K,), f32, dev)
    Dk = pc.cond_w.shape[0] if pc.cond_w.ndim == 2 else -1
    _check("pc.cond_w", pc.cond_w, (Dc if Dk else 0, N), f32, dev)
    _check("pc.cond_b", pc.cond_b, (N,), f32, dev)
    _check("out", out, (B * K * (1 + (1 + 2 * L) * H),), f32, dev)
    if counters is not None:
        if (counters.dtype != torch.int32 or counters.ndim != 1 or not counters.is_contiguous()
                or counters.device != dev):
            raise ValueError(f"`counters` must be a contiguous 1-D torch.int32 tensor on {dev}")
    if Dk * N >= 2**31 or Dc * Hr >= 2**31:
        raise ValueError("the conditioning pack is too large for the kernel's 32-bit weight offsets")
    return B, Dc


def call_terms(pc, global_cond, out=None, counters=None, validate=True):
    """The per-call terms of ``pc`` (:class:`fdp.packing.PackedCond`) for ``global_cond [B, Dc]`` in one launch.

    ``out``: the float32 buffer of ``fdp.packing.call_terms_numel`` elements to write (default: a new one); read it
    with :func:`fdp.packing.split_call_terms`. ``counters``: int32 arrival counters to zero in the same launch
    (the split per-step kernel's), or None. Returns ``out``.
    """
    K, L, H = pc.K, pc.L, pc.H
    if out is None:
        out = torch.empty(global_cond.shape[0] * K * (1 + (1 + 2 * L) * H), device=global_cond.device,
                          dtype=torch.float32)
    if validate:
        check_call(pc, global_cond, out, counters)
    from .ops import call_terms_launch  # here: fdp_kernels.ops imports this module's kernel

    call_terms_launch(global_cond, out, pc.router_w1, pc.router_b1, pc.router_w2, pc.router_b2, pc.fixed, pc.cond_w,
                      pc.cond_b, counters, K, L, H, pc.strategy, pc.topk)
    return out

"""The Triton kernels' launches as ``torch.library`` ops, so ``torch.compile`` and ``torch.export`` see them.

Each launcher (:func:`fdp_kernels.mlp_step.mlp_step`,
:func:`fdp_kernels.mlp_persistent.mlp_sample`,
:func:`fdp_kernels.compose_step.compose_step`) validates its arguments and
picks its block sizes in Python, then launches through one of these ops:

- ``torch.ops.fdp.mlp_launch``: one launch of the per-step or the persistent
  fused MLP kernel; writes ``out`` (and ``scratch``, when given);
- ``torch.ops.fdp.compose_launch``: one launch of the compose-and-step kernel;
  writes ``out``;
- ``torch.ops.fdp.call_terms_launch``: one launch of the per-call terms kernel
  (:func:`fdp_kernels.call_terms.call_terms`); writes ``out`` and zeroes ``counters``.

They are :func:`torch.library.triton_op` s whose bodies launch through
:func:`torch.library.wrap_triton`: dynamo traces through the launchers and
records the op, Inductor sees the kernel itself, and ``torch.export`` keeps
the op. Eagerly an op costs one dispatcher call around the launch. Under
``TRITON_INTERPRET=1`` the ops run the interpreted kernels, and dynamo and
``torch.export`` still trace them (their fake kernels only describe that
nothing changes shape); Inductor needs compiled kernels.
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
from torch.library import triton_op, wrap_triton

from .call_terms import (CALL_BLOCK_B, CALL_BLOCK_D, CALL_BLOCK_HR, CALL_BLOCK_N, _ZERO_BLOCK,
                         call_terms_kernel)
from .compose_step import compose_step_kernel
from .mlp_common import grid
from .mlp_persistent import mlp_persistent_kernel
from .mlp_step import mlp_step_kernel

__all__ = ["mlp_launch", "compose_launch", "call_terms_launch", "launch_mlp"]


def launch_mlp(persistent: bool, x, out, packed, steps, call, coef, adds_noise, noise, scratch, counters, step: int,
               seed: int | None, clip_range: float | None, noise_mode: int, skip_unused: bool, cfg: dict,
               known=None, known_mask=None) -> None:
    """:func:`mlp_launch` from the launchers' objects (``packed``, ``steps``, ``call``) and ``block_config``'s ``cfg``."""
    mlp_launch(persistent, x, out, packed.w_in, packed.w_a, packed.w_b, packed.b_b, packed.w_out, packed.b_out,
               steps.t_in, steps.t_shift, call.weights, call.c_in, call.scale, call.shift, coef, adds_noise, noise,
               scratch, counters, step, seed or 0, float(clip_range or 0.0), clip_range is not None, noise_mode,
               bool(skip_unused), **{k.lower(): v for k, v in cfg.items()}, known=known,
               known_mask=None if known_mask is None else known_mask.view(torch.uint8))


@triton_op("fdp::mlp_launch", mutates_args={"out", "scratch", "counters"})
def mlp_launch(persistent: bool, x: torch.Tensor, out: torch.Tensor, w_in: torch.Tensor, w_a: torch.Tensor,
               w_b: torch.Tensor, b_b: torch.Tensor, w_out: torch.Tensor, b_out: torch.Tensor, t_in: torch.Tensor,
               t_shift: torch.Tensor, weights: torch.Tensor, c_in: torch.Tensor, scale: torch.Tensor,
               shift: torch.Tensor, coef: torch.Tensor, adds_noise: torch.Tensor, noise: Optional[torch.Tensor],
               scratch: Optional[torch.Tensor], counters: Optional[torch.Tensor], step: int, seed: int,
               clip_range: float, clip: bool, noise_mode: int, skip_unused: bool, block_b: int, d_pad: int,
               h_pad: int, h_stride: int, block_n: int, block_k: int, block_hd: int, h_in_regs: bool, split: bool,
               precision: str, num_warps: int, maxnreg: Optional[int], known: Optional[torch.Tensor] = None,
               known_mask: Optional[torch.Tensor] = None) -> None:
    """One launch of the fused MLP kernel (``persistent``: all T steps, else step ``step``) on validated tensors.

    The block sizes are :func:`fdp_kernels.mlp_common.block_config`'s; ``scratch`` is None when the launch needs
    none, ``counters`` (the split per-step kernel's) None unless ``split``. ``known`` (float32 ``[B, D]``, or
    ``[T, B, D]`` one slice per step) and ``known_mask`` (uint8 ``[B, D]``), both or neither: inpainting.
    """
    B, D = x.shape
    K, _, H = w_in.shape
    L = w_a.shape[1]
    # x stands in for unused pointer arguments.
    tensors = (x, out, w_in, w_a, w_b, b_b, w_out, b_out, t_in, t_shift, weights, c_in, scale, shift, coef,
               adds_noise, noise if noise is not None else x, scratch if scratch is not None else x)
    inpaint = known is not None
    known_stride = B * D if inpaint and known.ndim == 3 else 0
    inpaint_ptrs = (known, known_mask) if inpaint else (x, x)
    sizes = (seed, clip_range, known_stride, B, D, H, L, K)
    blocks = dict(BLOCK_B=block_b, D_PAD=d_pad, H_PAD=h_pad, H_STRIDE=h_stride, BLOCK_N=block_n, BLOCK_K=block_k,
                  BLOCK_HD=block_hd, H_IN_REGS=h_in_regs, SKIP_UNUSED=skip_unused, PRECISION=precision, CLIP=clip,
                  NOISE_MODE=noise_mode, INPAINT=inpaint, num_warps=num_warps)
    if maxnreg is not None:  # a backend without the option (ROCm) rejects the keyword even when None
        blocks["maxnreg"] = maxnreg
    if persistent:
        # The loop bound takes the step argument's place.
        wrap_triton(mlp_persistent_kernel)[grid(B, K, block_b, False)](*tensors, *inpaint_ptrs, coef.shape[0], *sizes,
                                                                       **blocks)
    else:
        wrap_triton(mlp_step_kernel)[grid(B, K, block_b, split)](
            *tensors, counters if counters is not None else x, *inpaint_ptrs, step, *sizes, SPLIT=split, **blocks)


@triton_op("fdp::compose_launch", mutates_args={"out"})
def compose_launch(eps: torch.Tensor, weights: torch.Tensor, x: torch.Tensor, noise: Optional[torch.Tensor],
                   out: torch.Tensor, coef: torch.Tensor, adds_noise: torch.Tensor, step: int, clip_range: float,
                   clip: bool, block: int, num_warps: int, known: Optional[torch.Tensor] = None,
                   known_mask: Optional[torch.Tensor] = None) -> None:
    """One launch of the compose-and-step kernel on validated tensors (``adds_noise`` int8; ``known_mask``
    uint8)."""
    K = eps.shape[0]
    # Views of eps as [K, B, R, C]: a [K, B, N] tensor is R = 1.
    if x.ndim == 2:
        R, C = 1, x.shape[1]
        s_ek, s_eb, s_ec = eps.stride()
        s_er = 0
    else:
        R, C = x.shape[1], x.shape[2]
        s_ek, s_eb, s_er, s_ec = eps.stride()
    has_noise = noise is not None
    # Row ``step`` of an all-steps noise tensor, as an element offset computed here in Python ints.
    noise_offset = step * x.numel() if has_noise and noise.ndim == x.ndim + 1 else 0
    inpaint = known is not None
    known_stride = x.numel() if inpaint and known.ndim == x.ndim + 1 else 0
    wrap_triton(compose_step_kernel)[(triton.cdiv(x.numel(), block),)](
        eps, weights, x, noise if has_noise else x, out, coef, adds_noise,
        known if inpaint else x, known_mask if inpaint else x,
        step, noise_offset, clip_range, known_stride, x.numel(), R, C,
        s_ek, s_eb, s_er, s_ec, weights.stride(0), weights.stride(1),
        K=K, CLIP=clip, HAS_NOISE=has_noise, INPAINT=inpaint, BLOCK=block, num_warps=num_warps)


@triton_op("fdp::call_terms_launch", mutates_args={"out", "counters"})
def call_terms_launch(global_cond: torch.Tensor, out: torch.Tensor, router_w1: torch.Tensor, router_b1: torch.Tensor,
                      router_w2: torch.Tensor, router_b2: torch.Tensor, fixed: torch.Tensor, cond_w: torch.Tensor,
                      cond_b: torch.Tensor, counters: Optional[torch.Tensor], K: int, L: int, H: int, strategy: int,
                      topk: int) -> None:
    """One launch of the per-call terms kernel on validated tensors (``counters``: int32, zeroed; or None)."""
    B, Dc = global_cond.shape
    Hr = router_w1.shape[1]
    N = cond_b.shape[0]
    n_counters = counters.numel() if counters is not None else 0
    grid = (triton.cdiv(B, CALL_BLOCK_B), triton.cdiv(N, CALL_BLOCK_N) + 1)
    # Unconditional components: cond_w has no rows and is never read (cond_b stands in for its pointer).
    wrap_triton(call_terms_kernel)[grid](
        global_cond, out, router_w1, router_b1, router_w2, router_b2, fixed, cond_w if cond_w.numel() else cond_b,
        cond_b,
        counters if counters is not None else out, B, Dc, cond_w.shape[0], Hr, K, K * H, K * L * H, N, topk,
        n_counters, global_cond.stride(0), global_cond.stride(1), BLOCK_B=CALL_BLOCK_B, BLOCK_N=CALL_BLOCK_N,
        BLOCK_D=CALL_BLOCK_D, BLOCK_HR=CALL_BLOCK_HR, K_PAD=max(16, triton.next_power_of_2(K)), STRATEGY=strategy,
        ZERO_BLOCK=_ZERO_BLOCK, num_warps=4)


# The ops only write buffers they are given, so their fake (meta) kernels have nothing to do. triton_op's
# default fake runs the body on fake tensors, which an interpreted kernel cannot take.
@mlp_launch.register_fake
def _mlp_launch_fake(*args, **kwargs) -> None:
    return None


@compose_launch.register_fake
def _compose_launch_fake(*args, **kwargs) -> None:
    return None


@call_terms_launch.register_fake
def _call_terms_launch_fake(*args, **kwargs) -> None:
    return None

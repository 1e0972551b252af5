"""fdp's fused kernels as ``torch.library`` ops: what ``torch.compile`` and ``torch.export`` see.

A Sampler call of a fused backend reaches its kernels through these ops, so
``torch.compile(fullgraph=True)`` traces it without a graph break and
``torch.export`` keeps the ops in the exported program:

- ``torch.ops.fdp.mlp_cuda`` (here): one sampling call's kernel launch(es) of
  the CUDA extension ``fdp._C`` (``backend="cuda"`` / ``"cuda-persistent"``);
  a :func:`torch.library.custom_op` with a fake (meta) implementation, so
  tracing needs no GPU work;
- ``torch.ops.fdp.call_terms_cuda`` (here): the per-call terms launch of the
  CUDA extension (router weights and conditioning terms, ``csrc/call_terms.cu``),
  writing its ``out`` buffer;
- ``torch.ops.fdp.mlp_launch``, ``torch.ops.fdp.call_terms_launch`` and ``torch.ops.fdp.compose_launch``
  (:mod:`fdp_kernels.ops`, registered when the Triton kernels are first
  used): :func:`torch.library.triton_op` s of the Triton kernels
  (``triton``, ``triton-persistent``, ``graph``).
"""

from __future__ import annotations

from typing import Optional

import torch

from .packing import CallTerms, PackedCond, PackedMLP, StepTerms

__all__ = ["mlp_cuda", "mlp_cuda_call", "call_terms_cuda", "call_terms_cuda_call"]


@torch.library.custom_op("fdp::mlp_cuda", mutates_args=())
def mlp_cuda(kind: int, x: torch.Tensor, w_in: torch.Tensor, w_a: torch.Tensor, w_b: torch.Tensor,
             b_b: torch.Tensor, w_out: torch.Tensor, b_out: torch.Tensor, t_in: torch.Tensor, t_shift: torch.Tensor,
             weights: torch.Tensor, c_in: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor, coef: torch.Tensor,
             noise: Optional[torch.Tensor], clip_range: Optional[float], options: list[int],
             known: Optional[torch.Tensor] = None, known_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """x_0 ``[B, D]`` float32 from ``x`` (x_T) by the fused CUDA kernel ``kind`` (0 per-step, 1 persistent).

    Tensors as :func:`fdp.backends.cuda_backend.launch` takes them, flattened; ``options`` are the five
    kernel options in ``cuda_backend``'s order (0 / -1: automatic); ``known`` / ``known_mask`` inpaint
    (:func:`fdp.backends.cuda_backend.check_known`). Validates before launching.
    """
    from .backends import cuda_backend as cb

    # The kernels see only the flat sample: horizon x action_dim = 1 x D.
    packed = PackedMLP(w_in, w_a, w_b, b_b, w_out, b_out, horizon=1, action_dim=w_in.shape[1])
    out = torch.empty_like(x)
    return cb.launch(kind, packed, StepTerms(t_in, t_shift), CallTerms(weights, c_in, scale, shift), coef, x, noise,
                     out, clip_range, options=dict(zip(cb._OPTION_KEYS, options)), known=known, known_mask=known_mask)


@mlp_cuda.register_fake
def _mlp_cuda_fake(kind, x, w_in, w_a, w_b, b_b, w_out, b_out, t_in, t_shift, weights, c_in, scale, shift, coef,
                   noise, clip_range, options, known=None, known_mask=None):
    if x.ndim != 2 or w_in.ndim != 3 or x.shape[1] != w_in.shape[1]:
        raise ValueError(f"`x` must be [B, D] with D = w_in.shape[1], got {list(x.shape)} and w_in "
                         f"{list(w_in.shape)}")
    return torch.empty_like(x)


def mlp_cuda_call(kind: int, packed: PackedMLP, steps: StepTerms, call: CallTerms, coef: torch.Tensor,
                  x: torch.Tensor, noise: torch.Tensor | None, clip_range: float | None, options, known=None,
                  known_mask=None) -> torch.Tensor:
    """:func:`mlp_cuda` from the packing objects (``options``: ``cuda_backend``'s tuple)."""
    return mlp_cuda(kind, x, packed.w_in, packed.w_a, packed.w_b, packed.b_b, packed.w_out, packed.b_out,
                    steps.t_in, steps.t_shift, call.weights, call.c_in, call.scale, call.shift, coef, noise,
                    clip_range, list(options), known, known_mask)


@torch.library.custom_op("fdp::call_terms_cuda", mutates_args={"out"})
def call_terms_cuda(global_cond: torch.Tensor, out: torch.Tensor, router_w1: torch.Tensor, router_b1: torch.Tensor,
                    router_w2: torch.Tensor, router_b2: torch.Tensor, fixed: torch.Tensor, cond_w: torch.Tensor,
                    cond_b: torch.Tensor, K: int, L: int, H: int, strategy: int, topk: int) -> None:
    """One launch of the CUDA per-call terms kernel: ``out`` (``fdp.packing.call_terms_numel`` floats) from the
    float32 features ``global_cond [B, Dc]`` and :class:`fdp.packing.PackedCond`'s tensors. Validates first."""
    from .backends import cuda_backend as cb

    cb.launch_call_terms(PackedCond(router_w1, router_b1, router_w2, router_b2, fixed, cond_w, cond_b, strategy,
                                    topk, K, L, H), global_cond, out)


@call_terms_cuda.register_fake
def _call_terms_cuda_fake(*args, **kwargs) -> None:
    return None


def call_terms_cuda_call(pc: PackedCond, global_cond: torch.Tensor, out: torch.Tensor) -> None:
    """:func:`call_terms_cuda` from a :class:`fdp.packing.PackedCond`."""
    call_terms_cuda(global_cond, out, pc.router_w1, pc.router_b1, pc.router_w2, pc.router_b2, pc.fixed, pc.cond_w,
                    pc.cond_b, pc.K, pc.L, pc.H, pc.strategy, pc.topk)

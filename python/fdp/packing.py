"""The packed layout that the fused MLP kernels read — the one place that defines it.

A :class:`fdp.FactorizedPolicy` of K :class:`fdp.MLPDenoiser` components of the
same shape (D = horizon * action_dim inputs, width H, L blocks) packs into
weights stacked over K, each matrix stored **input-major** (``[in, out]``,
row-major) so a kernel computes ``act @ W`` reading contiguous rows:

    w_in   [K, D, H]       W_in^T
    w_a    [K, L, H, H]    W_a,l^T     (first matmul of block l; its bias is folded into `shift`)
    w_b    [K, L, H, H]    W_b,l^T     (second matmul of block l)
    b_b    [K, L, H]       b_b,l       (float32)
    w_out  [K, H, D]       W_out^T
    b_out  [K, D]          b_out       (float32)

Matrices are in the pack's weight dtype (float32, bfloat16 or float16); biases
and every precomputed term are float32, and kernels accumulate in float32.
Everything that does not depend on ``x_t`` is computed on the host side, once:

    per step (once per pack, for the sampler's timesteps), :class:`fdp.mlp.StepTerms` stacked over K:
        t_in    [T, K, H]      U_in e(t_i)
        t_shift [T, K, L, H]   T_l e(t_i)
    per call (once per sampling call, from the features c and the router's weights), :class:`CallTerms`:
        weights [B, K]         router weights (the caller runs the router)
        c_in    [B, K, H]      V_in c + b_in
        scale   [B, K, L, H]   1 + gamma_l(c)
        shift   [B, K, L, H]   (1 + gamma_l(c)) * b_a,l + beta_l(c)

so that step i of component k, for a row x of the batch, is exactly
:meth:`fdp.MLPDenoiser.forward_terms`. :func:`reference_eps` is that step on
the packed tensors, all K components at once: the runnable definition the
kernels are tested against and the bench's batched path runs. All tensors
are contiguous.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from fdp_kernels.abi import WEIGHT_DTYPES

from .mlp import MLPDenoiser, StepTerms


@dataclass
class CallTerms:
    weights: torch.Tensor  # [B, K] float32
    c_in: torch.Tensor     # [B, K, H] float32
    scale: torch.Tensor    # [B, K, L, H] float32
    shift: torch.Tensor    # [B, K, L, H] float32


@dataclass
class PackedMLP:
    """K MLPDenoisers stacked for the fused kernels (see the module docstring)."""

    w_in: torch.Tensor
    w_a: torch.Tensor
    w_b: torch.Tensor
    b_b: torch.Tensor
    w_out: torch.Tensor
    b_out: torch.Tensor
    horizon: int
    action_dim: int

    @property
    def K(self) -> int:
        return self.w_in.shape[0]

    @property
    def D(self) -> int:
        return self.w_in.shape[1]

    @property
    def H(self) -> int:
        return self.w_in.shape[2]

    @property
    def L(self) -> int:
        return self.w_a.shape[1]

    @property
    def dtype(self) -> torch.dtype:
        return self.w_in.dtype

    @property
    def device(self) -> torch.device:
        return self.w_in.device


def mlp_unsupported_reason(policy) -> str | None:
    """Why ``policy`` cannot be packed as stacked MLPDenoisers (None if it can)."""
    comps = list(policy.components)
    if not all(type(c) is MLPDenoiser for c in comps):
        kinds = sorted({type(c).__name__ for c in comps})
        return f"fused MLP kernels serve fdp.MLPDenoiser components only, this policy has {kinds}"
    shapes = {(c.input_dim, c.horizon, c.global_cond_dim, c.hidden_dim, c.num_blocks) for c in comps}
    if len(shapes) != 1:
        return f"all components must have the same (input_dim, horizon, global_cond_dim, hidden_dim, num_blocks), got {sorted(shapes)}"
    return None


@torch.no_grad()
def pack_policy(policy, dtype: torch.dtype | None = None) -> PackedMLP:
    """Stack the policy's MLPDenoiser weights in the kernel layout, cast to ``dtype``."""
    reason = mlp_unsupported_reason(policy)
    if reason:
        raise ValueError(f"`policy` cannot be packed: {reason}")
    comps = list(policy.components)
    if dtype is None:  # the policy's own dtype where kernels take it (a float64 policy packs as float32)
        dtype = comps[0].out.weight.dtype if comps[0].out.weight.dtype in WEIGHT_DTYPES else torch.float32
    if dtype not in WEIGHT_DTYPES:
        raise TypeError(f"`dtype` must be one of {WEIGHT_DTYPES}, got {dtype}")

    def stack(fn, dt=dtype):
        return torch.stack([fn(c) for c in comps]).to(dt).contiguous()

    return PackedMLP(
        w_in=stack(lambda c: c.inp.weight.t()),
        w_a=stack(lambda c: torch.stack([b.weight.t() for b in c.blocks_a])),
        w_b=stack(lambda c: torch.stack([b.weight.t() for b in c.blocks_b])),
        b_b=stack(lambda c: torch.stack([b.bias for b in c.blocks_b]), torch.float32),
        w_out=stack(lambda c: c.out.weight.t()),
        b_out=stack(lambda c: c.out.bias, torch.float32),
        horizon=comps[0].horizon,
        action_dim=comps[0].input_dim,
    )


@torch.no_grad()
def step_terms(policy, timesteps: torch.Tensor) -> StepTerms:
    """Timestep-only terms of every component for the sampler's timesteps ``[T]``."""
    terms = [c.step_terms(timesteps) for c in policy.components]
    return StepTerms(
        t_in=torch.stack([s.t_in for s in terms], dim=1).float().contiguous(),
        t_shift=torch.stack([s.t_shift for s in terms], dim=1).float().contiguous(),
    )


@torch.no_grad()
def call_terms(policy, global_cond: torch.Tensor, weights: torch.Tensor) -> CallTerms:
    """Sample-only terms of every component for one sampling call (features ``[B, Dc]``), with the
    router's ``weights [B, K]`` (``policy.weights(global_cond)``, run by the caller)."""
    B = global_cond.shape[0]
    terms = [c.sample_terms(global_cond, B) for c in policy.components]
    return CallTerms(
        weights=weights.float().contiguous(),
        c_in=torch.stack([s.c_in for s in terms], dim=1).float().contiguous(),
        scale=torch.stack([s.scale for s in terms], dim=1).float().contiguous(),
        shift=torch.stack([s.shift for s in terms], dim=1).float().contiguous(),
    )


def reference_eps(packed: PackedMLP, t_in: torch.Tensor, t_shift: torch.Tensor, call: CallTerms, x: torch.Tensor,
                  compute_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Composed noise prediction of one step from packed tensors: ``x [B, D]`` float32 -> ``[B, D]`` float32.

    ``t_in [K, H]`` and ``t_shift [K, L, H]`` are the step's row of :class:`StepTerms`. The K
    components run together as batched matmuls over the stacked weights; the matmuls take their
    inputs in ``compute_dtype`` (float32: the weights are upcast, what the kernels compute; the pack's
    dtype: half matmuls), and everything else is float32. A component with weight 0 on a row is left
    out of that row, NaN output or not (:meth:`fdp.FactorizedPolicy.compose`).
    """
    def mm(a, w):
        return torch.matmul(a.to(compute_dtype), w.to(compute_dtype)).float()

    h = mm(x, packed.w_in) + t_in[:, None] + call.c_in.transpose(0, 1)  # [K, B, H]
    for l in range(packed.L):
        y = (mm(h, packed.w_a[:, l]) * call.scale[:, :, l].transpose(0, 1) + call.shift[:, :, l].transpose(0, 1)
             + t_shift[:, None, l])
        h = h + mm(torch.nn.functional.silu(y), packed.w_b[:, l]) + packed.b_b[:, None, l]
    e = mm(h, packed.w_out) + packed.b_out[:, None]  # [K, B, D]
    w = call.weights.t()[:, :, None]
    return torch.where(w != 0, w * e, 0).sum(0)

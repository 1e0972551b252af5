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

The per-call terms are computed by one kernel launch from the features ``c [B, Dc]`` and a second
pack, :class:`PackedCond` (:func:`pack_cond`), float32 whatever the weights' dtype:

    router_w1 [Dc, Hr]   router_b1 [Hr]    the router's first Linear, input-major
    router_w2 [Hr, K]    router_b2 [K]     its second Linear (the logits)
    fixed     [K]                          the ``fixed`` strategy's weights
    cond_w    [Dk, N]    cond_b    [N]     every component's conditioning as ONE affine map of c,
                                           N = K (1 + 2L) H, Dk = Dc (0 for unconditional components)
    strategy, topk                         host ints: fdp_kernels.abi.ROUTER_STRATEGIES index, top-k size

The columns of ``cond_w`` are three blocks, each in the order of its CallTerms tensor: ``c_in``
(``[K, H]``: V_in, b_in), ``scale`` (``[K, L, H]``: G_gamma, 1 + g0_gamma) and ``shift`` (``[K, L, H]``:
diag(b_a) G_gamma + G_beta, (1 + g0_gamma) b_a + g0_beta). ``shift = (1 + gamma) b_a + beta`` is
affine in c, so folding b_a into its rows here leaves one matmul per call for all three terms.
Float32 because the terms are float32 and kernels accumulate in float32 anyway: rounding these weights to a
16-bit pack dtype would add an error the per-step weights' rounding does not excuse (the router's argmax
and top-k would flip on near ties), for a pack of ``(Dc + 1) (Hr + K (1 + 2L) H)`` floats read once per call.
:func:`reference_call_terms` is the call on that layout in torch: what the kernels are tested against.
:func:`call_terms` computes the same from the policy's own modules (``torch-batched``, tests).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from fdp_kernels.abi import (ROUTER_STRATEGIES, STRATEGY_FIXED, STRATEGY_HARD, STRATEGY_SOFT, STRATEGY_TANH,
                             WEIGHT_DTYPES)

from .mlp import MLPDenoiser, StepTerms
from .router import top_mask


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


@dataclass
class PackedCond:
    """The router and every component's conditioning, packed for the per-call kernel (module docstring)."""

    router_w1: torch.Tensor  # [Dc, Hr]
    router_b1: torch.Tensor  # [Hr]
    router_w2: torch.Tensor  # [Hr, K]
    router_b2: torch.Tensor  # [K]
    fixed: torch.Tensor      # [K]
    cond_w: torch.Tensor     # [Dk, N], Dk in (0, Dc)
    cond_b: torch.Tensor     # [N]
    strategy: int            # index in fdp_kernels.abi.ROUTER_STRATEGIES
    topk: int
    K: int
    L: int
    H: int

    @property
    def Dc(self) -> int:
        return self.router_w1.shape[0]

    @property
    def Hr(self) -> int:
        return self.router_w1.shape[1]

    @property
    def conditional(self) -> bool:
        """Whether the components read the features (else their terms are constants: c is not read)."""
        return self.cond_w.shape[0] > 0

    @property
    def N(self) -> int:
        return self.cond_b.shape[0]


@torch.no_grad()
def pack_cond(policy) -> PackedCond:
    """The policy's router and conditioning projections in the per-call layout (float32, on the policy's
    device). A copy: :class:`fdp.Sampler` packs again when any of them changes (:mod:`fdp._watch`)."""
    reason = mlp_unsupported_reason(policy)
    if reason:
        raise ValueError(f"`policy` cannot be packed: {reason}")
    comps, router = list(policy.components), policy.router
    K, L, H = len(comps), comps[0].num_blocks, comps[0].hidden_dim
    if router.num_components != K:
        raise ValueError(f"`policy` cannot be packed: the router has {router.num_components} outputs but there "
                         f"are {K} components")
    f32 = torch.float32
    first, last = router.net[0], router.net[2]
    b_a = [torch.stack([blk.bias for blk in c.blocks_a]).to(f32) for c in comps]  # [L, H] each
    if comps[0].cond_proj is not None:
        # cond_proj's rows: [V_in (H) | G_gamma (L H) | G_beta (L H)].
        w = [c.cond_proj.weight.to(f32) for c in comps]
        b = [c.cond_proj.bias.to(f32) for c in comps]
        w_in = torch.stack([wk[:H] for wk in w])                                      # [K, H, Dc]
        w_g = torch.stack([wk[H:H + L * H].unflatten(0, (L, H)) for wk in w])        # [K, L, H, Dc]
        w_b = torch.stack([wk[H + L * H:].unflatten(0, (L, H)) for wk in w])         # [K, L, H, Dc]
        g0 = torch.stack([bk[H:H + L * H].unflatten(0, (L, H)) for bk in b])         # [K, L, H]
        be0 = torch.stack([bk[H + L * H:].unflatten(0, (L, H)) for bk in b])
        ba = torch.stack(b_a)
        cond_w = torch.cat([w_in.flatten(0, 1), w_g.flatten(0, 2), (ba[..., None] * w_g + w_b).flatten(0, 2)]).t()
        c_in_b = torch.stack([bk[:H] for bk in b])
    else:
        g0 = be0 = torch.zeros(K, L, H, dtype=f32, device=first.weight.device)
        ba = torch.stack(b_a)
        cond_w = torch.zeros(0, K * (1 + 2 * L) * H, dtype=f32, device=first.weight.device)
        c_in_b = torch.stack([c.in_bias.to(f32) for c in comps])
    cond_b = torch.cat([c_in_b.flatten(), (1 + g0).flatten(), ((1 + g0) * ba + be0).flatten()])

    def own(t):  # `.to(f32)` of a float32 tensor is the tensor itself: a graph would read the live parameter
        return t.to(dtype=f32, memory_format=torch.contiguous_format, copy=True)

    return PackedCond(
        router_w1=own(first.weight.t()), router_b1=own(first.bias), router_w2=own(last.weight.t()),
        router_b2=own(last.bias), fixed=own(router.fixed_weights), cond_w=cond_w.contiguous(),
        cond_b=cond_b.contiguous(),
        strategy=ROUTER_STRATEGIES.index(router.strategy), topk=int(router.topk), K=K, L=L, H=H)


def split_call_terms(buf: torch.Tensor, B: int, K: int, L: int, H: int) -> CallTerms:
    """CallTerms as views of one float32 buffer of ``call_terms_numel(B, K, L, H)`` elements, in the order the
    kernels write it: weights, c_in, scale, shift (each contiguous)."""
    sizes = (B * K, B * K * H, B * K * L * H, B * K * L * H)
    w, c_in, scale, shift = buf[:sum(sizes)].split(sizes)
    return CallTerms(weights=w.view(B, K), c_in=c_in.view(B, K, H), scale=scale.view(B, K, L, H),
                     shift=shift.view(B, K, L, H))


def call_terms_numel(B: int, K: int, L: int, H: int) -> int:
    """Floats of one call's terms (:func:`split_call_terms`)."""
    return B * K * (1 + (1 + 2 * L) * H)


def route(pc: PackedCond, logits: torch.Tensor) -> torch.Tensor:
    """The strategy of ``pc`` on float32 ``logits [B, K]`` (not used under ``fixed``), with the router's NaN
    rules: NaN rows where a logit is NaN or +Inf (``tanh``: any non-finite logit); ties to the lowest index."""
    bad = ~(logits < float("inf")).all(dim=-1, keepdim=True)
    if pc.strategy == STRATEGY_SOFT:
        return torch.softmax(logits, dim=-1)
    if pc.strategy == STRATEGY_TANH:
        return torch.tanh(logits).masked_fill(~torch.isfinite(logits).all(dim=-1, keepdim=True), float("nan"))
    keep = top_mask(logits, 1 if pc.strategy == STRATEGY_HARD else pc.topk)
    if pc.strategy == STRATEGY_HARD:
        w = keep.float()
    else:
        m = logits.masked_fill(~keep, -float("inf")).amax(-1, keepdim=True)
        e = torch.where(keep, torch.exp(logits - m), 0.0)
        w = e / e.sum(-1, keepdim=True)
    return w.masked_fill(bad, float("nan"))


def reference_call_terms(pc: PackedCond, global_cond: torch.Tensor) -> CallTerms:
    """The per-call terms from the packed layout, in float32 torch: the runnable definition of the per-call kernels
    (:func:`fdp_kernels.call_terms.call_terms`, ``csrc/call_terms.cu``); equal to :func:`call_terms` with the
    router's weights up to float32 rounding."""
    c = global_cond.float()
    B = c.shape[0]
    if pc.strategy == STRATEGY_FIXED:
        weights = pc.fixed.expand(B, pc.K).clone()
    else:
        hidden = torch.relu(c @ pc.router_w1 + pc.router_b1)
        weights = route(pc, hidden @ pc.router_w2 + pc.router_b2)
    p = (c @ pc.cond_w + pc.cond_b) if pc.conditional else pc.cond_b.expand(B, -1)
    K, L, H = pc.K, pc.L, pc.H
    c_in, scale, shift = p.split((K * H, K * L * H, K * L * H), dim=1)
    return CallTerms(weights=weights.contiguous(), c_in=c_in.reshape(B, K, H).contiguous(),
                     scale=scale.reshape(B, K, L, H).contiguous(), shift=shift.reshape(B, K, L, H).contiguous())


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
